"""The privileged server's one way into a sandbox's files: in-root, fd-relative, and as the sandbox's own uid.

Every sandbox path is resolved by `openat2(RESOLVE_IN_ROOT)` against a directory fd of the sandbox's `/` (the
jail's own root when it runs, so its read-only system mounts are what the sandbox sees), never as a host path
string. Symlinks and `..` are then resolved by the kernel as if that fd were `/`, atomically, so whatever sandbox
code swaps or renames, and whenever it does, no operation can land outside the sandbox.

The work runs on threads whose filesystem uid and gid are the sandbox's, with no supplementary groups (setfsuid,
setfsgid and the raw setgroups syscall are all per thread on Linux, and a non-zero fsuid drops the file
capabilities). The kernel then checks every access as it would for sandbox code: the file APIs can do exactly
what the sandbox's own code could, what they create belongs to it, and its disk limit applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import os
import platform
import secrets
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_SYS_OPENAT2 = 437  # the same number on every architecture (it is newer than the split tables)
_SYS_SETGROUPS = {"x86_64": 116, "aarch64": 159}.get(platform.machine())
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
#: Directories held open at once while walking a tree; deeper levels are moved up and walked later.
MAX_OPEN_DEPTH = 64
#: Threads per sandbox doing its file work.
WORKERS = 2
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def openat2(dir_fd: int, path: str, flags: int, mode: int = 0, resolve: int = RESOLVE_IN_ROOT) -> int:
    """openat2(2): open `path` below `dir_fd` with `resolve` rules; raises OSError like os.open."""
    # openat2 is strict: a mode only with O_CREAT/O_TMPFILE, and O_PATH with nothing but these few flags.
    creates = flags & os.O_CREAT or (flags & os.O_TMPFILE) == os.O_TMPFILE
    flags |= os.O_CLOEXEC if flags & os.O_PATH else os.O_CLOEXEC | os.O_NOCTTY
    how = _OpenHow(flags, mode if creates else 0, resolve | RESOLVE_NO_MAGICLINKS)
    encoded = os.fsencode(path)
    for _ in range(16):  # EAGAIN: a concurrent rename raced the resolution; the kernel asks us to retry
        fd = _libc().syscall(_SYS_OPENAT2, dir_fd, encoded, ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return int(fd)
        code = ctypes.get_errno()
        if code != errno.EAGAIN:
            raise OSError(code, os.strerror(code), path)
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)


def become(uid: int, gid: int) -> None:
    """Make the calling thread act on files as `uid`/`gid` with no supplementary groups (this thread only)."""
    libc = _libc()
    if _SYS_SETGROUPS is None:
        raise OSError(errno.ENOSYS, f"no per-thread setgroups known for {platform.machine()}")
    if libc.syscall(_SYS_SETGROUPS, 0, None) != 0:
        code = ctypes.get_errno()
        raise OSError(code, "setgroups: " + os.strerror(code))
    libc.setfsgid(gid)
    libc.setfsuid(uid)
    # Both calls return the previous value; asking with -1 tells whether the change took.
    if libc.setfsgid(-1) != gid or libc.setfsuid(-1) != uid:
        raise OSError(errno.EPERM, f"could not take the sandbox's file identity {uid}:{gid}")


@dataclass(frozen=True)
class Entry:
    """One directory entry: its sandbox path and lstat result."""

    path: str
    info: os.stat_result


def split(path: str) -> tuple[str, str]:
    """(parent, name) of a normalised absolute sandbox path; the root's name is empty."""
    if path == "/":
        return "/", ""
    parent, _, name = path.rpartition("/")
    return parent or "/", name


class SandboxTree:
    """File operations inside one sandbox; the blocking methods run on its own threads (see `run`)."""

    def __init__(self, host_root: str | os.PathLike[str]) -> None:
        self.host_root = os.fspath(host_root)
        self._identity: tuple[int, int] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._quick: ThreadPoolExecutor | None = None  # for `call`: never queued behind a long `run`
        self._anchor: int | None = None  # O_PATH fd of the sandbox's `/` (the jail's root, or the tree)
        #: Devices the file APIs never enter: the jail's procfs (some of its files check the caller's euid,
        #: which is root on these threads, rather than its fsuid).
        self._fenced: frozenset[int] = frozenset()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ set-up

    def set_identity(self, uid: int | None, gid: int | None = None) -> None:
        """Act as this uid from now on (None: as the server itself, for unconfined sandboxes)."""
        identity = None if uid is None else (uid, uid if gid is None else gid)
        if identity != self._identity:
            self._shutdown_executor()
            self._identity = identity

    def sandbox_path(self, host: str | os.PathLike[str]) -> str:
        """The sandbox path, lexically, of a host path in the tree (ValueError for one outside it)."""
        relative = Path(os.path.abspath(host)).relative_to(self.host_root)
        return "/" + relative.as_posix() if relative.parts else "/"

    @property
    def uid(self) -> int | None:
        """The uid file work is done as (None: the server's own)."""
        return self._identity[0] if self._identity is not None else None

    def attach(self, root_fd: int | None) -> None:
        """Use `root_fd` (an O_PATH directory fd, taken over) as the sandbox's `/`; None: its host tree."""
        fenced: set[int] = set()
        if root_fd is not None:
            with contextlib.suppress(OSError):
                proc = openat2(root_fd, "/proc", os.O_PATH | os.O_DIRECTORY)
                try:
                    fenced.add(os.fstat(proc).st_dev)
                finally:
                    os.close(proc)
        with self._lock:
            old, self._anchor = self._anchor, root_fd
            self._fenced = frozenset(fenced)
        if old is not None:
            os.close(old)

    @contextlib.contextmanager
    def _anchored(self) -> Iterator[int]:
        """A private duplicate of the fd every path is resolved against (the host tree's when nothing was
        attached): `attach` may close the shared one meanwhile, and its number must never be reused under us."""
        with self._lock:
            if self._anchor is None:
                self._anchor = os.open(self.host_root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            fd = os.dup(self._anchor)
        try:
            yield fd
        finally:
            os.close(fd)

    def close(self) -> None:
        self._shutdown_executor()
        self.attach(None)

    def _shutdown_executor(self) -> None:
        for executor in (self._executor, self._quick):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._quick = None

    def _new_pool(self, workers: int) -> ThreadPoolExecutor:
        initializer: Callable[..., None] | None = None
        if self._identity is not None:
            initializer = functools.partial(become, *self._identity)
        return ThreadPoolExecutor(workers, "scalebox-tree", initializer=initializer)

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = self._new_pool(WORKERS)
        return self._executor

    async def run(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking file operation on this sandbox's threads (as its uid)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool(), functools.partial(function, *args, **kwargs))

    def call(self, function: Callable[..., T], *args: Any) -> T:
        """`run` for synchronous callers and short operations (a stat, a small file): blocks until done, on a
        thread of its own so that it never waits behind a long `run` (a big removal, say)."""
        if self._quick is None:
            self._quick = self._new_pool(1)
        return self._quick.submit(function, *args).result()

    # ------------------------------------------------------------------ resolution (call on the tree's threads)

    def open(self, path: str, flags: int = os.O_RDONLY, mode: int = 0o666) -> int:
        """An fd of `path`, symlinks followed inside the sandbox (never one in its /proc)."""
        with self._anchored() as anchor:
            fd = openat2(anchor, path, flags, mode)
        if self._fenced and os.fstat(fd).st_dev in self._fenced:
            os.close(fd)
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return fd

    @contextlib.contextmanager
    def parent(self, path: str) -> Iterator[tuple[int, str]]:
        """(fd of the parent directory, last name) of `path`: the last component is never followed."""
        parent, name = split(path)
        fd = self.open(parent, os.O_PATH | os.O_DIRECTORY)
        try:
            yield fd, name
        finally:
            os.close(fd)

    def lstat(self, path: str) -> os.stat_result:
        if path == "/":
            with self._anchored() as anchor:
                return os.stat(anchor)
        with self.parent(path) as (fd, name):
            return os.stat(name, dir_fd=fd, follow_symlinks=False)

    def stat(self, path: str) -> os.stat_result:
        fd = self.open(path, os.O_PATH)
        try:
            return os.stat(fd)
        finally:
            os.close(fd)

    def exists(self, path: str, *, follow: bool = True) -> bool:
        try:
            self.stat(path) if follow else self.lstat(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                return False
            raise
        return True

    def is_dir(self, path: str) -> bool:
        try:
            return stat.S_ISDIR(self.stat(path).st_mode)
        except OSError:
            return False

    def readlink(self, path: str) -> str:
        with self.parent(path) as (fd, name):
            return os.readlink(name, dir_fd=fd)

    # ------------------------------------------------------------------ changes (call on the tree's threads)

    def makedirs(self, path: str, mode: int = 0o755) -> None:
        """mkdir -p inside the sandbox; an existing directory (or a link to one) is fine."""
        parts = [p for p in path.split("/") if p]
        for index in range(len(parts)):
            prefix = "/" + "/".join(parts[: index + 1])
            with self.parent(prefix) as (fd, name):
                try:
                    os.mkdir(name, mode, dir_fd=fd)
                except FileExistsError:
                    if not self.is_dir(prefix):
                        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), prefix) from None

    def write_new(self, path: str, data: bytes, mode: int = 0o644) -> bool:
        """Create `path` with `data` unless something (even a dangling link) has that name; False if it had."""
        with self.parent(path) as (fd, name):
            try:
                out = os.open(
                    name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd
                )
            except FileExistsError:
                return False
        with os.fdopen(out, "wb") as handle:
            handle.write(data)
        return True

    def replace_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write `path` whole (a new file renamed over the old name, so a link there is replaced, not followed)."""
        with self.parent(path) as (fd, name):
            temp = f".{name}.{secrets.token_hex(4)}.tmp"
            out = os.open(temp, _NEW_FILE, mode, dir_fd=fd)
            try:
                with os.fdopen(out, "wb") as handle:
                    handle.write(data)
                os.rename(temp, name, src_dir_fd=fd, dst_dir_fd=fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=fd)
                raise

    def rename(self, source: str, destination: str) -> None:
        with self.parent(source) as (src_fd, src_name), self.parent(destination) as (dst_fd, dst_name):
            os.rename(src_name, dst_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)

    def remove(self, path: str) -> None:
        """Remove a file, a link (never its target) or a whole directory tree, of any depth."""
        with self.parent(path) as (fd, name):
            remove_entry(fd, name)

    def walk(self, path: str, depth: int, limit: int) -> list[Entry]:
        """Entries below directory `path` down to `depth` levels (1: its children), links never followed, in
        sorted order per directory; OSError(E2BIG) past `limit` entries."""
        top = self.open(path, os.O_RDONLY | os.O_DIRECTORY)
        found: list[Entry] = []
        try:
            for _, _, entry in walk_fd(top, path, depth, skip_devices=self._fenced):
                found.append(entry)
                if len(found) > limit:
                    raise OSError(errno.E2BIG, f"more than {limit} entries", path)
        finally:
            os.close(top)
        return found

    def copy_in(self, host_dir: str, path: str) -> None:
        """Copy a trusted host directory (a shared cache) to `path` in the sandbox, as the sandbox's own files;
        nothing is overwritten."""
        for dirpath, dirnames, filenames in os.walk(host_dir):
            relative = os.path.relpath(dirpath, host_dir)
            target = path if relative == "." else f"{path}/{relative}"
            self.makedirs(target)
            dirnames.sort()
            for name in sorted(filenames):
                source = os.path.join(dirpath, name)
                if not os.path.isfile(source) or os.path.islink(source):
                    continue
                with open(source, "rb") as handle:
                    self.write_new(f"{target}/{name}", handle.read())


class OwnedFd:
    """An fd used by work on threads: `close` waits for the last use to finish, so that a cancelled caller can never
    leave a thread working on a number that was closed and then reused for something else."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._users = 0
        self._closing = False

    async def use(self, runner: Callable[..., Any], function: Callable[..., T], *args: Any) -> T:
        """`await runner(function, fd, *args)` (e.g. `tree.run`, `asyncio.to_thread`), safe to cancel."""
        if self._closing:
            raise OSError(errno.EBADF, "the file was closed")
        self._users += 1
        future = asyncio.ensure_future(runner(function, self.fd, *args))
        future.add_done_callback(self._done)
        result: T = await asyncio.shield(future)
        return result

    def _done(self, _: Any) -> None:
        self._users -= 1
        if self._closing and not self._users:
            os.close(self.fd)

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            if not self._users:
                os.close(self.fd)


def walk_fd(
    top: int, path: str, depth: int, *, max_open: int = MAX_OPEN_DEPTH, skip_devices: frozenset[int] = frozenset()
) -> Iterator[tuple[int, str, Entry]]:
    """(fd of its directory, name, entry) for everything below the directory open at `top` (named `path`), each
    directory's names sorted, never following links, at most `depth` levels and `max_open` directories open, not
    descending into directories on `skip_devices`."""
    depth = min(depth, max_open)
    stack: list[tuple[int, str, Iterator[str]]] = [(top, path.rstrip("/"), iter(sorted(os.listdir(top))))]
    try:
        while stack:
            fd, prefix, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                if fd != top:
                    os.close(fd)
                continue
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while we looked
            child = f"{prefix}/{name}"
            yield fd, name, Entry(child, info)
            if stat.S_ISDIR(info.st_mode) and len(stack) < depth and info.st_dev not in skip_devices:
                try:
                    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except OSError:
                    continue  # replaced by a link or removed meanwhile, or unreadable
                try:
                    names_below = iter(sorted(os.listdir(sub)))
                except OSError:
                    os.close(sub)
                    continue
                stack.append((sub, child, names_below))
    finally:
        for fd, _, _ in stack:
            if fd != top:
                os.close(fd)


def remove_path(path: str | os.PathLike[str]) -> None:
    """Remove a host path the server owns (a sandbox's whole directory, say), fd-relative and of any depth; a
    missing path is fine."""
    parent, name = os.path.split(os.path.abspath(path))
    fd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        remove_entry(fd, name)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def remove_entry(dir_fd: int, name: str, *, max_passes: int = 100_000) -> None:
    """Remove `name` in `dir_fd`, a whole tree if it is a directory: iterative and fd-relative, never following a
    link, with at most MAX_OPEN_DEPTH directories open (deeper ones are moved up into the top directory first)."""
    info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(info.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    top = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        for _ in range(max_passes):
            if not _empty_pass(top, info.st_dev):
                break
        else:
            raise OSError(errno.ENOTEMPTY, "the directory kept changing while it was removed", name)
    finally:
        os.close(top)
    os.rmdir(name, dir_fd=dir_fd)


def _empty_pass(top: int, device: int) -> bool:
    """One pass emptying the directory open at `top`; True if something was left (moved up) for another pass.
    Nothing on another file system than `device` is entered (a mount point is EBUSY, never emptied)."""
    stack: list[tuple[int, Iterator[str], int, str]] = [(top, iter(os.listdir(top)), -1, "")]
    again = False
    try:
        while stack:
            fd, names, parent_fd, name_in_parent = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                if fd != top:
                    os.close(fd)
                    try:
                        os.rmdir(name_in_parent, dir_fd=parent_fd)
                    except FileNotFoundError:
                        pass
                    except OSError as exc:  # something appeared meanwhile: the next pass deals with it
                        if exc.errno != errno.ENOTEMPTY:
                            raise
                        again = True
                continue
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISDIR(info.st_mode):
                    os.unlink(name, dir_fd=fd)
                elif info.st_dev != device:
                    raise OSError(errno.EBUSY, "a file system is mounted there", name)
                elif len(stack) >= MAX_OPEN_DEPTH:
                    os.rename(name, f".scalebox-rm-{secrets.token_hex(8)}", src_dir_fd=fd, dst_dir_fd=top)
                    again = True
                else:
                    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                    try:
                        stack.append((sub, iter(os.listdir(sub)), fd, name))
                    except BaseException:
                        os.close(sub)
                        raise
            except FileNotFoundError:
                continue
    finally:
        for fd, _, _, _ in stack:
            if fd != top:
                os.close(fd)
    return again or bool(os.listdir(top))
