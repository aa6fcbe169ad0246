"""Pause keeps memory (issue 6): the cgroup freezer stops every process of a sandbox, bash_kernel's own session
included; nothing advances and no CPU time is used while paused, and everything continues on resume."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from client_support import config_for
from conftest import LocalServer
from language_support import skip_reason

from scalebox_kernel.client import Sandbox
from scalebox_kernel.server.isolation import capabilities

CAPS = capabilities()
pytestmark = pytest.mark.skipif(
    not (CAPS.namespaces and CAPS.cgroups.has("freezer")), reason="no cgroup freezer here: " + "; ".join(CAPS.problems)
)

#: language -> (cell that sets x to 41 and starts a counter loop writing /tmp/counter-<language>, cell giving 42)
CELLS = {
    "python": (
        "import threading, time\nx = 41\n"
        "def count():\n    n = 0\n    while True:\n        n += 1\n"
        "        open('/tmp/counter-python', 'w').write(str(n))\n        time.sleep(0.01)\n"
        "threading.Thread(target=count, daemon=True).start()",
        "x + 1",
    ),
    "bash": (
        "x=41; (n=0; while :; do n=$((n+1)); echo $n > /tmp/counter-bash.new;"
        " mv /tmp/counter-bash.new /tmp/counter-bash; sleep 0.01; done) >/dev/null 2>&1 &",
        "echo $((x + 1))",
    ),
    "r": ("x <- 41", "x + 1"),
}


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., LocalServer]) -> LocalServer:
    return server_factory()


@pytest.fixture(scope="module")
def sandbox(server: LocalServer) -> Iterator[Sandbox]:
    sbx = Sandbox.create(config=config_for(server), timeout=600)
    yield sbx
    sbx.kill()
    sbx.close()


def counter(root: Path, language: str) -> int:
    text = (root / "tmp" / f"counter-{language}").read_text().strip()
    return int(text or 0)


def cpu_seconds(sandbox_id: str) -> float:
    """The sandbox's CPU time as its cgroup counts it (read on the host: the test is the host)."""
    from scalebox_kernel.server.isolation import SandboxCgroups

    usage = SandboxCgroups(CAPS.cgroups, sandbox_id).usage()
    assert usage.cpu_seconds is not None
    return usage.cpu_seconds


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_pause_stops_counters_keeps_state_and_cpu(sandbox: Sandbox, server: LocalServer) -> None:
    languages = ["python"] + [lang for lang in ("bash", "r") if not skip_reason(lang)]
    root = server.data_dir / "sandboxes" / sandbox.sandbox_id / "root"
    for language in languages:
        setup = sandbox.run_code(CELLS[language][0], language=language, timeout=120)
        assert setup.error is None, (language, setup.error)
    looping = [lang for lang in languages if lang != "r"]
    for language in looping:
        wait_for(lambda language=language: (root / "tmp" / f"counter-{language}").exists())
    busy = sandbox.commands.run("while :; do :; done", background=True)  # burns CPU until paused
    time.sleep(0.3)

    sandbox.pause()
    assert sandbox.get_info().state == "paused"
    time.sleep(0.2)  # anything mid-write lands
    paused_at = {lang: counter(root, lang) for lang in looping}
    cpu = cpu_seconds(sandbox.sandbox_id)
    time.sleep(1.0)
    assert {lang: counter(root, lang) for lang in looping} == paused_at
    assert cpu_seconds(sandbox.sandbox_id) - cpu < 0.01

    sandbox.resume()
    for language in looping:
        wait_for(lambda language=language: counter(root, language) > paused_at[language])
    for language in languages:
        value = sandbox.run_code(CELLS[language][1], language=language, timeout=60)
        assert value.error is None, (language, value.error)
        shown = value.text if value.text is not None else "".join(value.logs.stdout)
        assert shown.strip().strip("[1] ") == "42", (language, shown)
    busy.kill()
    assert cpu_seconds(sandbox.sandbox_id) > cpu


def test_paused_sandbox_info_says_how(sandbox: Sandbox) -> None:
    info = sandbox.get_info().isolation
    assert info is not None and info["pause"] == "freezer"
