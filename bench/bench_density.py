"""Issue 15: how many idle Python sandboxes fit, and what one costs beside a bare ipykernel, in the same run.

Creates BENCH_SANDBOXES (default 100) sandboxes on a scalebox-local of its own (no warm pool: these are the idle
sandboxes of notebooks left open), has each answer a cell, then measures every one with its jail, helpers and
network included: the processes of its PID namespace (bwrap's holder, its kernel, whatever the kernel started)
and its slirp4netns. The baseline is a plain ipykernel started by jupyter_client that answered the same cell.
Memory is PSS (shared pages split between their users; what the machine really pays) and RSS, per process tree,
and the machine's MemAvailable before and after, divided by the sandboxes. Prints, asserts nothing but that every
sandbox answered. Run with `python -m bench.bench_density` from the repository root.
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from jupyter_client.manager import start_new_kernel

from bench._common import local_server
from scalebox_kernel.client import Sandbox
from scalebox_kernel.config import ScaleboxConfig

COUNT = int(os.environ.get("BENCH_SANDBOXES", "100"))


def memory_kib(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process, in KiB."""
    pss = rss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
    except OSError:
        pass
    return pss, rss


def mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


def processes() -> dict[int, tuple[str, int]]:
    """pid -> (command line, PID namespace inode) of every process."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                args = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found[int(entry)] = (args, os.stat(f"/proc/{entry}/ns/pid").st_ino)
            except OSError:
                continue
    return found


def sandbox_trees(sandbox_ids: list[str]) -> dict[str, list[int]]:
    """Each sandbox's processes: its namespace's (found through bwrap's holder, which names the sandbox on its
    command line) and its slirp4netns (which names the holder's pid)."""
    table = processes()
    trees: dict[str, list[int]] = {}
    for sandbox_id in sandbox_ids:
        holders = [pid for pid, (args, _) in table.items() if "bwrap" in args and f"--hostname {sandbox_id}" in args]
        pids: set[int] = set(holders)
        for holder in holders:
            children = [int(c) for c in Path(f"/proc/{holder}/task/{holder}/children").read_text().split()]
            namespaces = {table[c][1] for c in children if c in table}
            pids |= {pid for pid, (_, ns) in table.items() if ns in namespaces}
            pids |= {pid for pid, (args, _) in table.items() if "slirp4netns" in args and f" {children[0]} " in args}
        trees[sandbox_id] = sorted(pids)
    return trees


def main() -> None:
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        kc.execute_interactive("1+1", output_hook=lambda msg: None, timeout=60)
        time.sleep(1)
        baseline_pss, baseline_rss = memory_kib(km.provisioner.process.pid)  # type: ignore[union-attr]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)

    with local_server(extra_args=["--ServerSettings.pool_size=0"]) as info:
        config = ScaleboxConfig(api_key=info.api_key, api_url=info.url, ca_file=info.certfile)
        before = mem_available_kib()
        started = time.monotonic()

        def one(_: int) -> Sandbox:
            sandbox = Sandbox.create(config=config, timeout=3600)
            assert sandbox.run_code("1+1", timeout=300).text == "2"
            return sandbox

        with ThreadPoolExecutor(4) as pool:
            sandboxes = list(pool.map(one, range(COUNT)))
        created = time.monotonic() - started
        answered = sum(1 for s in sandboxes if s.run_code("1+1", timeout=120).text == "2")
        time.sleep(5)  # idle
        after = mem_available_kib()
        trees = sandbox_trees([s.sandbox_id for s in sandboxes])
        per = [[memory_kib(pid) for pid in pids] for pids in trees.values()]
        pss = [sum(p for p, _ in tree) for tree in per]
        rss = [sum(r for _, r in tree) for tree in per]
        counts = [len(pids) for pids in trees.values()]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda s: (s.kill(), s.close()), sandboxes))

    print(f"\n{COUNT} idle Python sandboxes on one scalebox-local (created in {created:.0f} s, 4 at a time)")
    print(f"  answered a cell afterwards: {answered} of {COUNT}")
    print(f"  processes per sandbox (median): {statistics.median(counts):.0f}")
    print(f"  bare ipykernel (baseline): PSS {baseline_pss / 1024:7.1f} MiB   RSS {baseline_rss / 1024:7.1f} MiB")
    median_pss, median_rss = statistics.median(pss), statistics.median(rss)
    print(
        f"  per sandbox (median):      PSS {median_pss / 1024:7.1f} MiB   RSS {median_rss / 1024:7.1f} MiB   "
        f"ratio PSS {median_pss / baseline_pss:5.2f}x   RSS {median_rss / baseline_rss:5.2f}x"
    )
    used = (before - after) / COUNT
    print(f"  MemAvailable drop per sandbox: {used / 1024:7.1f} MiB ({used / baseline_pss:5.2f}x the baseline's PSS)")


if __name__ == "__main__":
    main()
