"""Shared pieces of the benchmarks: a throwaway scalebox-local, a plain ipykernel baseline, percentiles."""

from __future__ import annotations

import os
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from jupyter_client.manager import start_new_kernel

from scalebox_kernel.kernel import zygote
from scalebox_kernel.kernel.install import write_kernelspec
from scalebox_kernel.kernel.languages import LANGUAGES
from scalebox_kernel.local import LocalServerInfo, spawn_local_server


@contextmanager
def local_server(tls: bool = False, extra_args: list[str] | None = None) -> Iterator[LocalServerInfo]:
    """A scalebox-local of its own in a temporary data dir (extra `serve` flags if given), stopped afterwards."""
    with tempfile.TemporaryDirectory(prefix="scalebox-bench-") as tmp:
        proc, info = spawn_local_server(
            data_dir=Path(tmp) / "data",
            runtime_dir=Path(tmp) / "runtime",
            api_key=secrets.token_hex(16),
            tls=tls,
            extra_args=extra_args,
        )
        try:
            yield info
        finally:
            proc.terminate()
            proc.wait(30)


@contextmanager
def scalebox_kernelspecs(language: str = "python") -> Iterator[str]:
    """A temporary JUPYTER_PATH holding the Scalebox kernelspec of `language`, so a bench never touches the user's."""
    with tempfile.TemporaryDirectory(prefix="scalebox-bench-specs-") as specs:
        lang = LANGUAGES[language]
        write_kernelspec(lang, Path(specs) / "kernels" / lang.kernel_name)
        yield specs


@contextmanager
def own_zygote() -> Iterator[Path]:
    """A zygote directory of the bench's own (SCALEBOX_ZYGOTE_DIR; the user's zygote is not used), the zygote it
    gets stopped afterwards. `wait_for_zygote` once the first Scalebox kernel has started it."""
    with tempfile.TemporaryDirectory(prefix="scalebox-bench-zygote-") as tmp, env_set({"SCALEBOX_ZYGOTE_DIR": tmp}):
        try:
            yield Path(tmp)
        finally:
            zygote.stop(Path(tmp))


def wait_for_zygote(directory: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not zygote.running(directory):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no zygote started in {directory}")
        time.sleep(0.05)


def wait_pool(info: LocalServerInfo, timeout: float = 120.0) -> None:
    """Until the pool is full again (a bench run should find what a user finds: a pool that had time)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=info.url, headers={"X-API-KEY": info.api_key}, verify=info.certfile or True) as http:
        while time.monotonic() < deadline:
            status = http.get("/v1/pool").json()["data"]
            if status["ready"] >= status["size"]:
                return
            time.sleep(0.05)
    raise RuntimeError(f"the pool did not fill within {timeout:.0f} s: {status}")


def server_env(info: LocalServerInfo) -> dict[str, str]:
    env = {"SCALEBOX_API_URL": info.url, "SCALEBOX_API_KEY": info.api_key}
    if info.certfile:
        env["SCALEBOX_CA_FILE"] = info.certfile
    return env


@contextmanager
def env_set(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def timed(fn: Callable[[], object], runs: int, warmup: int = 3) -> list[float]:
    """Wall seconds of `runs` calls of fn, after `warmup` calls that are not counted."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def plain_ipykernel_cell(code: str, runs: int) -> list[float]:
    """The baseline: the same cell in a plain ipykernel driven by jupyter_client."""
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        return timed(lambda: kc.execute_interactive(code, output_hook=lambda msg: None, timeout=30), runs)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def report(title: str, rows: list[tuple[str, float]], baseline: float) -> None:
    print(f"\n{title}")
    for name, value in rows:
        print(f"  {name:<48} p50 {value:8.2f} ms   ratio {value / baseline:6.2f}x")
