"""The external conformance suite (jupyter_kernel_test, PyPI) run both ways for R, Node.js, TypeScript, Java and
Bash: against the language's native kernel started directly on this machine (`native-<lang>`, launched as
scalebox-local launches it, see conformance_support.py) and against `scalebox-<lang>` on a real scalebox-local.

Each language configures every sample the suite knows (completion, is_complete, inspect, pager where the language
has one, clear_output, execute results, displays, history), spelled so that they are right for that language's
native kernel. Nothing is skipped by hand: the native run decides what the kernel can do, and every test and
sub-test that passes natively must pass through the Scalebox kernel. Both runs are printed side by side (run
pytest with `-s` to see them), with the first error line of each failure.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conformance_support import (
    PASSED,
    LaunchedKernelTests,
    comparison_table,
    lost_through_scalebox,
    run_suite,
    write_native_kernelspec,
)
from conftest import LocalServer
from kernel_support import scalebox_kernels
from language_support import OTHER_LANGUAGES, skip_reason

pytestmark = pytest.mark.timeout(400)  # two kernels per language; a first run may install the runtimes


@pytest.fixture(scope="module")
def native_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The JUPYTER_PATH entry that holds the `native-<lang>` kernelspecs (written per test)."""
    return Path(tmp_path_factory.mktemp("native-kernelspecs"))


@pytest.fixture(scope="module", autouse=True)
def scalebox_env(
    local_server: LocalServer, tmp_path_factory: pytest.TempPathFactory, native_path: Path
) -> Iterator[None]:
    """Both kinds of kernelspec on JUPYTER_PATH and the test server in the environment, before any kernel starts."""
    with scalebox_kernels(local_server, tmp_path_factory, native_path):
        yield


HISTORY = ("tail", "range", "search")


class RSamples:
    """IRkernel."""

    language_name = "R"
    file_extension = ".r"
    code_hello_world = "cat('hello, world\\n')"
    code_stderr = "message('test')"
    code_generate_error = "stop('boom')"
    code_execute_result: list[dict[str, Any]] = [
        {"code": "1 + 2 + 3", "result": "[1] 6"},
        {"code": "data.frame(a = 1:2)", "mime": "text/html"},
    ]
    code_display_data: list[dict[str, Any]] = [
        {"code": "plot(1:10)", "mime": "image/png"},
        {"code": "IRdisplay::display_html('<b>x</b>')", "mime": "text/html"},
        {"code": "IRdisplay::display_markdown('**x**')", "mime": "text/markdown"},
    ]
    completion_samples: list[dict[str, Any]] = [
        {"text": "seq_l", "matches": {"seq_len"}},
        {"text": "data.fr", "matches": {"data.frame"}},
    ]
    complete_code_samples = ["1 + 1", "f <- function(x) x * 2", "cat('a')"]
    incomplete_code_samples = ["f <- function(x) {", "print('a", "x <- c(1,"]
    invalid_code_samples = [")", "1 2"]
    code_inspect_sample = "print"
    code_page_something = "?print"
    code_clear_output = "IRdisplay::clear_output()"
    code_history_pattern = "1 + 2*"
    supported_history_operations = HISTORY


class NodeSamples:
    """tslab's jslab."""

    language_name = "javascript"
    file_extension = ".js"
    code_hello_world = "console.log('hello, world')"
    code_stderr = "console.error('test')"
    code_generate_error = "throw new Error('boom')"
    code_execute_result: list[dict[str, Any]] = [
        {"code": "1 + 2 + 3", "result": "6"},
        {"code": "[1, 2, 3].map((n) => n * n)", "result": "[ 1, 4, 9 ]"},
    ]
    code_display_data: list[dict[str, Any]] = [
        {"code": "require('tslab').display.html('<b>x</b>')", "mime": "text/html"},
        {"code": "require('tslab').display.markdown('**x**')", "mime": "text/markdown"},
        {"code": "require('tslab').display.png(Buffer.from('iVBORw0KGgo=', 'base64'))", "mime": "image/png"},
    ]
    completion_samples: list[dict[str, Any]] = [
        {"text": "Math.ab", "matches": {"abs"}},
        {"text": "JSON.str", "matches": {"stringify"}},
    ]
    complete_code_samples = ["1 + 1", "let a = 1;", "function f(x) { return x; }"]
    incomplete_code_samples = ["function f(x) {", "1 +", "[1, 2,"]
    invalid_code_samples = ["1 + )", "let = 7q"]
    code_inspect_sample = "Math"
    code_clear_output = "console.clear()"  # the language's own idiom: jslab has no clear_output of its own
    code_history_pattern = "1 + 2*"
    supported_history_operations = HISTORY


class TypeScriptSamples:
    """Deno's `deno jupyter`."""

    language_name = "typescript"
    file_extension = ".ts"
    code_hello_world = "console.log('hello, world')"
    code_stderr = "console.error('test')"
    code_generate_error = "throw new Error('boom')"
    code_execute_result: list[dict[str, Any]] = [
        {"code": "1 + 2 + 3", "result": "6"},
        {"code": "const n: number = 6; n * 7", "result": "42"},
        {"code": "Deno.jupyter.html`<b>x</b>`", "mime": "text/html", "result": "<b>x</b>"},
    ]
    code_display_data: list[dict[str, Any]] = [
        {"code": "await Deno.jupyter.display({'text/html': '<b>x</b>'}, { raw: true })", "mime": "text/html"},
        {"code": "await Deno.jupyter.display({'text/markdown': '**x**'}, { raw: true })", "mime": "text/markdown"},
    ]
    completion_samples: list[dict[str, Any]] = [
        {"text": "Math.ab", "matches": {"abs"}},
        {"text": "JSON.str", "matches": {"stringify"}},
    ]
    complete_code_samples = ["1 + 1", "const a: number = 1;"]
    incomplete_code_samples = ["function f(x: number) {", "[1, 2,", "`abc"]
    invalid_code_samples = ["1 + )", "}"]
    code_inspect_sample = "Math"
    code_clear_output = "await Deno.jupyter.broadcast('clear_output', { wait: false })"
    code_history_pattern = "1 + 2*"
    supported_history_operations = HISTORY


class JavaSamples:
    """JJava (JShell)."""

    language_name = "Java"
    file_extension = ".jshell"
    code_hello_world = 'System.out.println("hello, world");'
    code_stderr = 'System.err.println("test");'
    code_generate_error = 'throw new RuntimeException("boom");'
    code_execute_result: list[dict[str, Any]] = [
        {"code": "1 + 2 + 3", "result": "6"},
        {"code": '"ab".repeat(2)', "result": "abab"},
    ]
    code_display_data: list[dict[str, Any]] = [
        {"code": 'display("<b>x</b>", "text/html");', "mime": "text/html"},
        {"code": 'display("**x**", "text/markdown");', "mime": "text/markdown"},
    ]
    completion_samples: list[dict[str, Any]] = [
        {"text": "Math.ab", "matches": {"abs(", "absExact("}},
        {"text": "Syste", "matches": {"System"}},
    ]
    complete_code_samples = ["1 + 1", "int x = 1;"]
    incomplete_code_samples = ["void f() {", "1 +", "for (int i = 0; i < 3; i++) {"]
    invalid_code_samples = ["1 + )", "int x = ;"]
    code_inspect_sample = "Math"
    code_clear_output = 'System.out.print("\\033[H\\033[2J");'  # JJava has no clear_output of its own
    code_history_pattern = "1 + 2*"
    supported_history_operations = HISTORY


class BashSamples:
    """bash_kernel (bash on a pty: stderr arrives merged into stdout, commands have no values)."""

    language_name = "bash"
    file_extension = ".sh"
    code_hello_world = "echo 'hello, world'"
    code_stderr = "echo test >&2"
    code_generate_error = "false"
    code_execute_result: list[dict[str, Any]] = [{"code": "echo $((1 + 2 + 3))", "result": "6"}]
    code_display_data: list[dict[str, Any]] = [{"code": "echo '<b>x</b>' | displayHTML", "mime": "text/html"}]
    completion_samples: list[dict[str, Any]] = [
        {"text": "ech", "matches": {"echo"}},
        {"text": "$HOM", "matches": {"$HOME"}},
    ]
    complete_code_samples = ["echo hi", "x=1"]
    incomplete_code_samples = ["if true; then", "for x in 1 2; do"]
    invalid_code_samples = ["fi", "done"]
    code_inspect_sample = "echo"
    code_clear_output = "clear"
    code_history_pattern = "echo*"
    supported_history_operations = HISTORY


SAMPLES: dict[str, type] = {
    "r": RSamples,
    "nodejs": NodeSamples,
    "typescript": TypeScriptSamples,
    "java": JavaSamples,
    "bash": BashSamples,
}


@pytest.mark.parametrize("language", OTHER_LANGUAGES)
def test_scalebox_passes_what_native_passes(language: str, native_path: Path, tmp_path: Path) -> None:
    """The same suite, the same samples, two kernels: nothing the native kernel passes may fail through Scalebox."""
    why = skip_reason(language)
    if why:
        pytest.skip(why)
    samples = SAMPLES[language]
    native_kernel = write_native_kernelspec(language, tmp_path / "native", native_path)
    launch = {"env": native_kernel.env, "cwd": str(native_kernel.cwd)}
    native_case = type(
        f"Native{samples.__name__}",
        (samples, LaunchedKernelTests),
        {"kernel_name": native_kernel.name, "launch_options": launch},
    )
    scalebox_case = type(
        f"Scalebox{samples.__name__}", (samples, LaunchedKernelTests), {"kernel_name": f"scalebox-{language}"}
    )

    native = run_suite(native_case)
    scalebox = run_suite(scalebox_case)
    print(f"\n{comparison_table(native, scalebox)}")

    assert not native.class_errors, f"the native {language} kernel did not run: {native.class_errors}"
    assert native.with_status(PASSED), f"nothing passed against the native {language} kernel"
    lost = lost_through_scalebox(native, scalebox)
    details = [f"{name}: {scalebox.details.get(name, scalebox.units.get(name, 'not run'))}" for name in lost]
    assert not lost, f"pass natively but not through scalebox-{language}:\n" + "\n".join(details)
