"""The external conformance suite (jupyter_kernel_test, PyPI) against `scalebox-python` on a real scalebox-local.

The whole suite is configured: stdout, stderr, errors, execute results and displays of every common MIME type,
completion (samples that only the sandbox's own kernel can answer, such as a module's attributes), is_complete,
inspection, the pager (`zip?`), `clear_output`, history (tail, range and search), and JEP 65's `iopub_welcome`
(which the plain ipykernel of the test environment sends, so a relayed kernel must too).
"""

from __future__ import annotations

from collections.abc import Iterator

import jupyter_kernel_test
import pytest
from conftest import LocalServer
from kernel_support import KERNEL, scalebox_kernels

pytestmark = pytest.mark.timeout(300)  # the welcome test waits for the first iopub message without a limit


@pytest.fixture(scope="module", autouse=True)
def scalebox_env(local_server: LocalServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Kernelspecs on JUPYTER_PATH and the test server in the environment, before the suite's setUpClass."""
    with scalebox_kernels(local_server, tmp_path_factory):
        yield


PNG_CELL = "%matplotlib inline\nimport matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()"
JPEG_CELL = (
    "import io\nfrom PIL import Image as Picture\nfrom IPython.display import Image, display\n"
    "buffer = io.BytesIO()\nPicture.new('RGB', (4, 4), 'red').save(buffer, 'jpeg')\n"
    "display(Image(buffer.getvalue(), format='jpeg'))"
)


class ScaleboxPythonTests(jupyter_kernel_test.KernelTests):
    kernel_name = KERNEL
    language_name = "python"
    file_extension = ".py"

    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    code_generate_error = "raise RuntimeError('boom')"
    code_page_something = "zip?"
    code_inspect_sample = "zip"
    code_clear_output = "from IPython.display import clear_output; clear_output()"

    # Jedi reads the code without running it; numpy is there in the sandbox's runtimes venv.
    completion_samples = [
        {"text": "zi", "matches": {"zip"}},
        {"text": "import os; os.pa", "matches": {"pardir", "path", "pathconf", "pathconf_names", "pathsep"}},
        {"text": "import json; json.lo", "matches": {"load", "loads"}},
        {"text": "import numpy; numpy.arang", "matches": {"arange"}},
    ]

    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n", "%scalebox info"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2", "for i in range(3):"]
    invalid_code_samples = ["import = 7q", "1+\n"]

    code_execute_result = [
        {"code": "1+2+3", "result": "6"},
        {"code": "[n * n for n in range(1, 4)]", "result": "[1, 4, 9]"},
        {"code": "'abc'", "result": "'abc'"},
        {"code": "from IPython.display import HTML\nHTML('<b>x</b>')", "mime": "text/html", "result": "<b>x</b>"},
    ]
    code_display_data = [
        {"code": "from IPython.display import HTML, display; display(HTML('<b>test</b>'))", "mime": "text/html"},
        {"code": "from IPython.display import Markdown, display; display(Markdown('**b**'))", "mime": "text/markdown"},
        {"code": "from IPython.display import Math, display; display(Math(r'\\frac{1}{2}'))", "mime": "text/latex"},
        {"code": "from IPython.display import JSON, display; display(JSON({'a': [1, 2]}))", "mime": "application/json"},
        {"code": "from IPython.display import SVG, display; display(SVG('<svg/>'))", "mime": "image/svg+xml"},
        {"code": PNG_CELL, "mime": "image/png"},
        {"code": JPEG_CELL, "mime": "image/jpeg"},
        {"code": "display({'application/pdf': 'JVBERi0=', 'text/plain': 'pdf'}, raw=True)", "mime": "application/pdf"},
        {"code": "display({'application/javascript': '1;'}, raw=True)", "mime": "application/javascript"},
        {"code": "display({'application/vnd.custom+json': {'k': 1}}, raw=True)", "mime": "application/vnd.custom+json"},
    ]

    code_history_pattern = "1?2*"
    supported_history_operations = ("tail", "range", "search")


class ScaleboxPythonWelcomeTests(jupyter_kernel_test.IopubWelcomeTests):
    kernel_name = KERNEL
    support_iopub_welcome = True


class PlainIpykernelWelcomeTests(jupyter_kernel_test.IopubWelcomeTests):
    """The reason the welcome is claimed above: the test environment's own ipykernel (`python3`) sends it."""

    kernel_name = "python3"
    support_iopub_welcome = True
