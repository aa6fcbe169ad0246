"""The external conformance suite (jupyter_kernel_test, PyPI) against scalebox-r, scalebox-nodejs,
scalebox-typescript, scalebox-java and scalebox-bash, each running its cells in a real scalebox-local sandbox.

Tests left out, and why:
- `test_completion`, `test_inspect`, `test_is_complete`, `test_pager` (every language here): the wire protocol has
  no completion or inspection RPC, and the Scalebox kernel answers them by running IPython helpers inside the
  sandbox, which only a Python context has; for the other languages it replies with no matches / not found /
  `unknown`, so no samples are configured.
- `test_clear_output` (every language): the sandbox's Execute stream carries stdout, stderr, results and errors
  only (PROTOCOL.md section 5.4), so clear_output cannot reach the kernel (as for scalebox-python).
- `IopubWelcomeTests` (JEP 65): the kernel's ipykernel base does not send `iopub_welcome`.
- `test_execute_stderr` for bash: bash runs on a pty in bash_kernel, so its stderr arrives merged into stdout.
- `test_execute_result` and `test_history` for bash: bash has no values (history needs execute_result samples).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jupyter_kernel_test
import pytest
from conftest import LocalServer
from kernel_support import environ, install_kernelspecs
from language_support import skip_reason

pytestmark = pytest.mark.timeout(300)  # a first run may install the runtimes (about a minute)


@pytest.fixture(scope="module", autouse=True)
def scalebox_env(local_server: LocalServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Kernelspecs on JUPYTER_PATH and the test server in the environment, before the suite's setUpClass."""
    jupyter_path = install_kernelspecs(Path(tmp_path_factory.mktemp("kernelspecs")))
    with environ({"JUPYTER_PATH": str(jupyter_path), **local_server.env()}):
        yield


class _Language:
    """Skips the suite of a language this machine could not install (with the reason), before its kernel starts."""

    language_key = ""

    @classmethod
    def setUpClass(cls) -> None:
        why = skip_reason(cls.language_key)
        if why:
            pytest.skip(why)
        super().setUpClass()  # type: ignore[misc]

    supported_history_operations = ("tail", "range", "search")


class ScaleboxRTests(_Language, jupyter_kernel_test.KernelTests):
    language_key = "r"
    kernel_name = "scalebox-r"
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
    code_history_pattern = "1 + 2*"


class ScaleboxNodeTests(_Language, jupyter_kernel_test.KernelTests):
    language_key = "nodejs"
    kernel_name = "scalebox-nodejs"
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
    code_history_pattern = "1 + 2*"


class ScaleboxTypeScriptTests(_Language, jupyter_kernel_test.KernelTests):
    language_key = "typescript"
    kernel_name = "scalebox-typescript"
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
    code_history_pattern = "1 + 2*"


class ScaleboxJavaTests(_Language, jupyter_kernel_test.KernelTests):
    language_key = "java"
    kernel_name = "scalebox-java"
    language_name = "java"
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
    code_history_pattern = "1 + 2*"


class ScaleboxBashTests(_Language, jupyter_kernel_test.KernelTests):
    language_key = "bash"
    kernel_name = "scalebox-bash"
    language_name = "bash"
    file_extension = ".sh"
    code_hello_world = "echo 'hello, world'"
    code_generate_error = "false"
    code_display_data: list[dict[str, Any]] = [
        {"code": "echo '<b>x</b>' | displayHTML", "mime": "text/html"},
    ]
