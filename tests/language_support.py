"""Shared by the language tests and benchmarks: the runtimes, installed once (idempotently) by the real installer,
and one table of cells per language that exercise the same things everywhere."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from scalebox_kernel.server.runtimes_install import Installer
from scalebox_kernel.server.runtimes_store import ORDER, RuntimeStore

#: The Scalebox kernelspec / wire name of every language besides Python.
OTHER_LANGUAGES = ("r", "nodejs", "typescript", "java", "bash")


@functools.cache
def runtimes_ready() -> dict[str, str]:
    """language -> "" when it can run here, else why not. Installs what is missing (a no-op when `.ci/run` or a
    developer already ran `jupyter scalebox runtimes install`); R needs root (apt) on a fresh machine."""
    store = RuntimeStore()
    missing = [lang for lang in ORDER if not store.installed(lang)]
    if missing:
        Installer(store, quiet=True).install(missing)
    return {lang: "" if store.installed(lang) else store.status(lang).reason for lang in ORDER}


def skip_reason(language: str) -> str:
    """Empty when `language` can run, else a loud reason to skip its tests."""
    why = runtimes_ready()[language]
    return f"the {language} runtime could not be installed on this machine: {why}" if why else ""


@dataclass(frozen=True)
class Case:
    """The same checks, spelled in each language."""

    language: str
    setup: str  # makes state: a variable holding 41
    value: str  # an expression using that state, whose value is 42
    value_text: str  # the main result's text/plain (bash has no values: its stdout instead)
    prints: str  # "hello" on stdout and "warn" on stderr
    error: str  # raises / fails
    error_name: str
    error_value: str  # a substring of the error's value
    rich: str  # a plot (png) or HTML display
    rich_format: str
    loop: str  # runs forever
    env_read: str | None  # shows SBX_LANG_TEST from the cell's env_vars (None: the kernel cannot)
    env_text: str = "v"


CASES: dict[str, Case] = {
    case.language: case
    for case in (
        Case(
            "python",
            "x = 41",
            "x + 1",
            "42",
            "import sys; print('hello'); print('warn', file=sys.stderr)",
            "raise ValueError('boom')",
            "ValueError",
            "boom",
            "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()",
            "png",
            "while True:\n    pass",
            "import os; os.environ['SBX_LANG_TEST']",
            "'v'",
        ),
        Case(
            "r",
            "x <- 41",
            "x + 1",
            "[1] 42",
            "cat('hello\\n'); message('warn')",
            "stop('boom')",
            "Error",
            "boom",
            "plot(1:10)",
            "png",
            "while (TRUE) {}",
            "Sys.getenv('SBX_LANG_TEST')",
            '[1] "v"',
        ),
        Case(
            "nodejs",
            "let x = 41",
            "x + 1",
            "42",
            "console.log('hello'); console.error('warn')",
            "throw new RangeError('boom')",
            "RangeError",
            "boom",
            "require('tslab').display.html('<b>bold</b>')",
            "html",
            "while (true) {}",
            "process.env.SBX_LANG_TEST",
            "'v'",
        ),
        Case(
            "typescript",
            "let x: number = 41",
            "x + 1",
            "42",
            "console.log('hello'); console.error('warn')",
            "throw new RangeError('boom')",
            "RangeError",
            "boom",
            "Deno.jupyter.html`<b>bold</b>`",
            "html",
            "while (true) {}",
            "Deno.env.get('SBX_LANG_TEST')",
            '"v"',
        ),
        Case(
            "java",
            "int x = 41;",
            "x + 1",
            "42",
            'System.out.println("hello"); System.err.println("warn");',
            'throw new IllegalStateException("boom");',
            "IllegalStateException",
            "boom",
            'display("<b>bold</b>", "text/html");',
            "html",
            "while (true) {}",
            None,
        ),
        Case(
            "bash",
            "x=41",
            "echo $((x + 1))",
            "42\n",
            "echo hello; echo warn >&2",
            "ls /no-such-dir",
            "CommandError",
            "exit status 2",
            "echo '<b>bold</b>' | displayHTML",
            "html",
            "while true; do :; done",
            "echo $SBX_LANG_TEST",
            "v\n",
        ),
    )
}
