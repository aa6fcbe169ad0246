"""The host side of a sandbox's filesystem: its uid, its root tree made ready to be the sandbox's `/`, its /etc files.

The sandbox's directory on the host *is* its `/` (bwrap binds it there), so every path agrees inside and out. The
system directories are mounted read-only on top, at mount points made here: real directories owned by root, never
symlinks, so nothing written into the tree can redirect a mount.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

from .tree import walk_fd
from .uids import Identity

#: Host directories bound read-only at the same path (when present); a merged-/usr machine's /bin is a symlink.
SYSTEM_DIRS = ("/usr", "/etc", "/opt", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: Where the sandbox sees its private runtime directory (kernel connection files, IPC sockets).
SANDBOX_RUN = "/run/scalebox"
#: Where the sandbox sees the relay script (kernels without IPC support).
SANDBOX_RELAY = "/run/scalebox-relay.py"
#: The sandbox user's home: the default cwd, and where relative sandbox paths start.
HOME = "/home/user"
#: Directories every sandbox has, owned by its uid (the default cwd, the Session API's workspace, scratch space).
USER_DIRS = (HOME, "/workspace", "/tmp")
SANDBOX_USER = "user"
#: Where the server keeps what the sandbox must not touch but must be on its filesystem (links to its kernels'
#: sockets); root-only, seen as an unreadable /run/scalebox-host inside.
HOST_ONLY = "/run/scalebox-host"


def runtime_paths(needed: Iterable[str | Path] = ()) -> list[Path]:
    """The host directories the kernels need besides the system ones (the runtimes, say), without duplicates or
    nested pairs; each is bound read-only at its own path. Nothing else of the host's, and so nothing of the
    server's own environment, is in a sandbox."""
    found: list[Path] = []
    for path in map(Path, needed):
        real = Path(os.path.realpath(path))
        if not real.is_dir() or any(real.is_relative_to(d) for d in (*map(Path, SYSTEM_DIRS), *found)):
            continue
        found = [p for p in found if not p.is_relative_to(real)] + [real]
    return found


def _ensure_dir(path: Path, mode: int = 0o755, owner: Identity | None = None) -> None:
    """A real directory at `path` (owned by root, or by `owner`); a symlink or file in the way is removed.

    Only called where every directory above is root's, so nothing of the sandbox can redirect it."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        info = None
    if info is not None and not stat.S_ISDIR(info.st_mode):
        path.unlink()
        info = None
    if info is None:
        path.mkdir(mode=mode)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        uid, gid = (owner.uid, owner.gid) if owner is not None else (0, 0)
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def ensure_mount_point(root: Path, sandbox_path: str, *, is_file: bool = False) -> None:
    """Make every component of `sandbox_path` below `root` a root-owned directory (the last one a file if asked)."""
    parts = [p for p in sandbox_path.split("/") if p]
    current = root
    for index, part in enumerate(parts):
        current = current / part
        last = index == len(parts) - 1
        if last and is_file:
            info = None
            with contextlib.suppress(FileNotFoundError):
                info = os.lstat(current)
            if info is not None and not stat.S_ISREG(info.st_mode):
                shutil.rmtree(current) if stat.S_ISDIR(info.st_mode) else current.unlink()
                info = None
            if info is None:
                current.touch(mode=0o644)
            return
        _ensure_dir(current)


def _ensure_symlink(path: Path, target: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_symlink() and os.readlink(path) == target:
            return
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    path.symlink_to(target)


def prepare_root(root: Path, runtime: Iterable[Path], identity: Identity) -> list[tuple[str, str]]:
    """Make `root` ready to be bound as `/`; returns the (kind, host path) mounts to put on top of it, where kind
    is "ro" (read-only bind) or "symlink" (the host path is a symlink, recreated in the tree).

    Everything here is a top-level entry of the root-owned tree or below a root-owned one: the sandbox's own
    directories (its home, /workspace, /tmp, /run/scalebox) are made or re-owned, never entered."""
    root.mkdir(parents=True, exist_ok=True)
    os.chown(root, 0, 0)
    os.chmod(root, 0o755)
    mounts: list[tuple[str, str]] = []
    for system in SYSTEM_DIRS:
        host = Path(system)
        if host.is_symlink():
            _ensure_symlink(root / system.lstrip("/"), os.readlink(host))
            mounts.append(("symlink", system))
        elif host.is_dir():
            ensure_mount_point(root, system)
            mounts.append(("ro", system))
    for path in runtime:
        ensure_mount_point(root, str(path))
        mounts.append(("ro", str(path)))
    for point in ("/proc", "/dev", "/run", "/home"):
        ensure_mount_point(root, point)
    ensure_mount_point(root, SANDBOX_RELAY, is_file=True)
    _ensure_dir(root / HOST_ONLY.lstrip("/"), 0o700)
    _ensure_dir(root / SANDBOX_RUN.lstrip("/"), 0o700, identity)
    for directory in USER_DIRS:
        _ensure_dir(root / directory.lstrip("/"), 0o1777 if directory == "/tmp" else 0o755, identity)
    return mounts


def own_tree(root: Path, identity: Identity) -> None:
    """Give everything in the sandbox's own directories to its uid (after it got a new one), fd by fd."""
    for directory in (*USER_DIRS, SANDBOX_RUN):
        top = os.open(root / directory.lstrip("/"), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for dir_fd, name, _ in walk_fd(top, directory, 4096, max_open=4096):
                with contextlib.suppress(FileNotFoundError):
                    os.chown(name, identity.uid, identity.gid, dir_fd=dir_fd, follow_symlinks=False)
        finally:
            os.close(top)


def write_etc(etc_dir: Path, identity: Identity, hostname: str, *, nameserver: str | None) -> dict[str, Path]:
    """passwd, group and hosts (and resolv.conf for a private network) that the sandbox sees in /etc."""
    etc_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(etc_dir, 0o755)
    files = {
        "passwd": (
            "root:x:0:0:root:/root:/bin/bash\n"
            f"{SANDBOX_USER}:x:{identity.uid}:{identity.gid}:sandbox user:{HOME}:/bin/bash\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
        "group": f"root:x:0:\n{SANDBOX_USER}:x:{identity.gid}:\nnogroup:x:65534:\n",
        "hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n",
    }
    if nameserver:
        files["resolv.conf"] = f"nameserver {nameserver}\n"
    paths: dict[str, Path] = {}
    for name, text in files.items():
        path = etc_dir / name
        path.write_text(text)
        os.chmod(path, 0o644)
        paths[name] = path
    return paths
