"""`jupyter scalebox list | kill | stop` against a real scalebox-local."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

from conftest import LocalServer

from scalebox_kernel.client import Sandbox
from scalebox_kernel.config import ScaleboxConfig


def scalebox(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scalebox_kernel", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_list_and_kill_sandboxes(local_server: LocalServer) -> None:
    config = ScaleboxConfig(api_key=local_server.api_key, api_url=local_server.url)
    sandbox = Sandbox.create(config=config, metadata={"owner": "cli-test"})
    listed = scalebox("list", env=local_server.env())
    assert listed.returncode == 0, listed.stderr
    assert sandbox.sandbox_id in listed.stdout and "owner=cli-test" in listed.stdout
    assert local_server.api_key not in listed.stdout + listed.stderr

    killed = scalebox("kill", sandbox.sandbox_id, "sbx-does-not-exist", env=local_server.env())
    assert f"{sandbox.sandbox_id}: killed" in killed.stdout
    assert "sbx-does-not-exist: not found" in killed.stdout
    assert killed.returncode == 1  # one of them was not there
    assert sandbox.sandbox_id not in scalebox("list", env=local_server.env()).stdout
    assert sandbox.sandbox_id in scalebox("list", "--all", env=local_server.env()).stdout


def test_list_with_a_wrong_key_says_so_without_the_key(local_server: LocalServer) -> None:
    wrong = "wrong-key-0123456789"
    result = scalebox("list", env={**local_server.env(), "SCALEBOX_API_KEY": wrong})
    assert result.returncode == 1
    assert "error:" in result.stdout
    assert wrong not in result.stdout + result.stderr


def test_stop_ends_the_background_server(server_factory: Callable[..., LocalServer]) -> None:
    server = server_factory()
    env = {"JUPYTER_RUNTIME_DIR": str(server.runtime_dir)}
    result = scalebox("stop", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"stopped scalebox-local (pid {server.process.pid})" in result.stdout
    assert server.process.wait(10) == 0
    assert "not running" in scalebox("stop", env=env).stdout
