"""Issue 12: p50 of a trivial `run_code("1 + 1")` through our client beside the official `scalebox-sdk==1.0.10`,
against the same default scalebox-local (one port, HTTP and HTTPS) in the same run. Prints; asserts nothing.

The SDK lives in its own venv (the one tests/test_official_sdk.py builds, made by its code if missing) and
runs in a worker process (bench/_sdk_worker.py) over HTTPS, the only scheme it speaks. Our client runs here, over
HTTP and over HTTPS, synchronously (as the SDK's `Sandbox`) and as `AsyncSandbox` on a loop of its own (the
difference is the sync wrapper's hop to its loop thread). Every client warms up, then the clients take turns in
rounds (in a rotating order) so drift of a shared machine falls on all of them alike.

Run with `python -m bench.bench_sdk` from the repository root. BENCH_ROUNDS (default 20) rounds of BENCH_RUNS
(default 20) calls per client. Beside each p50 ratio it prints the ratio of the two p50s round by round, which a
shared machine's drift disturbs less.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench._common import local_server, p50_ms, report
from scalebox_kernel.client import AsyncSandbox, Sandbox
from scalebox_kernel.config import ScaleboxConfig
from scalebox_kernel.errors import redact
from scalebox_kernel.local import LocalServerInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_official_sdk import SDK_VERSION, sdk_venv_python  # the venv that test builds, shared

WORKER = Path(__file__).with_name("_sdk_worker.py")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "20"))
RUNS = int(os.environ.get("BENCH_RUNS", "20"))
WARMUP = 10
CODE = "1 + 1"
OFFICIAL = f"official scalebox-sdk {SDK_VERSION} Sandbox, HTTPS"

#: A client under test: `run(n)` makes n calls and returns their wall seconds.
Runner = Callable[[int], list[float]]


@contextmanager
def official_sdk(info: LocalServerInfo, log: Path) -> Iterator[Runner]:
    """The SDK worker on a sandbox of its own; its chatter goes to `log` (shown redacted if it fails)."""
    assert info.certfile, "the default scalebox-local names its certificate in the runtime file"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SCALEBOX_", "SBX_", "PYTHON"))}
    env.update(SBX_API_KEY=info.api_key, SBX_DOMAIN=info.url.split("://", 1)[1] + "/v1", SSL_CERT_FILE=info.certfile)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(sdk_venv_python()), str(WORKER)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=out
        )
    assert proc.stdin and proc.stdout

    def run(n: int) -> list[float]:
        assert proc.stdin and proc.stdout
        proc.stdin.write(f"run {n}\n".encode())
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:
            proc.wait(30)
            tail = redact(log.read_text(errors="replace")[-3000:], [info.api_key])
            raise RuntimeError(f"the SDK worker failed (exit {proc.returncode}):\n{tail}")
        return [float(x) for x in json.loads(line)]

    try:
        yield run
    finally:
        if proc.poll() is None:
            proc.stdin.write(b"quit\n")
            proc.stdin.close()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _check(text: str | None) -> None:
    if text != "2":
        raise RuntimeError(f"run_code({CODE!r}) gave {text!r}")


@contextmanager
def ours_sync(config: ScaleboxConfig) -> Iterator[Runner]:
    sandbox = Sandbox.create(config=config)

    def run(n: int) -> list[float]:
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            execution = sandbox.run_code(CODE)
            samples.append(time.perf_counter() - start)
            _check(execution.text)
        return samples

    try:
        yield run
    finally:
        sandbox.kill()
        sandbox.close()


@contextmanager
def ours_async(config: ScaleboxConfig) -> Iterator[Runner]:
    loop = asyncio.new_event_loop()
    sandbox = loop.run_until_complete(AsyncSandbox.create(config=config))

    async def calls(n: int) -> list[float]:
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            execution = await sandbox.run_code(CODE)
            samples.append(time.perf_counter() - start)
            _check(execution.text)
        return samples

    try:
        yield lambda n: loop.run_until_complete(calls(n))
    finally:
        loop.run_until_complete(sandbox.kill())
        loop.run_until_complete(sandbox.close())
        loop.close()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="scalebox-bench-sdk-") as tmp, local_server() as info, ExitStack() as stack:
        http = ScaleboxConfig(api_key=info.api_key, api_url=info.url)
        https = ScaleboxConfig(
            api_key=info.api_key, api_url=info.url.replace("http://", "https://", 1), ca_file=info.certfile
        )
        clients: dict[str, Runner] = {
            OFFICIAL: stack.enter_context(official_sdk(info, Path(tmp) / "sdk.log")),
            "our Sandbox, HTTP": stack.enter_context(ours_sync(http)),
            "our Sandbox, HTTPS": stack.enter_context(ours_sync(https)),
            "our AsyncSandbox, HTTP (no sync hop)": stack.enter_context(ours_async(http)),
        }
        for run in clients.values():
            run(WARMUP)
        rounds: dict[str, list[list[float]]] = {name: [] for name in clients}
        names = list(clients)
        for round_ in range(ROUNDS):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                rounds[name].append(clients[name](RUNS))
    official = p50_ms([x for r in rounds[OFFICIAL] for x in r])
    rows = [(name, p50_ms([x for r in runs for x in r])) for name, runs in rounds.items()]
    report(
        f"trivial run_code `{CODE}`, one default scalebox-local, {ROUNDS} rounds x {RUNS} calls each "
        "(ratio: p50 / the official SDK's p50)",
        rows,
        official,
    )
    print("\n  the same ratio round by round (median, and the range of the middle half):")
    for name, runs in list(rounds.items())[1:]:
        paired = sorted(p50_ms(mine) / p50_ms(theirs) for mine, theirs in zip(runs, rounds[OFFICIAL], strict=True))
        quarter = len(paired) // 4
        print(
            f"  {name:<48} {statistics.median(paired):6.2f}x   "
            f"({paired[quarter]:.2f}x to {paired[len(paired) - 1 - quarter]:.2f}x)"
        )


if __name__ == "__main__":
    main()
