"""Issue 3: p50 latency of a trivial cell through the Scalebox kernel (on its own scalebox-local) beside the same
cell in a plain ipykernel, both driven by jupyter_client in one run. Prints both p50s and the ratio; asserts nothing.

Run with `python -m bench.bench_kernel` from the repository root (BENCH_RUNS sets the number of cells).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from jupyter_client.manager import start_new_kernel

from bench._common import env_set, local_server, p50_ms, plain_ipykernel_cell, report, server_env, timed
from scalebox_kernel.kernel.install import write_kernelspec
from scalebox_kernel.kernel.languages import LANGUAGES

RUNS = int(os.environ.get("BENCH_RUNS", "50"))
CODE = "1+1"


def scalebox_kernel_cell(code: str, runs: int) -> list[float]:
    """The same cell through the Scalebox (Python) kernel; the first cell (which opens the sandbox) is warm-up."""
    km, kc = start_new_kernel(kernel_name="scalebox-python")
    try:
        return timed(lambda: kc.execute_interactive(code, output_hook=lambda msg: None, timeout=60), runs)
    finally:
        kc.stop_channels()
        km.shutdown_kernel()


def main() -> None:
    baseline = p50_ms(plain_ipykernel_cell(CODE, RUNS))
    with tempfile.TemporaryDirectory(prefix="scalebox-bench-specs-") as specs, local_server() as info:
        write_kernelspec(LANGUAGES["python"], Path(specs) / "kernels" / "scalebox-python")
        with env_set({**server_env(info), "JUPYTER_PATH": specs}):
            scalebox = p50_ms(scalebox_kernel_cell(CODE, RUNS))
    rows = [
        ("ipykernel (python3) via jupyter_client (baseline)", baseline),
        ("Scalebox kernel -> scalebox-local", scalebox),
    ]
    report(f"trivial cell `{CODE}`, {RUNS} runs each", rows, baseline)


if __name__ == "__main__":
    main()
