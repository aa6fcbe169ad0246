"""Issue 2: p50 latency of a trivial run_code through our client against scalebox-local, beside the same code
run directly in an ipykernel through jupyter_client. Prints ratios; asserts nothing.

Run with `python -m bench.bench_run_code` from the repository root.
"""

from __future__ import annotations

import os

from bench._common import local_server, p50_ms, plain_ipykernel_cell, report, timed
from scalebox_kernel.client import Sandbox
from scalebox_kernel.config import ScaleboxConfig

RUNS = int(os.environ.get("BENCH_RUNS", "50"))
CODE = "1 + 1"


def main() -> None:
    baseline = p50_ms(plain_ipykernel_cell(CODE, RUNS))
    rows = [("ipykernel via jupyter_client (baseline)", baseline)]
    for tls in (False, True):
        with local_server(tls=tls) as info:
            config = ScaleboxConfig(api_key=info.api_key, api_url=info.url, ca_file=info.certfile)
            sandbox = Sandbox.create(config=config)
            try:
                samples = timed(lambda sandbox=sandbox: sandbox.run_code(CODE), RUNS)
                rows.append((f"Sandbox.run_code over {'HTTPS' if tls else 'HTTP'}", p50_ms(samples)))
            finally:
                sandbox.kill()
    report(f"trivial cell `{CODE}`, {RUNS} runs each", rows, baseline)


if __name__ == "__main__":
    main()
