"""One sandbox's jail: a bubblewrap "holder" process owns its namespaces, and every kernel and command enters them.

The holder is started once per sandbox (as root, so it may mount anything; its one task drops to the sandbox's
uid and sleeps). Each process of the sandbox is then launched on the host as

    sh -c 'echo $$ > <each cgroup.procs>; exec "$@"'                    # join the sandbox's cgroups
      env --ignore-signal=INT nsenter --mount=<fd> --pid=<fd> ...          # enter its namespaces (SIGINT-proof)
        setpriv --reuid U ... --no-new-privs --                            # drop to the sandbox's uid
          env --default-signal=INT -C <cwd> sh -c 'NAME="$__SCALEBOX_ENV_0"; export NAME; ...; exec "$@"' <argv>

The sandbox's environment never appears in an argv, and never reaches a privileged process under its own
name (LD_PRELOAD in a sandbox's envs must not reach a root process): each value travels as an inert
`__SCALEBOX_ENV_<n>` variable, and the last, unprivileged shell of the chain turns them back into their names,
drops everything else and execs the program. One PID namespace, one network namespace and one loopback serve
every process of the sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import re
import shlex
import site
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_config_path

from ..validation import ENV_NAME, RESERVED_ENV_PREFIX
from . import netns, network
from .buckets import (
    MOUNT_TIMEOUT,
    Bucket,
    BucketError,
    BucketMount,
    Credentials,
    mount_point_problem,
    prepare_mount_point,
)
from .cgroups import Limits, SandboxCgroups, Usage
from .detect import Capabilities
from .disk import DiskImage, can_limit_disk, spare_image
from .layout import HOME, HOST_ONLY, SANDBOX_RELAY, SANDBOX_RUN, own_tree, prepare_root, runtime_paths, write_etc
from .tools import SYSTEM_ENV, SYSTEM_PATH
from .tree import SandboxTree
from .uids import RECORD, Identity, claim, release

#: Short host paths to sandboxes' host-only socket directories: a unix socket path must fit in 108 bytes.
LINKS_DIR = Path("/run/scalebox-local")
#: A uid's keyrings outlive its processes (Linux keeps them with the uid), so a uid that passes from one sandbox to
#: the next would hand over what the first stored there. Its holder clears them first, as that uid: the persistent
#: keyring (KEYCTL_GET_PERSISTENT links it into @u), then @u and @us, and links @u into @us again, as the kernel
#: makes them, so that it stays possessed.
_KEYCTL = {"x86_64": 250, "aarch64": 219}.get(platform.machine())
_CLEAR_KEYRINGS = (
    f"import ctypes; c = ctypes.CDLL(None); p = c.syscall({_KEYCTL}, 22, -1, -4); "
    f"p > 0 and c.syscall({_KEYCTL}, 7, p); [c.syscall({_KEYCTL}, 7, r) for r in (-4, -5)]; "
    f"c.syscall({_KEYCTL}, 8, -4, -5)"
    if _KEYCTL
    else ""
)
START_TIMEOUT = 10.0
#: (bwrap's info key, /proc/<pid>/ns file) of the namespaces a sandbox process enters, and nsenter's options.
NAMESPACES = (("mnt", "mnt"), ("pid", "pid"), ("net", "net"), ("ipc", "ipc"), ("uts", "uts"), ("cgroup", "cgroup"))
NSENTER = (("mount", "mnt"), ("pid", "pid"), ("net", "net"), ("ipc", "ipc"), ("uts", "uts"), ("cgroup", "cgroup"))
RELAY_SOURCE = Path(__file__).with_name("relay.py")


log = logging.getLogger("scalebox_kernel.server")


class JailError(RuntimeError):
    """The sandbox's jail could not be set up or entered."""


@dataclass(frozen=True)
class JailOptions:
    """How one sandbox is confined."""

    limits: Limits = field(default_factory=Limits)
    internet: bool = True
    allow_private_networks: bool = False  # the private ranges and the host's subnets (never the host itself)
    disk_mb: int | None = None  # the tree on a loop-mounted image of this size; None: no disk limit
    uid_base: int = 600_000
    uid_count: int = 65_536
    runtime: tuple[str, ...] = ()  # extra host directories the kernels need (bound read-only)
    #: (host directory, sandbox directory): shared caches copied into the sandbox when it first starts, so that
    #: environment values naming the host directory work inside (each sandbox writes only its own copy).
    seeds: tuple[tuple[str, str], ...] = ()
    #: Object storage mounts (buckets.py): mounted on the host at start, bound at their mount points.
    buckets: tuple[Bucket, ...] = ()
    #: Where a disk image is formatted ahead for the next sandbox (disk.SpareImage); None: each is made on its start.
    spare_disks: Path | None = None


class Jail:
    """Namespaces, uid and cgroups of one sandbox; `wrap()` turns a command line into one that runs inside."""

    def __init__(
        self,
        caps: Capabilities,
        *,
        sandbox_id: str,
        root: Path,
        private_dir: Path,
        options: JailOptions,
        tree: SandboxTree | None = None,
        credentials: Sequence[Credentials] = (),
    ):
        if not caps.namespaces:
            raise JailError("this machine cannot confine sandboxes: " + "; ".join(caps.problems))
        self.caps = caps
        self.sandbox_id = sandbox_id
        self.root = Path(root)
        self.private_dir = Path(private_dir)
        self.tree = tree or SandboxTree(self.root)
        self.run_dir = self.root / SANDBOX_RUN.lstrip("/")  # kernels' connection files and sockets (the sandbox's)
        self.host_dir = self.root / HOST_ONLY.lstrip("/")  # links to those sockets that only root can change
        self.link_dir = LINKS_DIR / sandbox_id  # symlink to host_dir, for socket paths the host connects to
        self.options = options
        self.cgroups = SandboxCgroups(caps.cgroups, sandbox_id) if caps.cgroups.v1 or caps.cgroups.v2 else None
        self.identity: Identity | None = None
        # Without slirp4netns a sandbox gets no network at all: sharing the host's would put the host in reach.
        self.network = "private" if options.internet and caps.private_network else "none"
        self.disk_problem = can_limit_disk() if options.disk_mb else "no disk limit was asked for"
        spares = spare_image(options.spare_disks) if options.spare_disks is not None else None
        self.disk = DiskImage(self.private_dir, self.root, options.disk_mb, spares) if options.disk_mb else None
        self._holder: asyncio.subprocess.Process | None = None
        self._holder_pid = 0  # host pid of the namespaces' init (bwrap's pid 1)
        self._namespaces: dict[str, int] = {}
        self._ns_fds: dict[str, int] = {}  # held-open namespace files of the holder, and its root
        self._net_sockets: netns.NamespaceSockets | None = None  # made on the first tcp_socket()
        self._slirp: asyncio.subprocess.Process | None = None
        self._slirp_exit_fd: int | None = None
        self._network_pending = False  # the holder runs, and its network is still to start (start_network)
        self._lock = asyncio.Lock()
        self._stopped = False  # stop() ran: this jail never starts again (a new one does, for a new agent)
        #: The uid was newly claimed and what its last sandbox left in its keyrings is not gone yet (a start that
        #: failed before they were emptied leaves this set for the next one).
        self._keyrings_to_clear = False
        self._clearing: asyncio.subprocess.Process | None = None  # the process that empties them
        self.buckets = [BucketMount(bucket, n, self.private_dir) for n, bucket in enumerate(options.buckets)]
        #: The keys of the buckets, given only when the sandbox is created: written to their private files at the
        #: first start, which fails if a bucket cannot be mounted (later starts go on without it, and say so).
        self._credentials = list(credentials)

    # ------------------------------------------------------------------ lifetime

    async def start(self, *, with_network: bool = True) -> None:
        """Claim the uid, mount the disk, prepare the tree and cgroups, start the holder and its network;
        idempotent. `with_network=False` leaves the network to `start_network` (a start overlaps it with a
        kernel's)."""
        async with self._lock:
            if self._stopped:  # a start that raced the sandbox's end (a kernel, a command, a port) must not revive it
                raise JailError(f"sandbox {self.sandbox_id} has stopped")
            if self.running:
                return
            await self._stop_processes()
            identity, new = await asyncio.to_thread(
                claim, self.private_dir / RECORD, base=self.options.uid_base, count=self.options.uid_count
            )
            self.identity = identity
            self.tree.set_identity(identity.uid, identity.gid)
            self._keyrings_to_clear = self._keyrings_to_clear or new
            if self.cgroups is not None:
                await self.cgroups.create(self.options.limits)
            await self._clear_keyrings()
            creating = bool(self._credentials)
            await self._mount_disk()
            runtime = runtime_paths(self.options.runtime)
            mounts = await asyncio.to_thread(prepare_root, self.root, runtime, identity)
            if new:
                await asyncio.to_thread(own_tree, self.root, identity)
            await self._mount_buckets(identity, creating)
            await self._bucket_points(mounts, identity, creating)
            self._link_host_dir()
            nameserver = network.SLIRP_NAMESERVER if self.network == "private" else None
            etc = write_etc(self.private_dir / "etc", identity, self.sandbox_id, nameserver=nameserver)
            await self._start_holder(mounts, etc)
            self._network_pending = self.network == "private"
            if with_network and self._network_pending:
                await self._start_network()
            await self._copy_seeds()

    async def _mount_disk(self) -> None:
        """Put the tree on its disk image, when a limit was asked for and this machine can enforce it."""
        if self.disk is None or self.disk_problem is not None:
            return
        if not self.disk.exists and self.root.is_dir() and any(self.root.iterdir()):
            self.disk_problem = "the sandbox was created before disk limits (its files are not on an image)"
            return
        await self.disk.mount()

    async def _mount_buckets(self, identity: Identity, creating: bool) -> None:
        """Mount the sandbox's buckets on the host (those not mounted yet). At creation a failure is the
        BucketError the create answers with; later (a restart, a resume) the sandbox starts without that bucket,
        and its get_info says why."""
        for mount, credentials in zip(self.buckets, self._credentials, strict=False):
            await asyncio.to_thread(mount.write_credentials, credentials)
        self._credentials = []
        deadline = time.monotonic() + MOUNT_TIMEOUT  # for all of them: a create is answered in time
        for index, mount in enumerate(self.buckets):
            try:
                # Files being written wait on the sandbox's own disk (its limit), where only root reaches them.
                await mount.mount(identity.uid, identity.gid, tmpdir=self.host_dir / f"s3fs-{index}", deadline=deadline)
            except OSError as exc:
                await self._bucket_failed(mount, exc, creating)

    async def _bucket_points(self, mounts: list[tuple[str, str]], identity: Identity, creating: bool) -> None:
        """The directories the buckets are bound on, made safely in the tree (nothing of the sandbox runs now)."""
        bound = [Path(path) for kind, path in mounts if kind == "ro"]
        for mount in self.buckets:
            if not mount.mounted:
                continue
            point = Path(mount.bucket.mount_point)
            try:
                problem = mount_point_problem(mount.bucket.mount_point)
                if problem:  # checked at create already; a record is never trusted with a mount
                    raise BucketError(0, problem)
                clash = next((b for b in bound if point.is_relative_to(b) or b.is_relative_to(point)), None)
                if clash is not None:
                    raise BucketError(0, f"the mount point {point} is over {clash}, which the sandbox needs")
                await asyncio.to_thread(prepare_mount_point, self.root, str(point), identity.uid, identity.gid)
            except OSError as exc:
                await mount.unmount()
                await self._bucket_failed(mount, exc, creating)

    async def _bucket_failed(self, mount: BucketMount, exc: OSError, creating: bool) -> None:
        why = exc.strerror or str(exc)
        if creating:
            where = f"{mount.bucket.uri} at {mount.bucket.mount_point}"
            raise BucketError(exc.errno or 0, f"{where}: {why}") from None
        mount.problem = why
        log.warning("sandbox %s: bucket %s is not mounted: %s", self.sandbox_id, mount.bucket.uri, why)

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
        argv += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--unshare-net"]
        argv += ["--hostname", self.sandbox_id, "--bind", str(self.root), "/"]
        for kind, path in mounts:
            if kind == "ro":
                argv += ["--ro-bind", path, path]
        for name, host in etc.items():
            if Path("/etc", name).exists():
                argv += ["--ro-bind", str(host), f"/etc/{name}"]
        for hidden in hidden_config_dirs(mounts):  # their files may hold API keys (jupyter_scalebox_config.py)
            argv += ["--tmpfs", hidden]
        for hidden in hidden_server_dirs(mounts, self.options.runtime):
            argv += ["--tmpfs", hidden]
        for mount in self.buckets:
            if mount.mounted:  # its mount point was made a real directory just before (_bucket_points)
                argv += ["--bind", str(mount.host_dir), mount.bucket.mount_point]
        argv += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/dev/shm"]
        argv += ["--ro-bind", str(RELAY_SOURCE), SANDBOX_RELAY]
        argv += ["--chdir", HOME, "--"]
        # The one task of the holder: tell the server the mounts are in place, then wait as the sandbox's uid.
        argv += [*self._drop_privileges(), "/bin/sh", "-c", "echo ready; exec sleep infinity"]
        return argv

    async def _clear_keyrings(self) -> None:
        """Empty the keyrings a newly claimed uid may have kept from its last sandbox: a process of that uid's own,
        in the sandbox's cgroups but on the host (no capabilities, nothing of any sandbox's), started as soon as
        the uid is claimed and waited for once the holder is up (`_keyrings_cleared`), before anything runs in the
        sandbox."""
        if not (self._keyrings_to_clear and _CLEAR_KEYRINGS and os.path.exists("/usr/bin/python3")):
            return
        clear = [*self._drop_privileges(), "/usr/bin/python3", "-I", "-S", "-c", _CLEAR_KEYRINGS]
        try:
            with open(self.private_dir / "jail.log", "ab") as log:
                self._clearing = await asyncio.create_subprocess_exec(
                    *self._join_cgroups(clear),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=log,
                    env={"PATH": SYSTEM_PATH},
                    cwd="/",
                    start_new_session=True,
                )
        except OSError as exc:
            raise JailError(f"the keyrings of sandbox {self.sandbox_id}'s uid could not be emptied: {exc}") from None

    async def _keyrings_cleared(self) -> bool:
        """Whether the keyrings were emptied (True when there was nothing to do); TimeoutError after START_TIMEOUT."""
        clearing, self._clearing = self._clearing, None
        if clearing is None:
            return True
        try:
            cleared = await asyncio.wait_for(clearing.wait(), START_TIMEOUT) == 0
        except BaseException:
            self._clearing = clearing  # killed by _stop_processes
            raise
        self._keyrings_to_clear = not cleared
        return cleared

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

    async def _copy_seeds(self) -> None:
        """Shared caches copied into the sandbox on its first start, as the sandbox's own files."""
        for host, inside in self.options.seeds:
            try:
                if Path(host).is_dir() and not await self.tree.run(self.tree.exists, inside, follow=False):
                    await self.tree.run(self.tree.copy_in, host, inside)
            except OSError as exc:  # the sandbox made that place unusable (a link to /etc, say): its loss only
                log.info("sandbox %s: no copy of the shared cache at %s: %s", self.sandbox_id, inside, exc.strerror)

    def _link_host_dir(self) -> None:
        LINKS_DIR.mkdir(mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(self.link_dir) == str(self.host_dir):
                return
            self.link_dir.unlink()
        self.link_dir.symlink_to(self.host_dir)

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
            cleared = await self._keyrings_cleared()
        except (OSError, TimeoutError) as exc:
            await self._stop_processes()
            raise JailError(f"the sandbox's namespaces did not start: {exc}") from None
        finally:
            os.close(info_read)
            if info_write >= 0:
                os.close(info_write)
        if not info or ready.strip() != b"ready" or not cleared:
            await self._stop_processes()
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            what = "bwrap failed" if cleared else "the keyrings of its uid could not be emptied"
            raise JailError("the sandbox's namespaces did not start: " + (" / ".join(tail) or what))
        self._namespaces = json.loads(info)
        self._holder_pid = int(self._namespaces["child-pid"])
        self._attach_root()
        self._pin_namespaces()

    def _pin_namespaces(self) -> None:
        """Hold the namespaces (and root) of the holder open: every process then enters them through these fds,
        never by the holder's pid, which could be another process's by the time it is used."""
        self._unpin_namespaces()
        for kind, nsfile in NAMESPACES:
            if f"{kind}-namespace" not in self._namespaces:
                continue
            fd = os.open(f"/proc/{self._holder_pid}/ns/{nsfile}", os.O_RDONLY | os.O_CLOEXEC)
            self._ns_fds[nsfile] = fd
            if os.fstat(fd).st_ino != self._namespaces[f"{kind}-namespace"]:
                self._unpin_namespaces()
                raise JailError(f"sandbox {self.sandbox_id}'s namespaces changed while it started")
        self._ns_fds["root"] = os.open(f"/proc/{self._holder_pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def _unpin_namespaces(self) -> None:
        if self._net_sockets is not None:
            self._net_sockets.close()
            self._net_sockets = None
        for fd in self._ns_fds.values():
            os.close(fd)
        self._ns_fds = {}

    def _attach_root(self) -> None:
        """Resolve sandbox paths against the jail's own `/` from now on (its mounts are what the sandbox sees)."""
        fd = os.open(f"/proc/{self._holder_pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        mine, theirs = os.stat(self.root), os.fstat(fd)
        if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
            os.close(fd)
            raise JailError(f"sandbox {self.sandbox_id}'s namespaces do not have its tree as their root")
        self.tree.attach(fd)

    async def start_network(self) -> None:
        """The network that `start(with_network=False)` left for later. Nothing of the sandbox's own runs before
        it is up: the create that started the sandbox is answered after this."""
        async with self._lock:
            if self._network_pending and self.running:
                await self._start_network()

    async def _start_network(self) -> None:
        """Unreachable routes for the host and the networks around it, then slirp4netns for the internet. In that
        order: the sandbox's kernel may already run (`start_network`), and there is no moment when its code could
        reach the host through slirp before the routes are there."""
        self._network_pending = False
        slirp, nsenter, ip = self.caps.tools["slirp4netns"], self.caps.tools["nsenter"], self.caps.tools["ip"]
        assert slirp is not None and nsenter is not None and ip is not None
        env = {"PATH": SYSTEM_PATH}
        try:
            blocked = await asyncio.to_thread(
                network.blocked_networks, allow_private=self.options.allow_private_networks, ip=ip
            )
            await network.block(nsenter, ip, self._holder_pid, blocked)
            self._slirp, self._slirp_exit_fd = await network.start_slirp(
                slirp, self._holder_pid, self.private_dir / "jail.log", env
            )
        except (OSError, TimeoutError) as exc:
            await self._stop_processes()
            raise JailError(f"the sandbox's network did not start: {exc}") from None

    async def stop(self) -> None:
        """Kill every process of the sandbox, its holder and network, remove its cgroups and unmount its disk
        (files stay)."""
        self._stopped = True
        async with self._lock:
            await self._stop_processes()
            if self.cgroups is not None:
                await self.cgroups.remove()
            with contextlib.suppress(OSError):
                self.link_dir.unlink()
            self.tree.close()
            for mount in self.buckets:
                try:
                    await mount.unmount()
                except OSError as exc:  # its directory stays mounted: removing the sandbox fails (and is retried)
                    log.warning("sandbox %s: could not unmount bucket %s: %s", self.sandbox_id, mount.bucket.uri, exc)
            if self.disk is not None:
                await self.disk.unmount()

    def release(self) -> None:
        """The sandbox is gone for good: give its uid back to the machine (call after `stop`)."""
        release(self.private_dir / RECORD)

    async def _stop_processes(self) -> None:
        if self.cgroups is not None:
            await self.cgroups.kill_all()
        for process in (self._holder, self._slirp, self._clearing):
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._slirp_exit_fd is not None:
            os.close(self._slirp_exit_fd)
            self._slirp_exit_fd = None
        self._holder = self._slirp = self._clearing = None
        self._holder_pid = 0
        self._network_pending = False
        self._unpin_namespaces()
        self.tree.attach(None)

    # ------------------------------------------------------------------ processes

    def wrap(self, argv: Sequence[str], *, env: Mapping[str, str], cwd: str) -> tuple[list[str], dict[str, str]]:
        """(host argv, host env) that run `argv` inside the sandbox as its uid, in sandbox directory `cwd`, with
        exactly `env` (host paths into the sandbox's tree turned into its own). A SIGINT to the new process group
        reaches only `argv`. No value of `env` is put in an argv, and none reaches a privileged process under its
        own name."""
        if not self.running:
            raise JailError(f"sandbox {self.sandbox_id} is not running (its namespaces are gone)")
        if not argv:
            raise JailError("cannot run an empty command in a sandbox")
        bad = [name for name in env if not ENV_NAME.fullmatch(name) or name.startswith(RESERVED_ENV_PREFIX)]
        if bad:
            raise JailError(f"environment variable name {bad[0]!r} is not valid (letters, digits and _ only)")
        tools = self.caps.tools
        assert tools["env"] is not None and tools["nsenter"] is not None
        held = f"/proc/{os.getpid()}/fd"  # the server's own fds (see _pin_namespaces), which nsenter opens as root
        enter = [tools["env"], "--ignore-signal=INT", tools["nsenter"]]
        enter += [f"--{option}={held}/{self._ns_fds[nsfile]}" for option, nsfile in NSENTER if nsfile in self._ns_fds]
        enter += [f"--root={held}/{self._ns_fds['root']}", f"--wd={held}/{self._ns_fds['root']}"]
        host_env = dict(SYSTEM_ENV)
        script = []
        for index, (name, value) in enumerate(env.items()):
            host_env[f"{RESERVED_ENV_PREFIX}{index}"] = self.sandbox_value(value)
            script.append(f'{name}="${RESERVED_ENV_PREFIX}{index}"; export {name}')
        leftovers = sorted({"PWD", "OLDPWD", *host_env} - set(env))
        script.append("unset " + " ".join(leftovers))
        script.append('exec "$@"')
        final = [tools["env"], "--default-signal=INT", f"--chdir={cwd}", "/bin/sh", "-c", "; ".join(script)]
        final += ["scalebox-env", *argv]
        return self._join_cgroups(enter + self._drop_privileges() + final), host_env

    def sandbox_path(self, host: Path | str) -> str:
        """The path inside the sandbox of a host path in its tree (or of a socket path below `link_dir`)."""
        host = Path(os.path.abspath(host))
        if host.is_relative_to(self.link_dir):
            return (Path(SANDBOX_RUN) / host.relative_to(self.link_dir)).as_posix()
        try:
            return self.tree.sandbox_path(host)
        except ValueError:
            raise JailError(f"a path of the server is not visible inside sandbox {self.sandbox_id}") from None

    def sandbox_value(self, value: str) -> str:
        """An environment value with every host path into the sandbox turned into the path it has inside, wherever
        it appears (PATH-style lists, `-Duser.home=...` in JVM options)."""
        mapping = [(self.link_dir, SANDBOX_RUN), (self.root, "")]
        mapping += [(Path(host), inside) for host, inside in self.options.seeds]
        for host, inside in mapping:
            prefix = re.escape(str(host))
            value = re.sub(prefix + "(?=/)", inside, value)  # host/a -> inside/a
            value = re.sub(prefix + r"(?=$|[:;,'\"\s])", inside or "/", value)  # the directory itself
        return value

    async def tcp_socket(self, family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
        """An unconnected TCP socket in the sandbox's network namespace (the server reaching a port it listens
        on), through the namespace fd held since it started."""
        if not self.running or "net" not in self._ns_fds:
            raise JailError(f"sandbox {self.sandbox_id} is not running (its namespaces are gone)")
        if self._net_sockets is None:
            self._net_sockets = netns.NamespaceSockets(self._ns_fds["net"])
        return await self._net_sockets.socket(family)

    def has_program(self, program: str, path_env: str) -> bool:
        """Whether `program` (a path, or a name looked up on the sandbox's PATH) exists inside the sandbox, as the
        sandbox sees it (blocking: call on the tree's threads)."""
        if "/" in program:
            candidates = [program if program.startswith("/") else f"{HOME}/{program}"]
        else:
            directories = [self.sandbox_value(d) for d in path_env.split(os.pathsep) if d.startswith("/")]
            candidates = [f"{d.rstrip('/')}/{program}" for d in directories]
        return any(self.tree.exists(os.path.normpath(c)) for c in candidates)

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
        missing = [m for m in self.caps.missing() if m not in ("internet", "disk-limit")]
        reasons: list[str] = []
        if self.options.internet and self.network == "none":
            missing.append("internet")
            reasons.append("no internet: slirp4netns is not installed (jupyter scalebox runtimes install)")
        enforced: dict[str, Any] = dict(self.cgroups.enforced()) if self.cgroups is not None else {}
        wanted = self.options.limits
        for name, value in (("memory_mb", wanted.memory_mb), ("cpu_count", wanted.cpu_count)):
            if value is not None and name not in enforced and f"{name}-unenforced" not in missing:
                missing.append(f"{name}-unenforced")
        if self.disk is not None and self.disk_problem is None:
            enforced["disk_mb"] = self.disk.size_mb
        else:
            missing.append("disk-limit")
            reasons.append(f"no disk limit: {self.disk_problem}")
        info: dict[str, Any] = {
            "mode": "bwrap",
            "uid": self.identity.uid if self.identity else None,
            "namespaces": ["mount", "pid", "ipc", "uts", "cgroup", "net"],
            "network": self.network,
            "private_networks": self.options.allow_private_networks if self.network == "private" else False,
            "limits": enforced,
            "cgroups": self.caps.cgroups.version,
            "pause": "freezer" if self.can_freeze else "sigstop",
            "missing": missing,
        }
        if reasons:
            info["reasons"] = reasons
        return info

    def disk_usage(self) -> tuple[int, int] | None:
        """(total, used) bytes of the sandbox's disk image, when its tree is on one."""
        if self.disk is None or self.disk_problem is not None:
            return None
        try:
            return self.disk.usage()
        except OSError:
            return None


def hidden_config_dirs(mounts: list[tuple[str, str]]) -> list[str]:
    """Jupyter's configuration directories that the read-only mounts would show a sandbox (`/etc/jupyter`,
    `<prefix>/etc/jupyter`, ...): each gets an empty tmpfs on top in the jail."""
    bound = [Path(path) for kind, path in mounts if kind == "ro"]
    found = []
    for directory in jupyter_config_path():
        path = Path(os.path.abspath(directory))
        if path.is_dir() and not path.is_symlink() and any(path.is_relative_to(b) for b in bound):
            found.append(str(path))
    return sorted(set(found))


#: Debian's own Python packages: its tools in a sandbox may need them, and pip never installs there.
DEBIAN_PACKAGES = "/usr/lib/python3/dist-packages"


def hidden_server_dirs(mounts: list[tuple[str, str]], runtime: Sequence[str]) -> list[str]:
    """The server's own packages that a system mount would show a sandbox (scalebox-local installed into
    /usr/local's Python, say): each gets an empty tmpfs on top. Kept where a runtime needs them (python falling
    back to the server's interpreter names that interpreter's prefix as a runtime)."""
    bound = [Path(path) for kind, path in mounts if kind == "ro"]
    needed = [Path(os.path.realpath(r)) for r in runtime]
    package = Path(os.path.realpath(__file__)).parents[3]  # the folder holding scalebox_kernel/
    candidates = [*site.getsitepackages(), site.getusersitepackages(), str(package)]
    found = []
    for directory in candidates:
        path = Path(os.path.realpath(directory))
        if str(path) == DEBIAN_PACKAGES or not path.is_dir() or any(path.is_relative_to(n) for n in needed):
            continue
        if any(path.is_relative_to(b) for b in bound) and path not in bound:
            found.append(str(path))
    return sorted(set(found))


def clean_stale_links(data_dir: Path, live: set[str]) -> None:
    """Remove the socket-path links a killed server left behind: dangling ones (whoever made them), and those into
    `data_dir` of sandboxes that are not `live` there."""
    with contextlib.suppress(OSError):
        for link in LINKS_DIR.iterdir():
            with contextlib.suppress(OSError):
                target = Path(os.readlink(link))
                ours = target.is_relative_to(data_dir)
                if not target.exists() or (ours and link.name not in live):
                    link.unlink()


def _read_all(fd: int) -> bytes:
    """Everything written to a pipe until its writers close it (blocking; run in a thread)."""
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)
