"""One scalebox-local per data dir: a second `serve` on it refuses, naming the first (whose runtime file it leaves
alone), or takes over with --replace; and the server works from its data dir, so deleting the folder it was
started from breaks nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from client_support import config_for
from conftest import LocalServer

from scalebox_kernel.client import Sandbox
from scalebox_kernel.local import RUNTIME_FILE_NAME

pytestmark = pytest.mark.timeout(180)


def serve(data_dir: Path | str, runtime_dir: Path, *extra: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime_dir)}
    argv = [sys.executable, "-m", "scalebox_kernel", "serve", "--data-dir", str(data_dir), *extra]
    return subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def started(proc: subprocess.Popen[str], runtime_dir: Path) -> dict[str, Any]:
    """The runtime file `proc` wrote once it serves (at most 30 s); fails with its output if it exited."""
    info_file = runtime_dir / RUNTIME_FILE_NAME
    for _ in range(600):
        if info_file.exists() or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    found: dict[str, Any] = json.loads(info_file.read_text())
    return found


def test_a_second_server_on_the_same_data_dir_refuses_then_replaces(
    server_factory: Callable[..., LocalServer], tmp_path: Path
) -> None:
    first = server_factory()
    runtime_file = first.runtime_dir / RUNTIME_FILE_NAME
    recorded = runtime_file.read_text()

    second = serve(first.data_dir, tmp_path / "runtime-2")
    out, _ = second.communicate(timeout=60)
    assert second.returncode == 1, out
    assert f"already serving the data dir {first.data_dir}" in out and first.url in out and "--replace" in out
    assert runtime_file.read_text() == recorded  # the first one's runtime file is untouched, and it still serves
    with Sandbox.create(config=config_for(first)) as sandbox:
        assert sandbox.run_code("1 + 1").text == "2"

    third = serve(first.data_dir, tmp_path / "runtime-3", "--replace")
    try:
        assert first.process.wait(40) is not None  # stopped by SIGTERM
        info = started(third, tmp_path / "runtime-3")
        assert info["pid"] == third.pid and info["data_dir"] == str(first.data_dir)
    finally:
        third.terminate()
        third.wait(30)


def test_replace_never_signals_the_pid_a_crashed_server_left(tmp_path: Path) -> None:
    """A lock file naming a dead server's pid, now another program's: a server starting on it names itself at
    once, and a --replace stops that one, never the stranger."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    stranger = subprocess.Popen(["sleep", "120"])
    (data / "scalebox-local.lock").write_text(json.dumps({"pid": stranger.pid, "url": "https://127.0.0.1:1"}))
    second = serve(data, tmp_path / "runtime-2")
    third = serve(data, tmp_path / "runtime-3", "--replace")  # maybe while the second is still starting
    try:
        info = started(third, tmp_path / "runtime-3")
        assert info["pid"] == third.pid
        assert second.wait(40) is not None  # the second was the one stopped
        assert stranger.poll() is None, "--replace signalled a process that is no scalebox-local"
    finally:
        for proc in (third, second):
            proc.terminate()
            proc.wait(30)
        stranger.kill()
        stranger.wait()


def test_the_server_works_from_its_data_dir(tmp_path: Path) -> None:
    """Given as a relative path, too: it is the caller's, resolved before the server moves into it."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    data = tmp_path / "data"
    proc = serve("../data", tmp_path / "runtime", cwd=folder)
    try:
        info = started(proc, tmp_path / "runtime")
        assert os.readlink(f"/proc/{proc.pid}/cwd") == str(data) and info["data_dir"] == str(data)
        folder.rmdir()  # the notebook's folder goes away: new sandboxes still start
        server = LocalServer(
            url=info["url"],
            api_key=info["api_key"],
            certfile=info["certfile"],
            data_dir=data,
            runtime_dir=tmp_path / "runtime",
            process=proc,  # type: ignore[arg-type]
            log=tmp_path / "log",
            argv=[],
        )
        with Sandbox.create(config=config_for(server)) as sandbox:
            assert sandbox.run_code("print('still here')").logs.stdout == ["still here\n"]
    finally:
        proc.terminate()
        proc.wait(30)
