"""Issue 6: what isolation costs. Sandbox create + first result, and a trivial cell's latency, on a scalebox-local
with isolation on (bubblewrap, uid, cgroups) beside one started with --no-isolation. Prints ratios; asserts nothing.

Run with `python -m bench.bench_isolation` from the repository root.
"""

from __future__ import annotations

import os
import time

from bench._common import local_server, p50_ms, timed
from scalebox_kernel.client import Sandbox
from scalebox_kernel.config import ScaleboxConfig
from scalebox_kernel.server.isolation import capabilities

RUNS = int(os.environ.get("BENCH_RUNS", "50"))
CREATES = int(os.environ.get("BENCH_CREATES", "5"))
CODE = "1 + 1"


def measure(extra_args: list[str]) -> tuple[float, float]:
    """(p50 ms of create + first result, p50 ms of a trivial cell) on a server started with `extra_args`."""
    with local_server(extra_args=extra_args) as info:
        config = ScaleboxConfig(api_key=info.api_key, api_url=info.url, ca_file=info.certfile)
        firsts = []
        for _ in range(CREATES):
            start = time.perf_counter()
            sandbox = Sandbox.create(config=config)
            sandbox.run_code(CODE)
            firsts.append(time.perf_counter() - start)
            sandbox.kill()
        sandbox = Sandbox.create(config=config)
        try:
            cells = timed(lambda: sandbox.run_code(CODE), RUNS)
        finally:
            sandbox.kill()
    return p50_ms(firsts), p50_ms(cells)


def main() -> None:
    print(capabilities().summary())
    off_first, off_cell = measure(["--no-isolation"])
    on_first, on_cell = measure([])
    print(f"\nisolation on vs off ({CREATES} creates, {RUNS} cells)")
    for name, on, off in (
        ("create + first result", on_first, off_first),
        (f"trivial cell `{CODE}`", on_cell, off_cell),
    ):
        print(f"  {name:<28} on {on:8.1f} ms   off {off:8.1f} ms   ratio {on / off:5.2f}x")


if __name__ == "__main__":
    main()
