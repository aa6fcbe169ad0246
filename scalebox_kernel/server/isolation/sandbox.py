"""What a sandbox's agent needs from isolation: a jail when this server confines sandboxes, else a plain host run.

The agent asks one `SandboxIsolation` to start and stop, to pause and resume (the freezer, when there is one),
to turn a command or kernel launch into a jailed one, and what to report in get_info; it never needs to know
which of these protections this machine actually has.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import socket
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jupyter_client.manager import AsyncKernelManager

from ..settings import ServerSettings
from .buckets import Bucket, Credentials, fuse_problem
from .cgroups import Limits, Usage
from .detect import Capabilities, capabilities
from .jail import Jail, JailError, JailOptions
from .layout import HOME
from .tree import SandboxTree

#: The data dir's directory of disk images formatted ahead (root-only, beside the sandboxes' own directories).
SPARE_DISKS = "disk-spares"

NONE_NOTE = (
    "kernels and commands run on the host as the server's user; only the file APIs are confined to the "
    "sandbox's directory"
)


def server_capabilities(settings: ServerSettings) -> Capabilities | None:
    """This machine's sandboxing capabilities, or None when isolation is turned off in the settings."""
    return None if settings.isolation == "none" else capabilities()


def describe(settings: ServerSettings) -> str:
    """One line for `jupyter scalebox serve`: the isolation sandboxes get here and what is missing."""
    caps = server_capabilities(settings)
    if caps is None:
        return "isolation: none (turned off with --no-isolation); " + NONE_NOTE
    return caps.summary()


def object_storage_problem(settings: ServerSettings) -> str | None:
    """Why sandboxes of this server cannot have buckets mounted, or None."""
    caps = server_capabilities(settings)
    if caps is None or not caps.namespaces:
        return "object storage mounts need the sandbox's own namespaces, and this server runs sandboxes unconfined"
    return fuse_problem()


def describe_object_storage(settings: ServerSettings) -> str:
    """One line for `jupyter scalebox serve`: whether buckets can be mounted into sandboxes here."""
    problem = object_storage_problem(settings)
    return "object storage: " + ("s3fs mounts (object_storage on create)" if problem is None else f"off; {problem}")


def none_info(settings: ServerSettings) -> dict[str, Any]:
    """get_info's `isolation` for a sandbox that runs unconfined, with the reasons."""
    caps = server_capabilities(settings)
    reasons = ["turned off with --no-isolation"] if caps is None else list(caps.problems)
    missing = ["namespaces", "network", "uid", "memory-limit", "process-limit", "cpu-limit", "freezer", "disk-limit"]
    return {"mode": "none", "missing": missing, "reasons": reasons, "note": NONE_NOTE}


class SandboxIsolation:
    """The isolation of one sandbox: a `Jail` when the server confines sandboxes, otherwise nothing."""

    def __init__(
        self,
        settings: ServerSettings,
        *,
        sandbox_id: str,
        root: Path,
        private_dir: Path,
        memory_mb: int | None = None,
        cpu_count: float | None = None,
        disk_mb: int | None = None,
        internet: bool = True,
        runtime: Sequence[str] = (),
        buckets: Sequence[Bucket] = (),
        credentials: Sequence[Credentials] = (),
    ) -> None:
        self.settings = settings
        #: The only way the server touches the sandbox's files (as its uid, when it has one).
        self.tree = SandboxTree(root)
        #: Root-only, beside the tree: kernels' connection files (their keys) and logs.
        self.kernel_dir = Path(private_dir) / "kernels"
        caps = server_capabilities(settings)
        self.jail: Jail | None = None
        if caps is not None and caps.namespaces:
            limits = Limits(memory_mb=memory_mb, cpu_count=cpu_count, processes=settings.max_processes or None)
            options = JailOptions(
                limits=limits,
                internet=internet,
                allow_private_networks=settings.allow_private_networks,
                disk_mb=disk_mb if disk_mb is not None else (settings.disk_mb or None),
                uid_base=settings.sandbox_uid_base,
                runtime=tuple(runtime),
                seeds=((str(settings.cache_dir), f"{HOME}/.cache/scalebox"),),  # matplotlib's font cache
                buckets=tuple(buckets),
                spare_disks=settings.data_path / SPARE_DISKS,
            )
            self.jail = Jail(
                caps,
                sandbox_id=sandbox_id,
                root=root,
                private_dir=private_dir,
                options=options,
                tree=self.tree,
                credentials=credentials,
            )
        self._oom_seen = 0
        self._port_sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        #: Set by `close_ports` (pause, stop), cleared by `thaw`; `_ports_epoch` counts the closings, so that a
        #: connection made across one (in flight while it happened) is ended too.
        self._ports_closed = False
        self._ports_epoch = 0

    @property
    def active(self) -> bool:
        return self.jail is not None

    @property
    def memory_mb(self) -> int | None:
        return self.jail.options.limits.memory_mb if self.jail is not None else None

    @property
    def cpu_count(self) -> float | None:
        return self.jail.options.limits.cpu_count if self.jail is not None else None

    @property
    def running(self) -> bool:
        """Whether its namespaces are alive (always, for an unconfined sandbox)."""
        return self.jail is None or self.jail.running

    def set_limits(self, *, memory_mb: int | None, cpu_count: float | None) -> None:
        """Change the memory and CPU limits of a running sandbox (a pooled one, taken for a create)."""
        if self.jail is None:
            return
        limits = dataclasses.replace(self.jail.options.limits, memory_mb=memory_mb, cpu_count=cpu_count)
        self.jail.options = dataclasses.replace(self.jail.options, limits=limits)
        if self.jail.cgroups is not None:
            self.jail.cgroups.set_limits(limits)

    def set_background(self, background: bool) -> None:
        """CPU only when sandboxes in use leave some (while the sandbox starts or waits in the warm pool), or as
        much as any; may be called before `start`."""
        if self.jail is not None and self.jail.cgroups is not None:
            self.jail.cgroups.set_background(background)

    async def start(self, *, with_network: bool = True) -> None:
        """Start the sandbox's namespaces; `with_network=False` leaves its network to `start_network`."""
        self.kernel_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.kernel_dir, 0o700)
        if self.jail is not None:
            await self.jail.start(with_network=with_network)
            self._oom_seen = self.jail.oom_kills()

    async def start_network(self) -> None:
        """The network that `start(with_network=False)` left for later (nothing when it is up, or there is none)."""
        if self.jail is not None:
            await self.jail.start_network()

    async def stop(self) -> None:
        self.close_ports()
        if self.jail is not None:
            await self.jail.stop()
        self.tree.close()

    def release(self) -> None:
        """The sandbox is gone for good (killed or expired): give back what it held on this machine (its uid)."""
        if self.jail is not None:
            self.jail.release()

    @property
    def spill_dir(self) -> Path:
        """Where a stream's output waits for a slow client: on the sandbox's own disk (root-only, out of its
        sight) when it has one, so that it counts against its disk limit; else beside the tree."""
        if self.jail is not None and self.disk_limit_mb():
            return self.jail.host_dir
        return self.kernel_dir

    def disk_limit_mb(self) -> int | None:
        """The disk limit this sandbox will have (None where nothing can enforce one)."""
        jail = self.jail
        if jail is None or jail.disk is None or jail.disk_problem is not None:
            return None
        return jail.disk.size_mb

    def disk_usage(self) -> tuple[int, int] | None:
        """(total, used) bytes of the sandbox's disk, when it has a limit."""
        return self.jail.disk_usage() if self.jail is not None else None

    def info(self) -> dict[str, Any]:
        return self.jail.info() if self.jail is not None else none_info(self.settings)

    def buckets(self) -> list[dict[str, Any]]:
        """Each object storage mount: its uri, mount point and whether it is mounted (and if not, why)."""
        return [mount.status() for mount in self.jail.buckets] if self.jail is not None else []

    # ------------------------------------------------------------------ pause

    async def freeze(self) -> None:
        """Freeze every process of the sandbox, where there is a freezer (the agent SIGSTOPs what it started too),
        and end the server's connections to its ports."""
        self.close_ports()
        if self.jail is not None and self.jail.can_freeze:
            await self.jail.freeze()

    async def thaw(self) -> None:
        if self.jail is not None and self.jail.can_freeze:
            await self.jail.thaw()
        self._ports_closed = False

    # ------------------------------------------------------------------ ports

    async def connect_port(self, port: int, timeout: float) -> socket.socket:
        """A connected, non-blocking TCP socket to `port` on the sandbox's own loopback (127.0.0.1, else ::1),
        made by the server. Unconfined, that is the host's loopback, where nothing separates sandboxes' ports.
        ConnectionRefusedError when nothing listens there; TimeoutError after `timeout` seconds; JailError while
        the ports are closed (the sandbox pauses or stops), also for a connection that was under way then."""
        loop = asyncio.get_running_loop()
        first: OSError | None = None
        epoch = self._ports_epoch
        self._check_ports_open(epoch)
        async with asyncio.timeout(timeout):
            for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                if self.jail is not None:
                    sock = await self.jail.tcp_socket(family)
                else:
                    sock = socket.socket(family, socket.SOCK_STREAM)
                    sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, (address, port))
                except OSError as exc:  # refused on 127.0.0.1: a server may listen on ::1 only (`localhost`)
                    sock.close()
                    first = first or exc
                    continue
                except BaseException:
                    sock.close()
                    raise
                try:
                    self._check_ports_open(epoch)  # close_ports ran meanwhile: this one must not outlive it
                except JailError:
                    sock.close()
                    raise
                self._port_sockets.add(sock)
                return sock
        assert first is not None
        raise first

    def _check_ports_open(self, epoch: int) -> None:
        if self._ports_closed or epoch != self._ports_epoch:
            raise JailError("the sandbox is pausing or stopping: its ports take no connections until it runs again")

    def close_ports(self) -> None:
        """End every connection `connect_port` made (the sandbox stops or pauses), and refuse new ones until
        `thaw`: their users see the end of the stream. The sockets themselves stay open until their users close
        them."""
        self._ports_closed = True
        self._ports_epoch += 1
        for sock in list(self._port_sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # ------------------------------------------------------------------ launching

    async def ensure_running(self) -> None:
        """Restart the sandbox's namespaces if they died (their processes died with them)."""
        if self.jail is not None and not self.jail.running:
            await self.jail.start()

    async def command(
        self, argv: Sequence[str], env: Mapping[str, str], cwd: Path
    ) -> tuple[list[str], dict[str, str], Path]:
        """(argv, env, cwd) that run a command inside the sandbox (unchanged when it is not confined); a program
        the sandbox does not have is FileNotFoundError, as it would be for a plain exec."""
        if self.jail is None:
            return list(argv), dict(env), cwd
        await self.ensure_running()
        if not argv or not await self.tree.run(self.jail.has_program, argv[0], env.get("PATH", "")):
            program = argv[0] if argv else ""
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
        host_argv, host_env = self.jail.wrap(argv, env=env, cwd=self.jail.sandbox_path(cwd))
        return host_argv, host_env, self.jail.root

    def kernel_manager(self, *, relay: bool, cwd: Path, **kwargs: Any) -> AsyncKernelManager:
        """An AsyncKernelManager for one kernel (jailed and over IPC when the sandbox is confined)."""
        if self.jail is None:
            return AsyncKernelManager(transport="tcp", ip="127.0.0.1", **kwargs)
        from .kernels import JailedKernelManager

        return JailedKernelManager(jail=self.jail, relay=relay, sandbox_cwd=self.jail.sandbox_path(cwd), **kwargs)

    def sandbox_path(self, host: Path | str) -> str:
        """The sandbox's own path for a host path in its tree."""
        return self.jail.sandbox_path(host) if self.jail is not None else self.tree.sandbox_path(host)

    async def make_dirs_in(self, env: Mapping[str, str]) -> None:
        """Make the directories an environment names inside the sandbox (package targets, which must exist
        before the kernel starts to be looked at), as the sandbox's own."""
        root = Path(self.tree.host_root)
        for name in ("PYTHONPATH", "PIP_TARGET", "R_LIBS_USER"):
            for part in env.get(name, "").split(os.pathsep):
                if part.startswith("/") and Path(part).is_relative_to(root):
                    with contextlib.suppress(OSError):  # the sandbox broke that place itself: pip will say so
                        await self.tree.run(self.tree.makedirs, self.sandbox_path(part))

    # ------------------------------------------------------------------ limits

    def usage(self) -> Usage | None:
        """The sandbox's cgroup counters (CPU time, memory), when it has cgroups."""
        return self.jail.usage() if self.jail is not None else None

    def out_of_memory(self) -> str | None:
        """A message when the OOM killer struck since the last call (the kernel or a command hit the limit)."""
        if self.jail is None:
            return None
        kills = self.jail.oom_kills()
        if kills <= self._oom_seen:
            return None
        self._oom_seen = kills
        limit = self.jail.options.limits.memory_mb
        return f"the sandbox ran out of memory (limit {limit} MiB)" if limit else "the sandbox ran out of memory"
