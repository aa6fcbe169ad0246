"""Measured resource use of one sandbox (its processes, read from /proc, and the size of its file tree), and of the
server's own process (its open file descriptors)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .isolation import SandboxCgroups, Usage, capabilities
from .isolation.tree import MAX_OPEN_DEPTH, walk_fd
from .store import SandboxRecord, iso

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
#: File descriptors one sandbox may hold in the server: its namespaces, root and pipes, and its kernels' sockets
#: (about 40 with one kernel), with room for more kernels.
SANDBOX_FDS = 96
#: Descriptors kept for serving requests (connections, files) whatever the sandboxes hold.
SERVING_FDS = 256


def descriptors() -> tuple[int, int] | None:
    """The server process's open file descriptors and its (soft) limit on them (None where /proc cannot say)."""
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:
        return None
    return used, resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def descriptors_left_for(sandboxes: int) -> bool:
    """Whether `sandboxes` more (those starting now included) fit under the server's open-file limit, with the
    serving reserve kept."""
    found = descriptors()
    if found is None or found[1] == resource.RLIM_INFINITY:
        return True
    used, limit = found
    return used + sandboxes * SANDBOX_FDS + SERVING_FDS <= limit


def _proc_stat(pid: str) -> tuple[int, int, int] | None:
    """(ppid, cpu ticks, rss pages) of a process, or None when it is gone or unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # the command name may contain spaces and parentheses
    return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[21])


def _inside(pid: str, root: str) -> bool:
    """Whether a process works in the sandbox's tree: its cwd or its HOME is below `root`."""
    try:
        if os.readlink(f"/proc/{pid}/cwd").startswith(root):
            return True
    except OSError:
        pass
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"HOME={root}".encode() in environ


def _jailed(root: Path) -> set[str]:
    """Processes in an isolated sandbox's cgroups (their cwd and HOME are the sandbox's own paths)."""
    caps = capabilities()
    if not caps.cgroups.v1 and caps.cgroups.v2 is None:
        return set()
    return {str(pid) for pid in SandboxCgroups(caps.cgroups, root.parent.name).pids()}


def sandbox_processes(root: Path) -> dict[str, tuple[int, int]]:
    """pid -> (cpu ticks, rss pages) for every process of the sandbox and all their descendants."""
    prefix = str(root)
    table: dict[str, tuple[int, int, int]] = {}
    if not Path("/proc").is_dir():
        return {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(entry)
            if stat:
                table[entry] = stat
    members = {pid for pid in table if _inside(pid, prefix)} | (_jailed(root) & table.keys())
    changed = True
    while changed:  # children of members are members (a command's subprocesses may chdir elsewhere)
        changed = False
        for pid, (ppid, _, _) in table.items():
            if pid not in members and str(ppid) in members:
                members.add(pid)
                changed = True
    return {pid: (table[pid][1], table[pid][2]) for pid in members}


def tree_size(root: Path) -> int:
    """Bytes the sandbox's files take on disk (fd-relative, never following links, MAX_OPEN_DEPTH levels deep)."""
    total = 0
    with contextlib.suppress(OSError):
        top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for _, _, entry in walk_fd(top, "/", MAX_OPEN_DEPTH):
                total += entry.info.st_blocks * 512
        finally:
            os.close(top)
    return total


async def measure(
    record: SandboxRecord,
    root: Path,
    interval: float = 0.2,
    usage: Callable[[], Usage | None] | None = None,
    disk: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """One metrics sample, in the shape both SDKs read (PROTOCOL.md 1.9); from the sandbox's cgroup counters
    when `usage` gives them (an isolated sandbox), else from its processes in /proc."""
    before = usage() if usage is not None else None
    if before is not None and before.cpu_seconds is not None and before.memory_bytes is not None:
        start = time.monotonic()
        await asyncio.sleep(interval)
        after = usage() if usage is not None else None
        elapsed = time.monotonic() - start
        cpu_seconds = (after.cpu_seconds or 0.0) - before.cpu_seconds if after is not None else 0.0
        cpu_pct = 100.0 * cpu_seconds / elapsed / max(record.cpu_count, 1)
        mem_used = (after.memory_bytes if after is not None else None) or before.memory_bytes
    else:
        first = await asyncio.to_thread(sandbox_processes, root)
        start = time.monotonic()
        await asyncio.sleep(interval)
        second = await asyncio.to_thread(sandbox_processes, root)
        elapsed = time.monotonic() - start
        ticks = sum(cpu - first[pid][0] for pid, (cpu, _) in second.items() if pid in first)
        cpu_pct = 100.0 * ticks / _CLOCK_TICKS / elapsed / max(record.cpu_count, 1)
        mem_used = sum(rss for _, rss in second.values()) * _PAGE_SIZE
    if disk is not None:  # the sandbox's own disk image
        disk_total, disk_used = disk
    else:
        disk_used = await asyncio.to_thread(tree_size, root) if root.exists() else 0
        disk_total = shutil.disk_usage(root if root.exists() else root.anchor).total
    return {
        "cpu_count": record.cpu_count,
        "cpu_used_pct": round(min(cpu_pct, 100.0), 2),
        "mem_total": record.memory_mb * 1024 * 1024,
        "mem_used": mem_used,
        "disk_total": disk_total,
        "disk_used": disk_used,
        "timestamp": iso(time.time()),
    }
