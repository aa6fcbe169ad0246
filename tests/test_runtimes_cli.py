"""`jupyter scalebox runtimes install|list`, and what scalebox-local says about languages that are not installed."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import LocalServer
from language_support import runtimes_ready

from scalebox_kernel.client import Sandbox
from scalebox_kernel.errors import InvalidArgument

pytestmark = pytest.mark.timeout(300)  # a first run may install the runtimes (about a minute)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "scalebox_kernel", "runtimes", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def test_install_is_idempotent_and_list_shows_versions() -> None:
    ready = runtimes_ready()
    usable = [lang for lang, why in ready.items() if not why]
    again = cli("install", "--language", ",".join(usable))
    assert again.returncode == 0, again.stderr
    assert all(f"{lang}: already installed" in again.stdout for lang in usable), again.stdout
    listed = json.loads(cli("list", "--json").stdout)
    states = {entry["language"]: entry for entry in listed["languages"]}
    assert list(states) == ["python", "r", "nodejs", "typescript", "java", "bash"]
    for lang in usable:
        assert states[lang]["state"] == "installed" and states[lang]["versions"], states[lang]
    assert "ipykernel" in states["python"]["versions"] and "deno" in states["typescript"]["versions"]
    table = cli("list").stdout
    assert f"Runtimes directory: {listed['dir']}" in table and "installed" in table


def test_bad_language_is_a_clear_usage_error() -> None:
    bad = cli("install", "--language", "cobol")
    assert bad.returncode == 2 and "unknown language 'cobol'" in bad.stderr and "python, r, nodejs" in bad.stderr


def test_an_empty_runtimes_dir_lists_what_is_missing_and_why(tmp_path: Path) -> None:
    listed = json.loads(cli("list", "--json", env={"SCALEBOX_RUNTIMES_DIR": str(tmp_path)}).stdout)
    states = {entry["language"]: entry for entry in listed["languages"]}
    assert listed["dir"] == str(tmp_path)
    assert states["python"]["state"] == "fallback" and "own interpreter" in states["python"]["reason"]
    for lang in ("r", "nodejs", "typescript", "java", "bash"):
        assert states[lang]["state"] == "missing"
        assert f"jupyter scalebox runtimes install --language {lang}" in states[lang]["reason"], states[lang]


def test_server_without_runtimes_runs_python_and_says_how_to_get_the_rest(
    server_factory: Callable[..., LocalServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCALEBOX_RUNTIMES_DIR", str(tmp_path / "none"))  # the server inherits it
    server = server_factory()
    sandbox = Sandbox.create(api_url=server.url, api_key=server.api_key)
    try:
        assert sandbox.run_code("6 * 7").text == "42"  # on the server's own interpreter
        with pytest.raises(InvalidArgument) as caught:
            sandbox.run_code("1", language="deno")
        message = str(caught.value)
        assert "language 'deno' is not available on this scalebox-local" in message
        assert "jupyter scalebox runtimes install --language typescript" in message and "available: python" in message
    finally:
        sandbox.kill()
        server.stop()


def _pip_running(root: Path) -> bool:
    """Whether a pip is installing into the runtimes directory `root` right now."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            argv = cmdline.read_bytes().split(b"\0")
            if b"pip" in argv and b"install" in argv and str(root).encode() in argv[0]:
                return True
    return False


@pytest.mark.slow
def test_an_install_shows_its_steps_live_as_they_come(tmp_path: Path) -> None:
    """`runtimes install` into a new directory: the installer's own lines (pip's Collecting, Installing, ...) are
    shown while pip works, not when it ends, below the line that names their step."""
    root = tmp_path / "runtimes"
    argv = [sys.executable, "-m", "scalebox_kernel", "runtimes", "install", "--language", "bash"]
    env = {**os.environ, "SCALEBOX_RUNTIMES_DIR": str(root), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    said: list[str] = []
    pip_seen_running = None  # whether pip was still at work when its first line arrived
    try:
        for line in proc.stdout:
            said.append(line.rstrip("\n"))
            if pip_seen_running is None and line.startswith("    ") and any("pip install" in s for s in said):
                pip_seen_running = _pip_running(root)
        assert proc.wait(timeout=240) == 0, "\n".join(said)
    finally:
        proc.kill()
        proc.wait()
    header = next(i for i, text in enumerate(said) if text.startswith("bash: pip install"))
    steps = [text for text in said[header + 1 :] if text.startswith("    ")]
    assert len(set(steps)) >= 3, said
    assert any("bash_kernel" in text for text in steps) and any("Successfully installed" in t for t in steps), said
    assert pip_seen_running, said  # streamed as pip works, not printed after it
    assert said[-1].startswith("Done in") and any(text.startswith("bash: ready (bash ") for text in said), said
