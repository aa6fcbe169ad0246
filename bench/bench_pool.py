"""Issue 15: what the warm pool saves, each beside its baseline in the same run.

- `Sandbox.create()` + the first `run_code("1+1")` result, on a scalebox-local with its warm pool and on one with
  the pool off (cold), taking turns;
- kernel start + first result through jupyter_client: the Scalebox (Python) kernel on the pooled server and on the
  cold one, beside a plain ipykernel started and asked the same cell;
- the first cell in Bash, Node.js and R: a sandbox of a pool that starts that language's kernel too, vs cold.

The pooled server is given time to refill between runs (what a notebook opened now and then sees). Prints medians
and ratios; asserts nothing but that every cell answered. Run with `python -m bench.bench_pool` from the
repository root; BENCH_RUNS sets the runs of each row (default 7).
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable

from jupyter_client.manager import start_new_kernel

from bench._common import (
    env_set,
    local_server,
    own_zygote,
    scalebox_kernelspecs,
    server_env,
    wait_for_zygote,
    wait_pool,
)
from scalebox_kernel.client import Sandbox
from scalebox_kernel.config import ScaleboxConfig
from scalebox_kernel.local import LocalServerInfo

RUNS = int(os.environ.get("BENCH_RUNS", "7"))
POOLED = ["--ServerSettings.pool_size=2"]
COLD = ["--ServerSettings.pool_size=0"]
FIRST_CELLS = {"bash": "echo 2", "nodejs": "1+1", "r": "cat(2)"}


def config(info: LocalServerInfo) -> ScaleboxConfig:
    return ScaleboxConfig(api_key=info.api_key, api_url=info.url, ca_file=info.certfile)


def create_and_first_result(info: LocalServerInfo, language: str = "python", code: str = "1+1") -> float:
    start = time.perf_counter()
    sandbox = Sandbox.create(config=config(info))
    try:
        execution = sandbox.run_code(code, language=language, timeout=120)
        elapsed = time.perf_counter() - start
        assert execution.error is None and (execution.text or "".join(execution.logs.stdout)).strip() == "2", execution
        return elapsed
    finally:
        sandbox.kill()
        sandbox.close()


def kernel_start_and_first_result(kernel_name: str) -> float:
    start = time.perf_counter()
    km, kc = start_new_kernel(kernel_name=kernel_name, startup_timeout=120)
    try:
        seen: list[str] = []

        def hook(msg: dict) -> None:  # type: ignore[type-arg]
            if msg["msg_type"] == "execute_result":
                seen.append(msg["content"]["data"]["text/plain"])

        reply = kc.execute_interactive("1+1", output_hook=hook, timeout=120)
        elapsed = time.perf_counter() - start
        assert reply["content"]["status"] == "ok" and seen == ["2"], (reply["content"], seen)
        return elapsed
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def turns(
    rows: dict[str, Callable[[], float]],
    before: dict[str, Callable[[], None]],
    after_warm_up: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Each row RUNS times, taking turns (the machine's load then weighs on all alike); medians in ms."""
    samples: dict[str, list[float]] = {name: [] for name in rows}
    for name in rows:  # one warm-up each, not counted
        before.get(name, lambda: None)()
        rows[name]()
    after_warm_up()
    for _ in range(RUNS):
        for name, row in rows.items():
            before.get(name, lambda: None)()
            samples[name].append(row())
    return {name: median_ms(values) for name, values in samples.items()}


def show(title: str, results: dict[str, float], baseline: str) -> None:
    print(f"\n{title} ({RUNS} runs each, medians)")
    for name, value in results.items():
        print(f"  {name:<58} {value:9.1f} ms   {value / results[baseline]:6.2f}x")


def main() -> None:
    with local_server(extra_args=POOLED) as pooled, local_server(extra_args=COLD) as cold:
        wait_pool(pooled)
        results = turns(
            {
                "cold: Sandbox.create() + first result (baseline)": lambda: create_and_first_result(cold),
                "warm pool: Sandbox.create() + first result": lambda: create_and_first_result(pooled),
            },
            {"warm pool: Sandbox.create() + first result": lambda: wait_pool(pooled)},
        )
        show(
            "Sandbox.create() + the first run_code result", results, "cold: Sandbox.create() + first result (baseline)"
        )

        with scalebox_kernelspecs() as specs, own_zygote() as zygotes:
            kernels = {
                "plain ipykernel: start + first result (baseline)": lambda: kernel_start_and_first_result("python3"),
            }
            for name, info in (("warm pool", pooled), ("cold", cold)):

                def run(info: LocalServerInfo = info) -> float:
                    with env_set({**server_env(info), "JUPYTER_PATH": specs}):
                        return kernel_start_and_first_result("scalebox-python")

                kernels[f"Scalebox kernel, {name}: start + first result"] = run
            results = turns(
                kernels,
                {"Scalebox kernel, warm pool: start + first result": lambda: wait_pool(pooled)},
                after_warm_up=lambda: wait_for_zygote(zygotes),  # the first start spawned it; later ones fork
            )
            show(
                "kernel start + first result (jupyter_client)",
                results,
                "plain ipykernel: start + first result (baseline)",
            )

    languages = list(FIRST_CELLS)
    pooled_languages = [*POOLED, f"--ServerSettings.pool_languages={languages!r}"]
    with local_server(extra_args=pooled_languages) as pooled, local_server(extra_args=COLD) as cold:
        wait_pool(pooled)
        for language, code in FIRST_CELLS.items():
            cold_row, warm_row = (
                f"{language} cold: create + first cell (baseline)",
                f"{language} warm pool: create + first cell",
            )
            results = turns(
                {
                    cold_row: functools.partial(create_and_first_result, cold, language, code),
                    warm_row: functools.partial(create_and_first_result, pooled, language, code),
                },
                {warm_row: functools.partial(wait_pool, pooled)},
            )
            show(f"the first {language} cell", results, cold_row)


if __name__ == "__main__":
    main()
