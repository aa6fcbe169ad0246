"""Issue 5: per language, kernel start time and the p50 latency of a trivial cell through scalebox-local (our
client, one context per language), beside the same kernel (the runtimes directory's kernelspec) driven directly
with jupyter_client. Prints ratios; asserts nothing. Languages that are not installed are listed and skipped.

Run with `python -m bench.bench_languages` from the repository root (BENCH_RUNS sets the cells per language).
"""

from __future__ import annotations

import os
import tempfile
import time

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import KernelManager
from traitlets import Instance

from bench._common import local_server, p50_ms, timed
from scalebox_kernel.client import Sandbox
from scalebox_kernel.config import ScaleboxConfig
from scalebox_kernel.server.runtimes_store import ORDER, RuntimeStore

RUNS = int(os.environ.get("BENCH_RUNS", "20"))
TRIVIAL = {"python": "1", "r": "1", "nodejs": "1", "typescript": "1", "java": "1", "bash": ":"}


class _Spec(KernelSpecManager):
    spec = Instance(KernelSpec)

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return self.spec


def direct(language: str, spec: dict[str, object]) -> tuple[float, float]:
    """(start seconds, p50 ms) of the runtime's own kernel driven with jupyter_client."""
    fields = {k: v for k, v in spec.items() if k in ("argv", "env", "display_name", "language", "interrupt_mode")}
    with tempfile.TemporaryDirectory(prefix="bench-lang-") as home:
        manager = KernelManager(kernel_spec_manager=_Spec(spec=KernelSpec(**fields)), kernel_name=language)
        started = time.perf_counter()
        manager.start_kernel(env={**os.environ, "HOME": home, **spec.get("env", {})}, cwd=home)  # type: ignore[dict-item]
        client = manager.client()
        client.start_channels()
        try:
            client.wait_for_ready(timeout=60)
            start = time.perf_counter() - started
            code = TRIVIAL[language]
            samples = timed(lambda: client.execute_interactive(code, output_hook=lambda msg: None, timeout=30), RUNS)
            return start, p50_ms(samples)
        finally:
            client.stop_channels()
            manager.shutdown_kernel(now=True)


def through_local(sandbox: Sandbox, language: str) -> tuple[float, float]:
    """(seconds from CreateContext to the first cell's result, p50 ms) through scalebox-local."""
    code = TRIVIAL[language]
    started = time.perf_counter()
    context = sandbox.create_code_context(language=language)
    first = sandbox.run_code(code, context=context)
    assert first.error is None, first.error
    start = time.perf_counter() - started
    samples = timed(lambda: sandbox.run_code(code, context=context), RUNS)
    sandbox.destroy_context(context)
    return start, p50_ms(samples)


def main() -> None:
    store = RuntimeStore()
    languages = [lang for lang in ORDER if store.spec(lang) is not None]
    for lang in ORDER:
        if lang not in languages:
            print(f"skipped {lang}: {store.status(lang).reason}")
    rows: list[tuple[str, float, float, float, float]] = []
    with local_server() as info:
        config = ScaleboxConfig(api_key=info.api_key, api_url=info.url, ca_file=info.certfile)
        sandbox = Sandbox.create(config=config, timeout=1800)
        try:
            for lang in languages:
                spec = store.spec(lang)
                assert spec is not None
                rows.append((lang, *direct(lang, spec), *through_local(sandbox, lang)))
        finally:
            sandbox.kill()
    print(f"\nper language: kernel start (s) and trivial cell p50 (ms, {RUNS} runs), direct vs through scalebox-local")
    print(
        f"  {'language':<11} {'start direct':>12} {'start local':>12} {'ratio':>6}   {'cell direct':>11} "
        f"{'cell local':>10} {'ratio':>6}"
    )
    for lang, start_d, cell_d, start_l, cell_l in rows:
        print(
            f"  {lang:<11} {start_d:12.2f} {start_l:12.2f} {start_l / start_d:5.2f}x   {cell_d:11.2f} {cell_l:10.2f} "
            f"{cell_l / cell_d:5.2f}x"
        )


if __name__ == "__main__":
    main()
