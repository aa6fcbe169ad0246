"""One sandbox's cgroups: memory, process and CPU limits, the freezer for pause, usage counters, kill-all.

cgroup v1 controllers are used where they are writable (each has its own hierarchy, and our memory cgroup may
sit deep below the root), v2 for what v1 lacks; on a hybrid machine the v2 group is joined as well, for
`cgroup.kill`. Every sandbox gets `<our cgroup>/scalebox/<name>` in each hierarchy, removed again when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from .detect import GROUP_DIR, CgroupLayout, _enable_v2, _read

CFS_PERIOD_US = 100_000
#: CPU weight (v1 `cpu.shares`, v2 `cpu.weight`) of a sandbox in use, and of one waiting in the warm pool: the
#: pool starts its sandboxes on the CPU that sandboxes in use leave over.
CPU_SHARES = {False: 1024, True: 2}
CPU_WEIGHT = {False: 100, True: 1}
POLL = 0.01  # seconds between checks while freezing or emptying a cgroup


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandbox; None means unlimited."""

    memory_mb: int | None = None
    cpu_count: float | None = None  # CPU time per wall second, in CPUs (1.5 = one and a half cores)
    processes: int | None = None  # tasks (processes and threads) at once


@dataclass(frozen=True)
class Usage:
    """What a sandbox's cgroups counted; None where no controller counts it."""

    cpu_seconds: float | None
    memory_bytes: int | None
    memory_peak_bytes: int | None
    processes: int | None
    oom_kills: int


def _keyed(path: Path, key: str) -> int | None:
    """The value of `key N` in a flat-keyed cgroup file (memory.oom_control, cpu.stat, memory.events)."""
    for line in _read(path).splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None


def _number(path: Path) -> int | None:
    text = _read(path).strip()
    return int(text) if text.isdigit() else None


class SandboxCgroups:
    """The cgroups of one sandbox, in every hierarchy the layout offers."""

    def __init__(self, layout: CgroupLayout, name: str) -> None:
        self.layout = layout
        self.name = name
        self.v1 = {controller: base / GROUP_DIR / name for controller, base in layout.v1.items()}
        self.v2 = layout.v2 / GROUP_DIR / name if layout.v2 is not None else None
        self.limits = Limits()
        self.background = False  # the warm pool's CPU weight (set_background)

    @property
    def directories(self) -> list[Path]:
        dirs = list(dict.fromkeys(self.v1.values()))  # co-mounted controllers share a directory
        return [*dirs, self.v2] if self.v2 is not None else dirs

    @property
    def procs_files(self) -> list[Path]:
        """The cgroup.procs files a process writes its pid to, to join the sandbox."""
        return [directory / "cgroup.procs" for directory in self.directories]

    def _v2_has(self, controller: str) -> bool:
        return self.v2 is not None and controller not in self.v1 and controller in self.layout.v2_controllers

    # ------------------------------------------------------------------ lifetime

    async def create(self, limits: Limits) -> None:
        """Make the cgroups (emptying leftovers of an earlier run of the same sandbox) and apply the limits and
        the CPU weight (`set_background`, which may be called before)."""
        if any(directory.exists() for directory in self.directories):
            await self.kill_all()
            await self.remove(keep_parent=True)
        for directory in self.directories:
            directory.parent.mkdir(exist_ok=True)
            if directory == self.v2 and self.layout.v2 is not None:
                _enable_v2(self.layout.v2)
            directory.mkdir()
        self.set_limits(limits)
        if self.background:
            self.set_background(True)

    def set_limits(self, limits: Limits) -> None:
        """Write the limits to whichever hierarchy has the controller (v1 first)."""
        if limits.memory_mb is not None:
            limit = str(limits.memory_mb * 1024 * 1024)
            if "memory" in self.v1:
                memory = self.v1["memory"] / "memory.limit_in_bytes"
                both = self.v1["memory"] / "memory.memsw.limit_in_bytes"
                # memory + swap, so the limit cannot be dodged by swapping; memsw may never be below the memory
                # limit, so a raised limit goes to memsw first, a lowered one to memory first.
                current = _number(both) if self.layout.swap_limit else None
                raising = current is not None and int(limit) > current
                order = [both, memory] if raising else [memory, both]
                for path in order:
                    if path is memory or self.layout.swap_limit:
                        path.write_text(limit)
            elif self._v2_has("memory") and self.v2 is not None:
                (self.v2 / "memory.max").write_text(limit)
                with contextlib.suppress(OSError):
                    (self.v2 / "memory.swap.max").write_text("0")
        if limits.processes is not None:
            if "pids" in self.v1:
                (self.v1["pids"] / "pids.max").write_text(str(limits.processes))
            elif self._v2_has("pids") and self.v2 is not None:
                (self.v2 / "pids.max").write_text(str(limits.processes))
        if limits.cpu_count is not None:
            quota = max(1000, round(limits.cpu_count * CFS_PERIOD_US))
            if "cpu" in self.v1:
                (self.v1["cpu"] / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
                (self.v1["cpu"] / "cpu.cfs_quota_us").write_text(str(quota))
            elif self._v2_has("cpu") and self.v2 is not None:
                (self.v2 / "cpu.max").write_text(f"{quota} {CFS_PERIOD_US}")
        self.limits = limits

    def set_background(self, background: bool) -> None:
        """The least CPU weight (a sandbox of the warm pool, starting or waiting) or the normal one (in use)."""
        self.background = background
        with contextlib.suppress(OSError):  # a weight is a courtesy, not a limit: without it all stay equal
            if "cpu" in self.v1:
                (self.v1["cpu"] / "cpu.shares").write_text(str(CPU_SHARES[background]))
            elif self._v2_has("cpu") and self.v2 is not None:
                (self.v2 / "cpu.weight").write_text(str(CPU_WEIGHT[background]))

    def enforced(self) -> dict[str, int | float]:
        """The limits actually in force (a limit without its controller is not)."""
        result: dict[str, int | float] = {}
        if self.limits.memory_mb is not None and ("memory" in self.v1 or self._v2_has("memory")):
            result["memory_mb"] = self.limits.memory_mb
        if self.limits.cpu_count is not None and ("cpu" in self.v1 or self._v2_has("cpu")):
            result["cpu_count"] = self.limits.cpu_count
        if self.limits.processes is not None and ("pids" in self.v1 or self._v2_has("pids")):
            result["processes"] = self.limits.processes
        return result

    def add(self, pid: int) -> None:
        """Move a process (and so its future children) into every cgroup of the sandbox."""
        for procs in self.procs_files:
            procs.write_text(str(pid))

    def pids(self) -> set[int]:
        found: set[int] = set()
        for procs in self.procs_files:
            found.update(int(line) for line in _read(procs).split() if line.isdigit())
        return found

    async def remove(self, *, keep_parent: bool = False) -> None:
        """Remove the (empty) cgroups, and the shared parent directory when no other sandbox uses it."""
        for directory in self.directories:
            deadline = time.monotonic() + 2.0
            while directory.exists():
                try:
                    directory.rmdir()
                except OSError:  # the last task is still on its way out
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(POLL)
            if not keep_parent:
                with contextlib.suppress(OSError):
                    directory.parent.rmdir()

    # ------------------------------------------------------------------ freezer

    @property
    def can_freeze(self) -> bool:
        return "freezer" in self.v1 or self.v2 is not None

    def _freezer_state(self) -> str:
        if "freezer" in self.v1:
            return _read(self.v1["freezer"] / "freezer.state").strip()
        assert self.v2 is not None
        return "FROZEN" if _keyed(self.v2 / "cgroup.events", "frozen") == 1 else "THAWED"

    def _write_freezer(self, frozen: bool) -> None:
        if "freezer" in self.v1:
            (self.v1["freezer"] / "freezer.state").write_text("FROZEN" if frozen else "THAWED")
        elif self.v2 is not None:
            (self.v2 / "cgroup.freeze").write_text("1" if frozen else "0")

    async def freeze(self, timeout: float = 5.0) -> None:
        """Stop every task of the sandbox where it stands (memory stays); waits until all are frozen."""
        self._write_freezer(True)
        deadline = time.monotonic() + timeout
        while self._freezer_state() != "FROZEN":
            if time.monotonic() > deadline:
                raise TimeoutError(f"the sandbox's processes did not freeze within {timeout:.0f} s")
            await asyncio.sleep(POLL)

    async def thaw(self) -> None:
        self._write_freezer(False)

    # ------------------------------------------------------------------ usage and kill

    def usage(self) -> Usage:
        cpu: float | None = None
        if "cpuacct" in self.v1:
            nanoseconds = _number(self.v1["cpuacct"] / "cpuacct.usage")
            cpu = nanoseconds / 1e9 if nanoseconds is not None else None
        elif self.v2 is not None:
            micro = _keyed(self.v2 / "cpu.stat", "usage_usec")
            cpu = micro / 1e6 if micro is not None else None
        memory = peak = None
        if "memory" in self.v1:
            memory = _number(self.v1["memory"] / "memory.usage_in_bytes")
            peak = _number(self.v1["memory"] / "memory.max_usage_in_bytes")
        elif self._v2_has("memory") and self.v2 is not None:
            memory = _number(self.v2 / "memory.current")
            peak = _number(self.v2 / "memory.peak")
        processes = None
        if "pids" in self.v1:
            processes = _number(self.v1["pids"] / "pids.current")
        elif self._v2_has("pids") and self.v2 is not None:
            processes = _number(self.v2 / "pids.current")
        return Usage(cpu, memory, peak, processes, self.oom_kills())

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer has killed in this sandbox so far."""
        if "memory" in self.v1:
            return _keyed(self.v1["memory"] / "memory.oom_control", "oom_kill") or 0
        if self._v2_has("memory") and self.v2 is not None:
            return _keyed(self.v2 / "memory.events", "oom_kill") or 0
        return 0

    async def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL every process of the sandbox (frozen first, so nothing forks away) and wait until none is left."""
        deadline = time.monotonic() + timeout
        while pids := self.pids():
            if self.v2 is not None and (self.v2 / "cgroup.kill").exists():
                (self.v2 / "cgroup.kill").write_text("1")
            else:
                if self.can_freeze:
                    with contextlib.suppress(OSError):
                        self._write_freezer(True)
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            if self.can_freeze:
                with contextlib.suppress(OSError):
                    self._write_freezer(False)  # frozen tasks only die once thawed
            if time.monotonic() > deadline:
                raise TimeoutError(f"processes {sorted(pids)} of the sandbox did not die within {timeout:.0f} s")
            await asyncio.sleep(POLL)
