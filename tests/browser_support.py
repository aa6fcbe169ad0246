"""A real JupyterLab on loopback driven by Debian's Chromium through Playwright, for the browser tests: the server
process with isolated Jupyter paths and settings, a browser session, and a small `Notebook` helper that types cells
the way a user does and reads back what JupyterLab renders (prompts, outputs, widgets, stdin boxes, completers)."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Browser, BrowserContext, Locator, Page, sync_playwright
from playwright.sync_api import Error as PlaywrightError

CHROMIUM = "/usr/bin/chromium"
# Never `playwright install`: the browser is Debian's, and nothing may leave the machine.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000  # Playwright's default for every action and wait on a page
KERNEL_START_MS = 90_000  # a Scalebox kernel opens its sandbox on the first cell
CELL_MS = 90_000
COMPLETER_MS = 10_000  # JupyterLab itself drops a completion provider's answer after 1 s

# What gets in a test's way in a fresh JupyterLab: bracket auto-closing while typing, the news and update
# prompts (they would also reach the internet), and windowing (cells out of view leave the DOM).
LAB_SETTINGS: dict[str, dict[str, Any]] = {
    "@jupyterlab/notebook-extension:tracker": {
        "codeCellConfig": {"autoClosingBrackets": False, "lineNumbers": False},
        "windowingMode": "none",
    },
    "@jupyterlab/codemirror-extension:plugin": {"defaultConfig": {"autoClosingBrackets": False}},
    "@jupyterlab/apputils-extension:notification": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}

# Read through `window.jupyterapp` (the server runs with `expose_app_in_browser`, as JupyterLab's own UI tests do).
_KERNEL_IDLE_JS = """() => {
    const kernel = window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel;
    return !!kernel && kernel.connectionStatus === "connected" && kernel.status === "idle";
}"""
_NUMBERED_PROMPT = re.compile(r"\[\s*(\d+)\s*\]")


def artifacts_dir() -> Path:
    """Where screenshots go: `$SCALEBOX_ARTIFACTS` (CI keeps it), else a fresh timestamped temp folder."""
    configured = os.environ.get("SCALEBOX_ARTIFACTS")
    folder = (
        Path(configured)
        if configured
        else Path(tempfile.gettempdir()) / "scalebox-artifacts" / time.strftime("%Y%m%d-%H%M%S")
    )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_lab_settings(settings_dir: Path, settings: dict[str, dict[str, Any]] = LAB_SETTINGS) -> None:
    """User settings in JupyterLab's layout: `<dir>/<package>/<plugin>.jupyterlab-settings`, one file a plugin."""
    for plugin_id, values in settings.items():
        package, _, plugin = plugin_id.partition(":")
        path = settings_dir / package / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values, indent=2))


@dataclass
class JupyterLab:
    """A running `jupyter lab`: its address, token, notebook folder and log."""

    url: str
    token: str = field(repr=False)
    root_dir: Path
    process: subprocess.Popen[bytes]
    log: Path

    def api(self) -> httpx.Client:
        """A REST client for the server with the token in a header (never in a URL that a log could show)."""
        return httpx.Client(base_url=self.url, headers={"Authorization": f"token {self.token}"}, timeout=30)

    def create_notebook(self, name: str, kernel_name: str) -> None:
        """A notebook with one empty code cell and `kernel_name` in its metadata, so JupyterLab starts that kernel
        without asking."""
        with self.api() as http:
            spec = http.get("/api/kernelspecs").raise_for_status().json()["kernelspecs"].get(kernel_name)
            assert spec, f"JupyterLab does not know the kernel {kernel_name!r}"
            content = {
                "cells": [{"cell_type": "code", "source": "", "metadata": {}, "outputs": [], "execution_count": None}],
                "metadata": {
                    "kernelspec": {
                        "name": kernel_name,
                        "display_name": spec["spec"]["display_name"],
                        "language": spec["spec"]["language"],
                    }
                },
                "nbformat": 4,
                "nbformat_minor": 5,
            }
            body = {"type": "notebook", "format": "json", "content": content}
            http.put(f"/api/contents/{name}", json=body).raise_for_status()

    def shutdown_session(self, path: str) -> None:
        """End the kernel of the notebook at `path`, if it has one."""
        with self.api() as http:
            for session in http.get("/api/sessions").raise_for_status().json():
                if session.get("path") == path:
                    http.delete(f"/api/sessions/{session['id']}", timeout=60)

    def shutdown_sessions(self) -> None:
        """End every notebook's kernel (a Scalebox kernel closes its sandbox on shutdown)."""
        with self.api() as http:
            for session in http.get("/api/sessions").raise_for_status().json():
                http.delete(f"/api/sessions/{session['id']}", timeout=60)

    def log_text(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text.replace(self.token, "<token>")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@contextmanager
def jupyterlab(base: Path, env: dict[str, str] | None = None, wait: float = 90) -> Iterator[JupyterLab]:
    """`jupyter lab` on a free loopback port with its own config, data, runtime, settings and notebook folders under
    `base`; `env` is added to its environment (and so to its kernels'). Stopped on exit."""
    root_dir = base / "notebooks"
    settings_dir = base / "lab-user-settings"
    for folder in (root_dir, base / "config", base / "data", base / "runtime", base / "workspaces"):
        folder.mkdir(parents=True, exist_ok=True)
    write_lab_settings(settings_dir)
    token = secrets.token_hex(24)
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={root_dir}",
        f"--LabApp.user_settings_dir={settings_dir}",
        f"--LabApp.workspaces_dir={base / 'workspaces'}",
        "--LabApp.expose_app_in_browser=True",  # lets the tests read the kernel's state (`Notebook.wait_idle`)
    ]
    if os.geteuid() == 0:  # CI containers run as root; jupyter refuses that unless told
        argv.append("--allow-root")
    full_env = {
        **os.environ,
        **(env or {}),
        "JUPYTER_TOKEN": token,
        "JUPYTER_CONFIG_DIR": str(base / "config"),
        "JUPYTER_DATA_DIR": str(base / "data"),
        "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
    }
    log = base / "jupyterlab.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, env=full_env, stdout=out, stderr=subprocess.STDOUT, cwd=root_dir)
    lab = JupyterLab(url=f"http://127.0.0.1:{port}", token=token, root_dir=root_dir, process=process, log=log)
    try:
        _wait_ready(lab, wait)
        yield lab
    finally:
        with suppress(httpx.HTTPError):
            lab.shutdown_sessions()
        lab.stop()


def _wait_ready(lab: JupyterLab, wait: float) -> None:
    deadline = time.monotonic() + wait
    with lab.api() as http:
        while time.monotonic() < deadline:
            if lab.process.poll() is not None:
                raise AssertionError(f"jupyter lab exited with {lab.process.returncode}:\n{lab.log_text()[-3000:]}")
            try:
                if http.get("/api/status", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    raise AssertionError(f"jupyter lab did not answer /api/status within {wait}s:\n{lab.log_text()[-3000:]}")


@contextmanager
def chromium() -> Iterator[Browser]:
    """Headless Debian Chromium through Playwright; each test makes its own context (fresh profile)."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield browser
        finally:
            browser.close()


def logged_in_context(browser: Browser, lab: JupyterLab) -> BrowserContext:
    """A fresh browser context logged in through JupyterLab's login form, so the token is never in a URL."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.goto(f"{lab.url}/login")
    page.fill("input[name=password]", lab.token)
    page.click("#login_submit")
    page.wait_for_url(re.compile(r".*/(lab|tree).*"))
    page.close()
    return context


class Cell:
    """One code cell of an open notebook, by its position."""

    def __init__(self, notebook: Notebook, index: int) -> None:
        self.notebook = notebook
        self.index = index
        self.locator = notebook.page.locator(".jp-Notebook .jp-Cell").nth(index)

    @property
    def outputs(self) -> Locator:
        """Each output of the cell (a stream, a display, an error, a stdin box)."""
        return self.locator.locator(".jp-OutputArea-child")

    def prompt(self) -> str:
        return self.locator.locator(".jp-InputArea-prompt").inner_text().strip()

    def execution_count(self) -> int | None:
        """The number in the cell's `[n]:` prompt; None while it is `[*]` or `[ ]`."""
        match = _NUMBERED_PROMPT.search(self.prompt())
        return int(match.group(1)) if match else None

    def wait_done(self, timeout_ms: float = CELL_MS) -> int:
        """Wait until the prompt shows a number (not `[*]`); returns it."""
        prompt = self.locator.locator(".jp-InputArea-prompt")
        prompt.filter(has_text=_NUMBERED_PROMPT).wait_for(timeout=timeout_ms)
        count = self.execution_count()
        assert count is not None, self.prompt()
        return count

    def output_texts(self) -> list[str]:
        """The rendered text of each output, as the reader sees it (ANSI colours rendered away)."""
        return [text.strip("\n") for text in self.outputs.all_inner_texts()]

    def text(self) -> str:
        return "\n".join(self.output_texts())

    @property
    def stdin(self) -> Locator:
        """The `input()` box JupyterLab shows in the cell's output area."""
        return self.locator.locator(".jp-Stdin-input")

    def widget(self, kind: str) -> Locator:
        """A rendered ipywidget of the cell by its kind (`slider`, `button`, ...), as ipywidgets' classes name it."""
        return self.locator.locator(f".jupyter-widgets.widget-{kind}")


class Notebook:
    """A notebook open in JupyterLab in its own page: run cells by typing, read what renders, take screenshots."""

    def __init__(self, page: Page, shots: Path, label: str) -> None:
        self.page = page
        self.shots = shots
        self.label = label

    @classmethod
    def open(cls, context: BrowserContext, lab: JupyterLab, name: str, shots: Path, label: str) -> Notebook:
        page = context.new_page()
        notebook = cls(page, shots, label)
        with notebook.step("opened"):
            page.goto(f"{lab.url}/lab/tree/{name}?reset")  # `reset`: no windows restored from an earlier workspace
            page.locator(".jp-Notebook .jp-Cell").first.wait_for()
            notebook.wait_idle(KERNEL_START_MS)
        return notebook

    @property
    def cells(self) -> Locator:
        return self.page.locator(".jp-Notebook .jp-Cell")

    def wait_idle(self, timeout_ms: float = CELL_MS) -> None:
        """Wait until the notebook's kernel is connected and idle. The toolbar's indicator alone is not enough: it
        says idle for a moment before the session has a kernel, and a cell run then is silently dropped."""
        self.page.wait_for_function(_KERNEL_IDLE_JS, timeout=timeout_ms)
        indicator = self.page.locator(".jp-NotebookPanel-toolbar .jp-Notebook-ExecutionIndicator")
        indicator.and_(self.page.locator("[data-status=idle]")).wait_for(timeout=timeout_ms)

    def screenshot(self, step: str) -> Path:
        path = self.shots / f"{self.label}-{step}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """A screenshot after the step, or a `-FAILED` one if it raised."""
        try:
            yield
        except BaseException:
            with suppress(PlaywrightError):  # the page may be gone; the original error matters more
                self.screenshot(f"{name}-FAILED")
            raise
        self.screenshot(name)

    def type_in_new_cell(self, code: str) -> Cell:
        """Type `code` into the empty cell at the end of the notebook (its editor focused, cursor at the end)."""
        index = self.cells.count() - 1
        cell = Cell(self, index)
        editor = cell.locator.locator(".jp-InputArea-editor .cm-content")
        assert editor.inner_text().strip() == "", f"cell {index} is not empty: {editor.inner_text()!r}"
        editor.click()
        # insert_text types the whole text as one input, so the editor's auto-indent and bracket closing stay out
        self.page.keyboard.insert_text(code)
        return cell

    def run(self, code: str, wait: bool = True, timeout_ms: float = CELL_MS) -> Cell:
        """Type `code` into a new cell and run it with Shift+Enter (JupyterLab adds the next empty cell); waits for
        the prompt's number unless `wait` is false (a cell that asks for `input()` waits for its answer)."""
        cell = self.type_in_new_cell(code)
        self.page.keyboard.press("Shift+Enter")
        self.cells.nth(cell.index + 1).wait_for()
        if wait:
            cell.wait_done(timeout_ms)
        return cell

    @property
    def completer(self) -> Locator:
        return self.page.locator(".jp-Completer")

    def completer_items(self, timeout_ms: float = COMPLETER_MS) -> list[str]:
        """The labels the completer popup lists, once it shows."""
        self.completer.locator(".jp-Completer-item").first.wait_for(timeout=timeout_ms)
        return [
            text.strip() for text in self.completer.locator(".jp-Completer-item .jp-Completer-match").all_inner_texts()
        ]

    def close(self) -> None:
        with suppress(PlaywrightError):
            self.page.close()
