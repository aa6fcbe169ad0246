"""What isolation costs. Sandbox create + first result, and a trivial cell's latency, on three scalebox-locals in
one run: isolation off (--no-isolation); isolated without the disk image (what issue 6 built, plus the fenced
network and in-root file work of issue 9); and fully isolated (each sandbox on its own disk image too). Prints
ratios; asserts nothing.

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
    off = measure(["--no-isolation"])
    no_disk = measure(["--ServerSettings.disk_mb=0"])
    full = measure([])
    print(f"\nisolation ({CREATES} creates, {RUNS} cells), p50")
    for index, name in enumerate(("create + first result", f"trivial cell `{CODE}`")):
        print(
            f"  {name:<24} off {off[index]:7.1f} ms   isolated {no_disk[index]:7.1f} ms"
            f"   + disk image {full[index]:7.1f} ms   full/off {full[index] / off[index]:5.2f}x"
            f"   full/isolated-without-disk {full[index] / no_disk[index]:5.2f}x"
        )


if __name__ == "__main__":
    main()
