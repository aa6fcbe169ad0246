"""`jupyter scalebox list | kill | stop` against a real scalebox-local."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

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


def test_the_advertised_common_options_work(tmp_path: Path) -> None:
    """--generate-config, -y, --debug and --help-all of every command, as each one's --help advertises them."""
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "config")}

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "scalebox_kernel", *argv], capture_output=True, text=True, timeout=60, env=env
        )

    generated = cli("serve", "--generate-config", "-y")
    assert generated.returncode == 0, generated.stderr
    written = (tmp_path / "config" / "jupyter_scalebox_config.py").read_text()
    assert "c.ServerSettings." in written and "c.ScaleboxConfig.sandbox_timeout" in written
    for command in (["list"], ["kill"], ["stop"], ["install"], ["runtimes", "list"], ["demo"], ["serve"]):
        helped = cli(*command, "--help")
        assert helped.returncode == 0 and "--debug" in helped.stdout, (command, helped.stderr)
    debugged = cli("runtimes", "list", "--debug")
    assert debugged.returncode == 0, debugged.stderr
    runtimes = cli("runtimes", "--help").stdout
    assert "jupyter-scalebox-runtimes" not in runtimes and "jupyter scalebox runtimes cmd" in runtimes


def test_kill_all_with_and_without_an_age(server_factory: Callable[..., LocalServer]) -> None:
    server = server_factory()  # its own: --all must not reach other tests' sandboxes
    config = ScaleboxConfig(api_key=server.api_key, api_url=server.url)
    made = {Sandbox.create(config=config).sandbox_id for _ in range(2)}
    young = scalebox("kill", "--all", "--older-than", "1h", env=server.env())
    assert young.returncode == 0 and "no sandboxes to kill" in young.stdout, young.stdout + young.stderr
    assert made <= {info.sandbox_id for info in Sandbox.list(config=config)}
    assert scalebox("kill", "--older-than", "1h", env=server.env()).returncode == 2  # only with --all
    everything = scalebox("kill", "--all", env=server.env())
    assert everything.returncode == 0, everything.stderr
    assert all(f"{sandbox_id}: killed" in everything.stdout for sandbox_id in made)
    assert not {info.sandbox_id for info in Sandbox.list(config=config)} & made
