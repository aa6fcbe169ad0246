"""A real JupyterLab 4 on loopback, driven by headless Chromium the way a user works: widgets, `input()`,
`clear_output`, display updates, Tab completion and prompt numbers, each in a fresh notebook, once on the plain
ipykernel (`python3`, proving the harness) and once on the Scalebox kernel against a real scalebox-local.
Screenshots of every step land in the artifacts folder printed at the start of the run."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import pytest
from browser_support import (
    JupyterLab,
    Notebook,
    artifacts_dir,
    chromium,
    jupyterlab,
    logged_in_context,
)
from conftest import LocalServer
from kernel_support import KERNEL, install_kernelspecs
from playwright.sync_api import Browser, BrowserContext, expect
from playwright.sync_api import TimeoutError as PlaywrightTimeout

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

KERNELS = ["python3", KERNEL]
SETTLE_MS = 5_000  # how long a finished cell's outputs may take to render
WIDGET_MS = 15_000  # a widget or stdin box shows while its cell runs, after messages to and from the kernel


@pytest.fixture(scope="module")
def shots(request: pytest.FixtureRequest) -> Path:
    folder = artifacts_dir()
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else nullcontext():  # in every CI log, passing or not
        print(f"\nbrowser screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def lab(local_server: LocalServer, tmp_path_factory: pytest.TempPathFactory, shots: Path) -> Iterator[JupyterLab]:
    base = tmp_path_factory.mktemp("jupyterlab")
    env = {"JUPYTER_PATH": str(install_kernelspecs(base / "kernelspecs")), **local_server.env()}
    with jupyterlab(base, env) as server:
        try:
            yield server
        finally:
            (shots / "jupyterlab.log").write_text(server.log_text())  # the token redacted


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as running:
        yield running


@pytest.fixture(scope="module")
def context(browser: Browser, lab: JupyterLab) -> Iterator[BrowserContext]:
    ctx = logged_in_context(browser, lab)
    yield ctx
    ctx.close()


@pytest.fixture(params=KERNELS)
def notebook(
    request: pytest.FixtureRequest, lab: JupyterLab, context: BrowserContext, shots: Path
) -> Iterator[Notebook]:
    """A fresh notebook on the kernel under test, open and idle, whose first cell has run (so a Scalebox kernel
    has its sandbox and any start-up output stays out of the checked cells)."""
    label = re.sub(r"[^\w.-]+", "-", request.node.name).strip("-")
    name = f"{label}.ipynb"
    lab.create_notebook(name, request.param)
    nb = Notebook.open(context, lab, name, shots, label)
    try:
        with nb.step("first-cell"):
            first = nb.run("print('ready')")
            expect(first.locator.locator(".jp-OutputArea")).to_contain_text("ready", timeout=SETTLE_MS)
        yield nb
    finally:
        nb.close()
        lab.shutdown_session(name)


def test_slider_moves_kernel_value(notebook: Notebook) -> None:
    with notebook.step("slider-shown"):
        cell = notebook.run("import ipywidgets\nslider = ipywidgets.IntSlider()\nslider")
        slider = cell.widget("slider")
        expect(slider).to_be_visible(timeout=WIDGET_MS)
        expect(slider.locator(".widget-readout")).to_have_text("0")
    with notebook.step("slider-moved"):
        slider.locator(".noUi-handle").focus()
        for _ in range(3):
            notebook.page.keyboard.press("ArrowRight")
        expect(slider.locator(".widget-readout")).to_have_text("3", timeout=WIDGET_MS)
    with notebook.step("slider-value-read"):
        check = notebook.run("print(slider.value)")
        expect(check.outputs).to_have_text(["3"], timeout=SETTLE_MS)


def test_input_prompt_reaches_kernel(notebook: Notebook) -> None:
    with notebook.step("input-asked"):
        cell = notebook.run("name = input('name?')\nprint('hello', name)", wait=False)
        expect(cell.stdin).to_be_visible(timeout=WIDGET_MS)
        expect(cell.locator.locator(".jp-Stdin-prompt")).to_contain_text("name?")
    with notebook.step("input-answered"):
        cell.stdin.fill("Ada")
        cell.stdin.press("Enter")
        cell.wait_done()
        expect(cell.stdin).to_have_count(0, timeout=SETTLE_MS)
        expect(cell.locator.locator(".jp-OutputArea")).to_contain_text("hello Ada", timeout=SETTLE_MS)
    with notebook.step("input-value-read"):
        check = notebook.run("print(repr(name))")
        expect(check.outputs).to_have_text(["'Ada'"], timeout=SETTLE_MS)


def test_clear_output_leaves_one_line(notebook: Notebook) -> None:
    code = (
        "import time\n"
        "from IPython.display import clear_output\n"
        "for i in range(5):\n"
        "    clear_output(wait=True)\n"
        "    print(f'step {i}')\n"
        "    time.sleep(0.2)\n"
    )
    with notebook.step("progress-done"):
        cell = notebook.run(code)
        expect(cell.outputs).to_have_count(1, timeout=SETTLE_MS)
        assert cell.output_texts() == ["step 4"]


def test_display_update_replaces_output(notebook: Notebook) -> None:
    with notebook.step("display-updated"):
        cell = notebook.run("h = display('a', display_id=True)\nh.update('b')")
        expect(cell.outputs).to_have_count(1, timeout=SETTLE_MS)
        assert cell.output_texts() == ["'b'"]


def test_tab_completes_module_attribute(notebook: Notebook) -> None:
    with notebook.step("os-not-imported"):
        check = notebook.run("print('os' in dir())")
        expect(check.outputs).to_have_text(["False"], timeout=SETTLE_MS)
    with notebook.step("completer-shown"):
        # Tab at the end of `import os; os.pa`: the kernel's own completer (jedi) reads the import it has not run
        cell = notebook.type_in_new_cell("import os; os.pa")
        editor = cell.locator.locator(".jp-InputArea-editor .cm-content")
        items: list[str] = []
        # JupyterLab drops an answer that takes over 1 s (a kernel's first jedi completion can, cold): Tab again.
        for _attempt in range(3):
            notebook.page.keyboard.press("Tab")
            try:
                items = notebook.completer_items()
                break
            except PlaywrightTimeout:  # no popup (yet), or a single match inserted without one
                if editor.inner_text().strip() != "import os; os.pa":
                    break
        names = [item.rsplit(".", 1)[-1] for item in items]
        inserted = editor.inner_text().strip() == "import os; os.path"
        assert "path" in names or inserted, (items, editor.inner_text())
    notebook.page.keyboard.press("Escape")


def test_prompt_numbers_match_tracebacks(notebook: Notebook) -> None:
    with notebook.step("cells-run"):
        notebook.run("a = 1")
        notebook.run("b = a + 1")
        counted = notebook.run("print(len(In) - 1)")  # IPython's own count of this cell's input
        expect(counted.outputs).to_have_count(1, timeout=SETTLE_MS)
        assert counted.output_texts() == [str(counted.execution_count())]
    with notebook.step("error-raised"):
        failing = notebook.run("b / 0")
        prompt = failing.execution_count()
        error = failing.locator.locator("[data-mime-type='application/vnd.jupyter.stderr']")
        expect(error).to_contain_text("ZeroDivisionError", timeout=SETTLE_MS)
        assert re.findall(r"Cell In\[(\d+)\]", failing.text()) == [str(prompt)], (prompt, failing.text())


# ---- the first cell of a fresh notebook, timed ------------------------------------------------------------------

ROUNDS = 3  # each kernel's first cell is timed this often, in alternation (a noisy machine shows in the spread)

# Shift+Enter to "ready" rendered, timed in the page: from the key's own event (a capturing listener sees it before
# JupyterLab acts on it) to the mutation that puts the output's text in the cell.
_TIME_FIRST_CELL_JS = """(index) => {
    const timing = window.__firstCell = {start: null, end: null};
    const cell = document.querySelectorAll(".jp-Notebook .jp-Cell")[index];
    document.addEventListener("keydown", (event) => {
        if (event.key === "Enter" && event.shiftKey && timing.start === null) timing.start = performance.now();
    }, {capture: true});
    const observer = new MutationObserver(() => {
        const output = cell.querySelector(".jp-OutputArea-output");
        if (timing.start !== null && output && output.textContent.includes("ready")) {
            timing.end = performance.now();
            observer.disconnect();
        }
    });
    observer.observe(cell, {childList: true, subtree: true, characterData: true});
}"""


@pytest.fixture
def pooled(
    server_factory: Callable[..., LocalServer], tmp_path_factory: pytest.TempPathFactory, shots: Path
) -> Iterator[tuple[LocalServer, JupyterLab]]:
    """A JupyterLab of its own on a scalebox-local with a warm pool of two Python sandboxes (the default a user
    gets), both stopped after the test."""
    server = server_factory(extra=["--ServerSettings.pool_size=2"])
    base = tmp_path_factory.mktemp("jupyterlab-pooled")
    env = {"JUPYTER_PATH": str(install_kernelspecs(base / "kernelspecs")), **server.env()}
    try:
        with jupyterlab(base, env) as lab:
            try:
                yield server, lab
            finally:
                lab.shutdown_sessions()
                (shots / "jupyterlab-pooled.log").write_text(lab.log_text())
    finally:
        server.stop()


def test_the_first_cell_of_a_fresh_notebook_is_timed_beside_python3(
    pooled: tuple[LocalServer, JupyterLab], browser: Browser, shots: Path, request: pytest.FixtureRequest
) -> None:
    server, lab = pooled
    context = logged_in_context(browser, lab)
    timings: dict[str, list[float]] = {kernel: [] for kernel in KERNELS}
    try:
        for round_ in range(ROUNDS):
            for kernel in KERNELS:
                server.wait_pool(2)  # the machine quiet again, and a warm sandbox waiting, before either kernel
                label = f"first-cell-{kernel}-{round_}"
                lab.create_notebook(f"{label}.ipynb", kernel)
                before = server.sandbox_ids()
                nb = Notebook.open(context, lab, f"{label}.ipynb", shots, label)
                try:
                    with nb.step("timed"):
                        cell = nb.type_in_new_cell("print('ready')")
                        nb.page.evaluate(_TIME_FIRST_CELL_JS, cell.index)
                        nb.page.keyboard.press("Shift+Enter")
                        nb.page.wait_for_function("() => window.__firstCell.end !== null", timeout=60_000)
                        elapsed = nb.page.evaluate("() => window.__firstCell.end - window.__firstCell.start")
                        assert cell.wait_done() == 1
                        assert cell.output_texts() == ["ready"]
                    timings[kernel].append(float(elapsed))
                    if kernel == KERNEL:  # the notebook's sandbox is the pool's, not a cold one
                        (made,) = server.sandbox_ids() - before
                        with server.client() as http:
                            assert http.get(f"/v1/sandboxes/{made}").raise_for_status().json()["data"]["warm"] is True
                finally:
                    nb.close()
                    lab.shutdown_session(f"{label}.ipynb")
    finally:
        context.close()
    plain, ours = (sorted(timings[kernel]) for kernel in KERNELS)
    assert len(plain) == len(ours) == ROUNDS
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else nullcontext():  # in every CI log, passing or not
        print(
            "\nfirst cell of a fresh notebook in JupyterLab, Shift+Enter to output (ms): "
            f"python3 {', '.join(f'{t:.0f}' for t in plain)}; "
            f"{KERNEL} (warm pool) {', '.join(f'{t:.0f}' for t in ours)}; "
            f"median ratio {ours[len(ours) // 2] / max(plain[len(plain) // 2], 1.0):.1f}x"
        )
