"""Issue 10: throughput of a flood, 20,000 lines printed with flush=True, through `Sandbox.run_code` and through the
Scalebox kernel (both on a scalebox-local of their own), beside the same cell in a plain ipykernel driven by
jupyter_client, in one run. Prints the p50 wall time of the cell and the ratio to the baseline; asserts nothing
about speed, only that every line arrived (a flood that loses lines would look fast).

Run with `python -m bench.bench_flood` from the repository root (BENCH_RUNS sets the number of cells, BENCH_LINES
the lines per cell).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from jupyter_client.manager import start_new_kernel

from bench._common import env_set, local_server, p50_ms, report, server_env, timed
from scalebox_kernel.client import Sandbox
from scalebox_kernel.config import ScaleboxConfig
from scalebox_kernel.kernel.install import write_kernelspec
from scalebox_kernel.kernel.languages import LANGUAGES

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
LINES = int(os.environ.get("BENCH_LINES", "20000"))
CODE = f"for i in range({LINES}): print(i, flush=True)"
EXPECTED = "".join(f"{i}\n" for i in range(LINES))


def jupyter_client_cell(kernel_name: str) -> list[float]:
    """The cell in a kernel started through jupyter_client, its iopub read as it comes (as a frontend does)."""
    km, kc = start_new_kernel(kernel_name=kernel_name, startup_timeout=120)

    def cell() -> None:
        text: list[str] = []

        def collect(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
                text.append(msg["content"]["text"])

        kc.execute_interactive(CODE, output_hook=collect, timeout=300)
        assert "".join(text) == EXPECTED, f"{kernel_name} lost lines"

    try:
        return timed(cell, RUNS, warmup=1)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def run_code_cell(sandbox: Sandbox) -> None:
    execution = sandbox.run_code(CODE)
    assert "".join(execution.logs.stdout) == EXPECTED, "run_code lost lines"


def main() -> None:
    baseline = p50_ms(jupyter_client_cell("python3"))
    rows = [("ipykernel (python3) via jupyter_client (baseline)", baseline)]
    with local_server() as info:
        config = ScaleboxConfig(api_key=info.api_key, api_url=info.url, ca_file=info.certfile)
        with Sandbox.create(config=config) as sandbox:
            rows.append(("Sandbox.run_code -> scalebox-local", p50_ms(timed(lambda: run_code_cell(sandbox), RUNS, 1))))
        with tempfile.TemporaryDirectory(prefix="scalebox-bench-specs-") as specs:
            write_kernelspec(LANGUAGES["python"], Path(specs) / "kernels" / "scalebox-python")
            with env_set({**server_env(info), "JUPYTER_PATH": specs}):
                rows.append(("Scalebox kernel -> scalebox-local", p50_ms(jupyter_client_cell("scalebox-python"))))
    report(f"{LINES} flushed lines in one cell, {RUNS} runs each (wall time of the cell)", rows, baseline)
    for name, value in rows:
        print(f"  {name:<48} {LINES / value * 1000:10.0f} lines/s")


if __name__ == "__main__":
    main()
