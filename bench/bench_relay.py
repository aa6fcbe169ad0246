"""Issue 11: the Scalebox kernel's two paths, the relay (SCALEBOX_CHANNEL=jupyter: Jupyter messages over the
sandbox's Jupyter endpoint) and the fallback (SCALEBOX_CHANNEL=execute: ExecutionService.Execute), each beside a
plain ipykernel measured in the same run, on three workloads:

- a trivial cell `1+1` (goal <= 1.25x the baseline): wall time of the cell;
- 20 MiB of stdout in one write of 1 KiB lines: time until the execute_reply and every byte of the stream arrived;
- a 20 MiB PNG shown with `display(..., raw=True)`: time until its display_data arrived.

One kernel per path runs all three, the paths taking turns run by run; a kernel's first cell opens the sandbox
(and builds the PNG) and is not counted, nor is the first run of each workload. The bench asserts nothing about
speed, but it checks that all output arrived (a path that loses output would look fast) and marks a row that lost
some. Until the relay lands, both settings take today's path and their rows differ only by noise.

Run with `python -m bench.bench_relay` from the repository root. BENCH_RUNS sets the runs of every workload
(default 30 for the trivial cell, 5 for the big ones).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import start_new_kernel

from bench._common import env_set, local_server, p50_ms, report, scalebox_kernelspecs, server_env

MIB = 1024 * 1024
SIZE = 20 * MIB
TIMEOUT = 120.0  # seconds one cell may take before the bench gives up on it
LINE = "x" * 1023 + "\n"
STDOUT_CODE = f"import sys; sys.stdout.write({LINE!r} * {SIZE // len(LINE)}); sys.stdout.flush()"
EXPECTED_STDOUT = LINE * (SIZE // len(LINE))

# A real PNG of about 20 MiB (random RGBA pixels in stored, uncompressed deflate blocks, so no layer can shrink
# it), built once in the kernel; the cell prints the base64 length and digest that the bench checks against.
SETUP_CODE = f"""
def _bench_png(size):
    import base64, hashlib, os, struct, zlib
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    width = 2048
    height = size // (4 * width + 1)
    rows = b"".join(b"\\0" + os.urandom(4 * width) for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 0)) + chunk(b"IEND", b"")
    png = b"\\x89PNG\\r\\n\\x1a\\n" + body
    text = base64.b64encode(png).decode()
    print(len(png), len(text), hashlib.sha256(text.encode()).hexdigest())
    return text
_bench_png_b64 = _bench_png({SIZE})
from IPython.display import display as _bench_display
"""
PNG_CODE = "_bench_display({'image/png': _bench_png_b64}, raw=True)"

PATHS = [
    ("ipykernel (python3), baseline", "python3", None),
    ("Scalebox, SCALEBOX_CHANNEL=jupyter (relay)", "scalebox-python", "jupyter"),
    ("Scalebox, SCALEBOX_CHANNEL=execute (fallback)", "scalebox-python", "execute"),
]


@dataclass
class Png:
    """What the kernel says it built: the PNG's size, and its base64 text's length and digest."""

    size: int
    b64_len: int
    digest: str


@dataclass
class Samples:
    """One path's timings of one workload, and what went missing (empty when every byte arrived)."""

    seconds: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def run_cell(kc: BlockingKernelClient, code: str, on_output: Callable[[dict[str, Any]], None]) -> float:
    """Run one cell; return its wall seconds, until the execute_reply and the kernel's idle (so all output) came."""
    start = time.perf_counter()
    reply = kc.execute_interactive(code, output_hook=on_output, timeout=TIMEOUT)
    elapsed = time.perf_counter() - start
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"cell failed: {reply['content'].get('ename')}: {reply['content'].get('evalue')}")
    return elapsed


def trivial(kc: BlockingKernelClient, png: Png) -> tuple[float, str | None]:
    return run_cell(kc, "1+1", lambda msg: None), None


def stdout(kc: BlockingKernelClient, png: Png) -> tuple[float, str | None]:
    chunks: list[str] = []

    def collect(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            chunks.append(msg["content"]["text"])

    elapsed = run_cell(kc, STDOUT_CODE, collect)
    text = "".join(chunks)
    if text != EXPECTED_STDOUT:
        changed = ", content changed" if len(text) == len(EXPECTED_STDOUT) else ""
        return elapsed, f"stdout: {len(text)} of {len(EXPECTED_STDOUT)} bytes{changed}"
    return elapsed, None


def display_png(kc: BlockingKernelClient, png: Png) -> tuple[float, str | None]:
    """Timed until the display_data arrives, not until the cell ends: the picture showing is what a user waits for."""
    arrived: list[tuple[float, str]] = []
    start = time.perf_counter()

    def collect(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "display_data" and "image/png" in msg["content"]["data"]:
            arrived.append((time.perf_counter(), msg["content"]["data"]["image/png"]))

    whole = run_cell(kc, PNG_CODE, collect)
    if len(arrived) != 1:
        return whole, f"png: {len(arrived)} display_data messages with image/png, not 1"
    at, text = arrived[0]
    if len(text) != png.b64_len or hashlib.sha256(text.encode()).hexdigest() != png.digest:
        changed = ", content changed" if len(text) == png.b64_len else ""
        return at - start, f"png: {len(text)} of {png.b64_len} base64 chars{changed}"
    return at - start, None


WORKLOADS: list[tuple[str, Callable[[BlockingKernelClient, Png], tuple[float, str | None]], int]] = [
    ("trivial cell `1+1` (goal <= 1.25x)", trivial, 30),
    ("20 MiB of stdout, 1 KiB lines in one write (until execute_reply and every byte)", stdout, 5),
    ("20 MiB PNG via display(raw=True) (until its display_data)", display_png, 5),
]


def setup(kc: BlockingKernelClient) -> Png:
    """The warm-up cell: opens the sandbox (on the Scalebox paths) and builds the PNG in the kernel."""
    out: list[str] = []

    def collect(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            out.append(msg["content"]["text"])

    run_cell(kc, SETUP_CODE, collect)
    size, b64_len, digest = "".join(out).split()
    return Png(int(size), int(b64_len), digest)


@dataclass
class PathKernel:
    """One path's kernel, the PNG it built, and its samples per workload."""

    name: str
    kc: BlockingKernelClient
    png: Png
    results: dict[str, Samples] = field(default_factory=dict)
    taken: str = ""  # the path the Scalebox kernel says its cells took


def path_taken(kc: BlockingKernelClient) -> str:
    """The `channel` row of `%scalebox info`: which path this kernel's cells really took (the setting only asks)."""
    text: list[str] = []

    def collect(msg: dict[str, Any]) -> None:
        content = msg["content"]
        if msg["msg_type"] == "stream":
            text.append(content["text"])
        elif msg["msg_type"] in ("display_data", "execute_result"):
            text.append(str(content["data"].get("text/plain", "")))

    run_cell(kc, "%scalebox info", collect)
    rows = [line.strip() for line in "".join(text).splitlines() if line.strip().startswith("channel")]
    return rows[0].removeprefix("channel").strip(" :") if rows else "not said by %scalebox info"


@contextmanager
def path_kernel(name: str, kernel_name: str, env: dict[str, str]) -> Iterator[PathKernel]:
    """A kernel started under `env` (the Scalebox kernel reads SCALEBOX_CHANNEL at start), its warm-up cell run."""
    with env_set(env):
        km, kc = start_new_kernel(kernel_name=kernel_name, startup_timeout=120)
    try:
        yield PathKernel(name, kc, setup(kc))
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=kernel_name == "python3")  # a Scalebox kernel closes its sandbox on a clean shutdown


def measure(kernels: list[PathKernel], runs: dict[str, int]) -> None:
    """Every workload on every path, the paths taking turns run by run (in a rotating order, so none always follows
    the same one), so that load from other processes on this shared machine falls on all of them alike; the first
    run of each (workload, path) is not counted."""
    for title, workload, _ in WORKLOADS:
        for kernel in kernels:
            kernel.results[title] = Samples()
            workload(kernel.kc, kernel.png)
        for run in range(runs[title]):
            for kernel in kernels[run % len(kernels) :] + kernels[: run % len(kernels)]:
                seconds, problem = workload(kernel.kc, kernel.png)
                kernel.results[title].seconds.append(seconds)
                if problem:
                    kernel.results[title].problems.append(problem)
    for kernel in kernels[1:]:
        kernel.taken = path_taken(kernel.kc)


def print_tables(kernels: list[PathKernel], runs: dict[str, int]) -> None:
    png = kernels[0].png
    print(f"PNG: {png.size} bytes ({png.size / MIB:.1f} MiB), {png.b64_len} base64 chars")
    for kernel in kernels[1:]:
        print(f"{kernel.name}: cells took {kernel.taken}")
    for title, _, _ in WORKLOADS:
        rows = [(kernel.name, p50_ms(kernel.results[title].seconds)) for kernel in kernels]
        report(f"{title}, {runs[title]} runs each", rows, rows[0][1])
        spread = ", ".join(
            f"{min(k.results[title].seconds) * 1000:.0f}-{max(k.results[title].seconds) * 1000:.0f}" for k in kernels
        )
        print(f"  (min-max ms, same order: {spread})")
        for kernel in kernels:
            problems = kernel.results[title].problems
            for problem in sorted(set(problems)):
                print(f"  ! {kernel.name}: output lost in {problems.count(problem)} of {runs[title]} runs: {problem}")


def main() -> None:
    override = os.environ.get("BENCH_RUNS")
    runs = {title: int(override) if override else default for title, _, default in WORKLOADS}
    started = time.perf_counter()
    with scalebox_kernelspecs() as specs, local_server() as info, ExitStack() as stack:
        kernels = []
        for name, kernel_name, channel in PATHS:
            env = {**server_env(info), "JUPYTER_PATH": specs}
            if channel:
                env["SCALEBOX_CHANNEL"] = channel
            kernels.append(stack.enter_context(path_kernel(name, kernel_name, env)))
        measure(kernels, runs)
    print_tables(kernels, runs)
    print(f"\nwhole bench: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
