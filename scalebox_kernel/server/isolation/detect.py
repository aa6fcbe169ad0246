"""What this machine offers for sandboxing: Linux, root, bubblewrap, the helper tools, and writable cgroups.

Everything is probed for real (a throw-away bwrap run, mkdir/rmdir of a cgroup), once per process, so that the
server can say plainly at start which protections its sandboxes get and which are missing.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .disk import can_limit_disk
from .tools import which

#: cgroup v1 controllers a sandbox uses (cpuacct gives its CPU time).
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "freezer")
#: cgroup v2 controllers a sandbox uses when they can be enabled for our subtree.
V2_CONTROLLERS = ("memory", "pids", "cpu")
#: Directory, below our own cgroup, that holds one cgroup per sandbox.
GROUP_DIR = "scalebox"
PROBE_TIMEOUT = 10.0


@dataclass(frozen=True)
class CgroupLayout:
    """Where this process may create child cgroups: per v1 controller, and in the v2 (unified) tree."""

    v1: dict[str, Path] = field(default_factory=dict)  # controller -> our own cgroup's directory (writable)
    v2: Path | None = None  # our own cgroup in the unified tree, when writable
    v2_controllers: frozenset[str] = frozenset()  # enabled for the children of v2 / GROUP_DIR
    swap_limit: bool = False  # v1 memory.memsw.* exists (swap is limited with memory)

    def has(self, feature: str) -> bool:
        """Whether a feature (memory, pids, cpu, cpuacct, freezer) can be used for sandboxes."""
        if feature in self.v1:
            return True
        if self.v2 is None:
            return False
        if feature == "freezer":
            return True  # cgroup.freeze exists in every non-root v2 cgroup
        if feature == "cpuacct":
            return True  # cpu.stat's usage_usec is always there
        return feature in self.v2_controllers

    @property
    def version(self) -> str:
        if self.v1:
            return "v1" if self.v2 is None else "v1+v2"
        return "v2" if self.v2 is not None else "none"


@dataclass(frozen=True)
class Capabilities:
    """The sandboxing tools and privileges of this machine, and why any of them is unusable."""

    linux: bool
    root: bool
    bwrap: str | None  # path of a bwrap that was seen working
    tools: dict[str, str | None]  # setpriv, nsenter, env (with --ignore-signal), slirp4netns -> path or None
    cgroups: CgroupLayout
    problems: tuple[str, ...] = ()  # human-readable reasons for what is missing

    @property
    def namespaces(self) -> bool:
        """Whether sandboxes can get their own mount, PID, IPC, UTS and network namespaces."""
        needed = ("setpriv", "nsenter", "env")
        return self.linux and self.root and self.bwrap is not None and all(self.tools.get(t) for t in needed)

    @property
    def private_network(self) -> bool:
        """Whether a sandbox with internet access can have its own network namespace (slirp4netns)."""
        return self.namespaces and bool(self.tools.get("slirp4netns")) and bool(self.tools.get("ip"))

    def missing(self) -> list[str]:
        """Protections sandboxes do not get here (the names `isolation()` reports)."""
        missing: list[str] = []
        if not self.namespaces:
            missing += ["namespaces", "network", "uid"]
        elif not self.private_network:
            missing.append("internet")  # no slirp4netns: sandboxes get no network rather than the host's
        for feature, name in (("memory", "memory-limit"), ("pids", "process-limit"), ("cpu", "cpu-limit")):
            if not self.cgroups.has(feature):
                missing.append(name)
        if not self.cgroups.has("freezer"):
            missing.append("freezer")
        if not self.namespaces or can_limit_disk() is not None:
            missing.append("disk-limit")
        return missing

    def summary(self) -> str:
        """One line for `jupyter scalebox serve`'s start-up output."""
        if not self.namespaces:
            head = "isolation: none - sandbox code runs on the host as the server's user"
        else:
            parts = ["bubblewrap namespaces", "a uid per sandbox"]
            parts.append(
                "private network off the host (slirp4netns)" if self.private_network else "no network (no slirp4netns)"
            )
            if can_limit_disk() is None:
                parts.append("a disk image per sandbox")
            limits = [f for f in ("memory", "pids", "cpu") if self.cgroups.has(f)]
            if limits:
                parts.append(f"cgroup {self.cgroups.version} limits ({', '.join(limits)})")
            if self.cgroups.has("freezer"):
                parts.append("freezer pause")
            head = "isolation: " + ", ".join(parts)
        missing = self.missing()
        text = head + (f"; missing: {', '.join(missing)}" if missing else "")
        if self.problems:
            text += " (" + "; ".join(self.problems) + ")"
        return text


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _own_cgroups() -> dict[str, str]:
    """Controller (or "" for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    own: dict[str, str] = {}
    for line in _read(Path("/proc/self/cgroup")).splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(",") if parts[1] else [""]:
            own[controller] = parts[2]
    return own


def _cgroup_mounts() -> tuple[dict[str, tuple[Path, str]], tuple[Path, str] | None]:
    """v1 controller -> (mount point, mount root), and the v2 mount, from /proc/self/mountinfo."""
    v1: dict[str, tuple[Path, str]] = {}
    v2: tuple[Path, str] | None = None
    for line in _read(Path("/proc/self/mountinfo")).splitlines():
        head, _, tail = line.partition(" - ")
        fields, after = head.split(), tail.split()
        if len(fields) < 5 or len(after) < 3:
            continue
        root, mount_point, fstype = fields[3], Path(fields[4].replace("\\040", " ")), after[0]
        if fstype == "cgroup2" and v2 is None:
            v2 = (mount_point, root)
        elif fstype == "cgroup":
            for option in after[2].split(","):
                if option in V1_CONTROLLERS:
                    v1.setdefault(option, (mount_point, root))
    return v1, v2


def _own_dir(mount: tuple[Path, str], own_path: str) -> Path:
    mount_point, mount_root = mount
    relative = own_path[len(mount_root) :] if own_path.startswith(mount_root) else own_path
    return mount_point / relative.lstrip("/")


def _writable(base: Path) -> bool:
    """Whether child cgroups can be made below `base` (probe: make and remove one, leave nothing behind)."""
    group = base / GROUP_DIR
    existed = group.is_dir()
    probe = group / f"probe-{os.getpid()}"
    try:
        group.mkdir(exist_ok=True)
        probe.mkdir()
        probe.rmdir()
        return True
    except OSError:
        return False
    finally:
        if not existed:
            with contextlib.suppress(OSError):
                group.rmdir()


def _enable_v2(base: Path) -> frozenset[str]:
    """Enable memory/pids/cpu for the children of base/GROUP_DIR where the kernel lets us; what is enabled."""
    group = base / GROUP_DIR
    available = set(_read(base / "cgroup.controllers").split())
    for controller in V2_CONTROLLERS:
        if controller in available:
            for directory in (base, group):  # base must delegate it before the group can
                with contextlib.suppress(OSError):
                    (directory / "cgroup.subtree_control").write_text(f"+{controller}")
    return frozenset(_read(group / "cgroup.subtree_control").split()) & frozenset(V2_CONTROLLERS)


def detect_cgroups() -> CgroupLayout:
    """The cgroup controllers this process can use for sandboxes (v1 first; v2 where it has controllers)."""
    own = _own_cgroups()
    mounts_v1, mount_v2 = _cgroup_mounts()
    v1: dict[str, Path] = {}
    for controller in V1_CONTROLLERS:
        if controller in mounts_v1 and controller in own:
            base = _own_dir(mounts_v1[controller], own[controller])
            if _writable(base):
                v1[controller] = base
    v2: Path | None = None
    v2_controllers: frozenset[str] = frozenset()
    if mount_v2 is not None and "" in own:
        base = _own_dir(mount_v2, own[""])
        if _writable(base):
            v2 = base
            (base / GROUP_DIR).mkdir(exist_ok=True)
            v2_controllers = _enable_v2(base)
            with contextlib.suppress(OSError):  # emptied again; sandboxes recreate it
                (base / GROUP_DIR).rmdir()
    swap = "memory" in v1 and (v1["memory"] / "memory.memsw.limit_in_bytes").exists()
    return CgroupLayout(v1=v1, v2=v2, v2_controllers=v2_controllers, swap_limit=swap)


def _env_ignores_signals() -> str | None:
    """coreutils env with --ignore-signal/--default-signal (9.0+): keeps SIGINT from killing the wrappers."""
    env = which("env")
    if env is None:
        return None
    try:
        done = subprocess.run(
            [env, "--ignore-signal=INT", "--default-signal=INT", "-C", "/", "true"],
            capture_output=True,
            timeout=PROBE_TIMEOUT,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return env if done.returncode == 0 else None


def _bwrap_works(bwrap: str) -> str:
    """Run a throw-away sandbox; empty string when it worked, else what bwrap said."""
    argv = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--die-with-parent"]
    argv += ["--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "true"]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=PROBE_TIMEOUT, text=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    return "" if done.returncode == 0 else (done.stderr.strip() or f"exit status {done.returncode}")


def detect_capabilities() -> Capabilities:
    """Probe this machine (no caching; see `capabilities()`)."""
    linux = sys.platform.startswith("linux")
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    problems: list[str] = []
    if not linux:
        problems.append(f"sandboxing needs Linux, this is {sys.platform}")
        return Capabilities(
            linux=False, root=root, bwrap=None, tools={}, cgroups=CgroupLayout(), problems=tuple(problems)
        )
    tools: dict[str, str | None] = {name: which(name) for name in ("setpriv", "nsenter", "slirp4netns", "ip")}
    tools["env"] = _env_ignores_signals()
    bwrap = which("bwrap")
    if not root:
        problems.append("scalebox-local is not running as root, so it cannot switch sandboxes to their own uid")
    if bwrap is None:
        problems.append("bubblewrap is not installed (apt-get install bubblewrap)")
    elif root:
        error = _bwrap_works(bwrap)
        if error:
            problems.append(f"bubblewrap does not work here: {error}")
            bwrap = None
    for name in ("setpriv", "nsenter"):
        if tools[name] is None:
            problems.append(f"{name} is missing (util-linux)")
    if tools["env"] is None:
        problems.append("env lacks --ignore-signal (coreutils 9 or newer is needed)")
    if tools["slirp4netns"] is None and root and bwrap:
        problems.append("slirp4netns is not installed, so sandboxes get no network at all")
    elif tools["ip"] is None and root and bwrap:
        problems.append("ip (iproute2) is not installed, so sandboxes get no network (it keeps the host out)")
    cgroups = detect_cgroups() if root else CgroupLayout()
    if root and not cgroups.v1 and cgroups.v2 is None:
        problems.append("no writable cgroup hierarchy, so there are no resource limits and pause uses SIGSTOP")
    return Capabilities(linux=linux, root=root, bwrap=bwrap, tools=tools, cgroups=cgroups, problems=tuple(problems))


@functools.cache
def capabilities() -> Capabilities:
    """This machine's capabilities, probed once per process."""
    return detect_capabilities()
