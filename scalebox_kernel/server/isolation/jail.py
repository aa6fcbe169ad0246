"""One sandbox's jail: a bubblewrap "holder" process owns its namespaces, and every kernel and command enters them.

The holder is started once per sandbox (as root, so it may mount anything; its one task drops to the sandbox's
uid and sleeps). Each process of the sandbox is then launched on the host as

    sh -c 'echo $$ > <each cgroup.procs>; exec "$@"'                    # join the sandbox's cgroups
      env --ignore-signal=INT nsenter --target <holder> --mount --pid ...  # enter its namespaces (SIGINT-proof)
        setpriv --reuid U ... --no-new-privs --                            # drop to the sandbox's uid
          env -i --default-signal=INT -C <cwd> K=V... <argv>               # the real program, its env, SIGINT back

with a clean environment until the privileges are gone (LD_PRELOAD in a sandbox's envs must not reach a root
process), so one PID namespace, one network namespace and one loopback serve every process of the sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cgroups import Limits, SandboxCgroups, Usage
from .detect import Capabilities
from .layout import (
    HOME,
    RESERVED,
    SANDBOX_RELAY,
    SANDBOX_RUN,
    SYSTEM_DIRS,
    Identity,
    allocate_identity,
    own_tree,
    prepare_root,
    runtime_paths,
    write_etc,
)

#: PATH of the privileged part of the launch chain (never the sandbox's PATH).
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SLIRP_NAMESERVER = "10.0.2.3"
#: Short host paths to sandboxes' runtime directories: a unix socket path must fit in 108 bytes.
LINKS_DIR = Path("/run/scalebox-local")
START_TIMEOUT = 10.0
RELAY_SOURCE = Path(__file__).with_name("relay.py")


class JailError(RuntimeError):
    """The sandbox's jail could not be set up or entered."""


@dataclass(frozen=True)
class JailOptions:
    """How one sandbox is confined."""

    limits: Limits = field(default_factory=Limits)
    internet: bool = True
    uid_base: int = 600_000
    uid_count: int = 65_536
    runtime: tuple[str, ...] = ()  # extra host directories the kernels need (bound read-only)
    #: (host directory, sandbox directory): shared caches copied into the sandbox when it first starts, so that
    #: environment values naming the host directory work inside (each sandbox writes only its own copy).
    seeds: tuple[tuple[str, str], ...] = ()


class Jail:
    """Namespaces, uid and cgroups of one sandbox; `wrap()` turns a command line into one that runs inside."""

    def __init__(self, caps: Capabilities, *, sandbox_id: str, root: Path, private_dir: Path, options: JailOptions):
        if not caps.namespaces:
            raise JailError("this machine cannot confine sandboxes: " + "; ".join(caps.problems))
        self.caps = caps
        self.sandbox_id = sandbox_id
        self.root = Path(root)
        self.private_dir = Path(private_dir)
        self.run_dir = self.private_dir / "runtime"  # the sandbox's /run/scalebox
        self.link_dir = LINKS_DIR / sandbox_id  # symlink to run_dir, for socket paths the host connects to
        self.options = options
        self.cgroups = SandboxCgroups(caps.cgroups, sandbox_id) if caps.cgroups.v1 or caps.cgroups.v2 else None
        self.identity: Identity | None = None
        self.network = "none" if not options.internet else ("private" if caps.private_network else "host")
        self._holder: asyncio.subprocess.Process | None = None
        self._holder_pid = 0  # host pid of the namespaces' init (bwrap's pid 1)
        self._namespaces: dict[str, int] = {}
        self._slirp: asyncio.subprocess.Process | None = None
        self._slirp_exit_fd: int | None = None
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ lifetime

    async def start(self) -> None:
        """Prepare the tree, uid and cgroups, and start the holder (and its network); idempotent."""
        async with self._lock:
            if self.running:
                return
            await self._stop_processes()
            identity, new = allocate_identity(
                self.private_dir, base=self.options.uid_base, count=self.options.uid_count
            )
            self.identity = identity
            runtime = runtime_paths(self.options.runtime)
            mounts = await asyncio.to_thread(prepare_root, self.root, runtime)
            await asyncio.to_thread(own_tree, self.root, identity, recursive=new)
            await asyncio.to_thread(self._copy_seeds)
            self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chown(self.run_dir, identity.uid, identity.gid)
            os.chmod(self.run_dir, 0o700)
            self._link_run_dir()
            nameserver = SLIRP_NAMESERVER if self.network == "private" else None
            etc = write_etc(self.private_dir / "etc", identity, self.sandbox_id, nameserver=nameserver)
            if self.cgroups is not None:
                await self.cgroups.create(self.options.limits)
            await self._start_holder(mounts, etc)
            if self.network == "private":
                await self._start_slirp()

    @property
    def running(self) -> bool:
        """Whether the holder (and so the sandbox's namespaces) is alive."""
        if self._holder is None or self._holder.returncode is not None or not self._holder_pid:
            return False
        with contextlib.suppress(OSError):
            return os.stat(f"/proc/{self._holder_pid}/ns/pid").st_ino == self._namespaces.get("pid-namespace")
        return False

    def _bwrap_argv(self, mounts: list[tuple[str, str]], etc: dict[str, Path], info_fd: int) -> list[str]:
        assert self.caps.bwrap is not None and self.identity is not None
        argv = [self.caps.bwrap, "--info-fd", str(info_fd), "--die-with-parent"]
        argv += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        if self.network != "host":
            argv.append("--unshare-net")
        argv += ["--hostname", self.sandbox_id, "--bind", str(self.root), "/"]
        for kind, path in mounts:
            if kind == "ro":
                argv += ["--ro-bind", path, path]
        for name, host in etc.items():
            if Path("/etc", name).exists():
                argv += ["--ro-bind", str(host), f"/etc/{name}"]
        argv += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/dev/shm"]
        argv += ["--bind", str(self.run_dir), SANDBOX_RUN, "--ro-bind", str(RELAY_SOURCE), SANDBOX_RELAY]
        argv += ["--chdir", HOME, "--"]
        # The one task of the holder: tell the server the mounts are in place, then wait as the sandbox's uid.
        argv += [*self._drop_privileges(), "/bin/sh", "-c", "echo ready; exec sleep infinity"]
        return argv

    def _drop_privileges(self) -> list[str]:
        assert self.identity is not None and self.caps.tools["setpriv"] is not None
        uid, gid = self.identity.uid, self.identity.gid
        return [
            self.caps.tools["setpriv"],
            f"--reuid={uid}",
            f"--regid={gid}",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            "--",
        ]

    def _join_cgroups(self, argv: list[str]) -> list[str]:
        """Prefix argv with a shell that moves itself into the sandbox's cgroups before exec'ing argv."""
        if self.cgroups is None:
            return argv
        files = " ".join(shlex.quote(str(path)) for path in self.cgroups.procs_files)
        script = f'for f in {files}; do echo $$ > "$f" || exit 125; done; exec "$@"'
        return ["/bin/sh", "-c", script, "scalebox-jail", *argv]

    def _copy_seeds(self) -> None:
        for host, inside in self.options.seeds:
            target = self.root / inside.lstrip("/")
            if not Path(host).is_dir() or os.path.lexists(target):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(host, target, symlinks=True)
            self.own_created(target.parent)
            for dirpath, dirnames, filenames in os.walk(target):
                for name in [".", *dirnames, *filenames]:
                    self.own(os.path.join(dirpath, name))

    def _link_run_dir(self) -> None:
        LINKS_DIR.mkdir(mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(self.link_dir) == str(self.run_dir):
                return
            self.link_dir.unlink()
        self.link_dir.symlink_to(self.run_dir)

    async def _start_holder(self, mounts: list[tuple[str, str]], etc: dict[str, Path]) -> None:
        info_read, info_write = os.pipe()
        log_path = self.private_dir / "jail.log"
        try:
            with open(log_path, "ab") as log:
                self._holder = await asyncio.create_subprocess_exec(
                    *self._join_cgroups(self._bwrap_argv(mounts, etc, info_write)),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log,
                    env={"PATH": SYSTEM_PATH},
                    pass_fds=(info_write,),
                    start_new_session=True,
                )
            os.close(info_write)
            info_write = -1
            info = await asyncio.wait_for(asyncio.to_thread(_read_all, info_read), START_TIMEOUT)
            assert self._holder.stdout is not None
            ready = await asyncio.wait_for(self._holder.stdout.readline(), START_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            await self._stop_processes()
            raise JailError(f"the sandbox's namespaces did not start: {exc}") from None
        finally:
            os.close(info_read)
            if info_write >= 0:
                os.close(info_write)
        if not info or ready.strip() != b"ready":
            await self._stop_processes()
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise JailError("the sandbox's namespaces did not start: " + (" / ".join(tail) or "bwrap failed"))
        self._namespaces = json.loads(info)
        self._holder_pid = int(self._namespaces["child-pid"])

    async def _start_slirp(self) -> None:
        """Connect the sandbox's network namespace to the outside through slirp4netns (no host loopback)."""
        slirp = self.caps.tools["slirp4netns"]
        assert slirp is not None
        ready_read, ready_write = os.pipe()
        exit_read, exit_write = os.pipe()
        argv = [slirp, "--configure", "--mtu=65520", "--disable-host-loopback", "--enable-sandbox", "--enable-seccomp"]
        argv += [f"--ready-fd={ready_write}", f"--exit-fd={exit_read}", str(self._holder_pid), "tap0"]
        try:
            with open(self.private_dir / "jail.log", "ab") as log:
                self._slirp = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env={"PATH": SYSTEM_PATH},
                    pass_fds=(ready_write, exit_read),
                    start_new_session=True,
                )
            os.close(ready_write)
            ready_write = -1
            self._slirp_exit_fd = exit_write
            exit_write = -1
            ready = await asyncio.wait_for(asyncio.to_thread(os.read, ready_read, 1), START_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            raise JailError(f"the sandbox's network did not start: {exc}") from None
        finally:
            for fd in (ready_read, ready_write, exit_read, exit_write):
                if fd >= 0:
                    os.close(fd)
        if not ready:
            raise JailError("the sandbox's network did not start (see jail.log in its private directory)")

    async def stop(self) -> None:
        """Kill every process of the sandbox, its holder and network, and remove its cgroups (files stay)."""
        async with self._lock:
            await self._stop_processes()
            if self.cgroups is not None:
                await self.cgroups.remove()
            with contextlib.suppress(OSError):
                self.link_dir.unlink()

    async def _stop_processes(self) -> None:
        if self.cgroups is not None:
            await self.cgroups.kill_all()
        for process in (self._holder, self._slirp):
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._slirp_exit_fd is not None:
            os.close(self._slirp_exit_fd)
            self._slirp_exit_fd = None
        self._holder = self._slirp = None
        self._holder_pid = 0

    # ------------------------------------------------------------------ processes

    def wrap(self, argv: Sequence[str], *, env: Mapping[str, str], cwd: str) -> tuple[list[str], dict[str, str]]:
        """(host argv, host env) that run `argv` inside the sandbox as its uid, in sandbox directory `cwd`, with
        exactly `env` (host paths into the sandbox's tree turned into its own). A SIGINT to the new process group
        reaches only `argv`."""
        if not self.running:
            raise JailError(f"sandbox {self.sandbox_id} is not running (its namespaces are gone)")
        if not argv or "=" in argv[0]:
            raise JailError(f"cannot run {argv[:1]!r} in a sandbox: the program name must not contain '='")
        tools = self.caps.tools
        assert tools["env"] is not None and tools["nsenter"] is not None
        enter = [tools["env"], "--ignore-signal=INT", tools["nsenter"], f"--target={self._holder_pid}"]
        enter += ["--mount", "--pid", "--net", "--ipc", "--uts"]
        if "cgroup-namespace" in self._namespaces:
            enter.append("--cgroup")
        enter += ["--root", "--wd"]
        variables = [f"{name}={self.sandbox_value(value)}" for name, value in env.items() if name and "=" not in name]
        final = [tools["env"], "-i", "--default-signal=INT", f"--chdir={cwd}", *variables, *argv]
        host_env = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"}
        return self._join_cgroups(enter + self._drop_privileges() + final), host_env

    def sandbox_path(self, host: Path | str) -> str:
        """The path inside the sandbox of a host path in its tree or its private runtime directory."""
        host = Path(os.path.abspath(host))
        for run_dir in (self.run_dir, self.link_dir):
            if host.is_relative_to(run_dir):
                return (Path(SANDBOX_RUN) / host.relative_to(run_dir)).as_posix()
        if host.is_relative_to(self.root):
            return "/" + host.relative_to(self.root).as_posix() if host != self.root else "/"
        raise JailError(f"{host} is not visible inside sandbox {self.sandbox_id}")

    def sandbox_value(self, value: str) -> str:
        """An environment value with every host path into the sandbox turned into the path it has inside, wherever
        it appears (PATH-style lists, `-Duser.home=...` in JVM options)."""
        mapping = [(self.run_dir, SANDBOX_RUN), (self.link_dir, SANDBOX_RUN), (self.root, "")]
        mapping += [(Path(host), inside) for host, inside in self.options.seeds]
        for host, inside in mapping:
            prefix = re.escape(str(host))
            value = re.sub(prefix + "(?=/)", inside, value)  # host/a -> inside/a
            value = re.sub(prefix + r"(?=$|[:;,'\"\s])", inside or "/", value)  # the directory itself
        return value

    def host_view(self, sandbox_path: str) -> Path:
        """Where a path inside the sandbox is on the host (system and runtime mounts, or the tree)."""
        path = Path(os.path.normpath("/" + sandbox_path.lstrip("/")))
        if path.is_relative_to(SANDBOX_RUN):
            return self.run_dir / path.relative_to(SANDBOX_RUN)
        mounted = [Path(p) for p in SYSTEM_DIRS] + runtime_paths(self.options.runtime)
        if any(path.is_relative_to(m) for m in mounted):
            return path
        return self.root / path.relative_to("/")

    def has_program(self, program: str, path_env: str) -> bool:
        """Whether `program` (a path, or a name looked up on the sandbox's PATH) exists inside the sandbox."""
        if "/" in program:
            candidates = [program if program.startswith("/") else f"{HOME}/{program}"]
        else:
            directories = [self.sandbox_value(d) for d in path_env.split(os.pathsep) if d.startswith("/")]
            candidates = [f"{d.rstrip('/')}/{program}" for d in directories]
        return any(os.path.exists(self.host_view(c)) for c in candidates)

    def own_created(self, path: Path) -> None:
        """chown `path`, and the directories above it that the server made (still root's), to the sandbox."""
        if self.identity is None:
            return
        current = path
        while current != self.root and current.is_relative_to(self.root):
            if current.parent == self.root and current.name in RESERVED:
                break
            info = os.lstat(current)
            if current != path and info.st_uid != 0:
                break
            os.chown(current, self.identity.uid, self.identity.gid, follow_symlinks=False)
            current = current.parent

    def own(self, path: Path | str, mode: int | None = None) -> None:
        """Hand a host file or directory (written by the server) to the sandbox's uid."""
        if self.identity is not None:
            os.chown(path, self.identity.uid, self.identity.gid, follow_symlinks=False)
        if mode is not None:
            os.chmod(path, mode)

    # ------------------------------------------------------------------ pause and usage

    @property
    def can_freeze(self) -> bool:
        return self.cgroups is not None and self.cgroups.can_freeze

    async def freeze(self) -> None:
        """Stop every process of the sandbox where it stands; memory is kept."""
        if self.cgroups is None or not self.cgroups.can_freeze:
            raise JailError("no cgroup freezer on this machine")
        await self.cgroups.freeze()

    async def thaw(self) -> None:
        if self.cgroups is not None and self.cgroups.can_freeze:
            await self.cgroups.thaw()

    def usage(self) -> Usage | None:
        return self.cgroups.usage() if self.cgroups is not None else None

    def oom_kills(self) -> int:
        return self.cgroups.oom_kills() if self.cgroups is not None else 0

    def info(self) -> dict[str, Any]:
        """What confines this sandbox, for get_info's `isolation` field."""
        missing = [m for m in self.caps.missing() if not (m == "private-network" and self.network == "none")]
        enforced = self.cgroups.enforced() if self.cgroups is not None else {}
        wanted = self.options.limits
        for name, value in (("memory_mb", wanted.memory_mb), ("cpu_count", wanted.cpu_count)):
            if value is not None and name not in enforced and f"{name}-unenforced" not in missing:
                missing.append(f"{name}-unenforced")
        return {
            "mode": "bwrap",
            "uid": self.identity.uid if self.identity else None,
            "namespaces": ["mount", "pid", "ipc", "uts", "cgroup"] + ([] if self.network == "host" else ["net"]),
            "network": self.network,
            "limits": enforced,
            "cgroups": self.caps.cgroups.version,
            "pause": "freezer" if self.can_freeze else "sigstop",
            "missing": missing,
        }


def _read_all(fd: int) -> bytes:
    """Everything written to a pipe until its writers close it (blocking; run in a thread)."""
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)
