"""One configuration for every door: `jupyter_scalebox_config.py` on the Jupyter config path, then `.env`, then the
environment, then the door's own arguments, the later winning; the kernel, the magics, `Sandbox.create` and
`Session.run` all read it. Bad values are one line naming the variable and what it takes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from client_support import config_for
from conftest import LocalServer
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from kernel_support import KernelRun, environ, install_kernelspecs

from scalebox_kernel.client import Sandbox
from scalebox_kernel.config import ScaleboxConfig
from scalebox_kernel.errors import InvalidArgument, ScaleboxError
from scalebox_kernel.session import Session

pytestmark = pytest.mark.timeout(240)

FILE_TIMEOUT = 1234
ENV_TIMEOUT = 2345
ARG_TIMEOUT = 3456


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., LocalServer]) -> LocalServer:
    """A server of this module's own: the sandboxes it lists are the ones these tests made."""
    return server_factory()


@pytest.fixture
def configured(server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """A jupyter_scalebox_config.py on JUPYTER_CONFIG_PATH that names the server and a sandbox_timeout, and no
    SCALEBOX_ variable in the environment (nor a .env in the working directory): the file alone configures."""
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "jupyter_scalebox_config.py").write_text(
        f"c.ScaleboxConfig.api_url = {server.url!r}\n"
        f"c.ScaleboxConfig.api_key = {server.api_key!r}\n"
        f"c.ScaleboxConfig.ca_file = {server.certfile!r}\n"
        f"c.ScaleboxConfig.sandbox_timeout = {FILE_TIMEOUT}\n"
    )
    for name in list(os.environ):
        if name.startswith(("SCALEBOX_API", "SCALEBOX_CA", "SCALEBOX_SANDBOX", "SBX_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("JUPYTER_CONFIG_PATH", str(folder))
    monkeypatch.chdir(tmp_path)
    yield {"JUPYTER_CONFIG_PATH": str(folder)}


def timeouts_of_new(server: LocalServer, before: set[str]) -> list[int | None]:
    """The lifetimes of the sandboxes made since `before` (their ids), as the server tells them."""
    found = Sandbox.list(config=config_for(server))
    return [info.timeout for info in found if info.sandbox_id not in before]


def live(server: LocalServer) -> set[str]:
    return {info.sandbox_id for info in Sandbox.list(config=config_for(server))}


def kill_new(server: LocalServer, before: set[str]) -> None:
    for sandbox_id in live(server) - before:
        Sandbox.kill_by_id(sandbox_id, config=config_for(server))


def test_the_file_then_the_environment_then_arguments(configured: dict[str, str], server: LocalServer) -> None:
    assert ScaleboxConfig.load().sandbox_timeout == FILE_TIMEOUT
    (Path.cwd() / ".env").write_text(f"SCALEBOX_SANDBOX_TIMEOUT={ENV_TIMEOUT - 1}\n")
    assert ScaleboxConfig.load().sandbox_timeout == ENV_TIMEOUT - 1  # .env beats the file
    with environ({"SCALEBOX_SANDBOX_TIMEOUT": str(ENV_TIMEOUT)}):
        assert ScaleboxConfig.load().sandbox_timeout == ENV_TIMEOUT  # the environment beats .env
        assert ScaleboxConfig.load(sandbox_timeout=ARG_TIMEOUT).sandbox_timeout == ARG_TIMEOUT
    (Path.cwd() / ".env").unlink()

    before = live(server)
    try:
        with Sandbox.create() as sandbox:  # no config given: the file's server and lifetime
            assert sandbox.get_info().timeout == FILE_TIMEOUT
        with environ({"SCALEBOX_SANDBOX_TIMEOUT": str(ENV_TIMEOUT)}):
            with Sandbox.create() as sandbox:
                assert sandbox.get_info().timeout == ENV_TIMEOUT
            with Sandbox.create(timeout=ARG_TIMEOUT) as sandbox:
                assert sandbox.get_info().timeout == ARG_TIMEOUT
        result = Session.run("print('hi')", keep_alive=True)
        assert result.success, result
        assert Sandbox.get_info(result.session_id, config=config_for(server)).timeout == FILE_TIMEOUT
        Session.close(result.session_id)
    finally:
        kill_new(server, before)


def test_the_magics_read_it(configured: dict[str, str], server: LocalServer) -> None:
    before = live(server)
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "scalebox_kernel")
    try:
        with capture_output() as captured:
            assert ip.run_cell("%%scalebox\nprint('from the file')").success, captured.stdout + captured.stderr
        assert "from the file" in captured.stdout
        assert timeouts_of_new(server, before) == [FILE_TIMEOUT]
    finally:
        from scalebox_kernel.magics import ScaleboxMagics

        found = ip.magics_manager.registry.get("ScaleboxMagics")
        if isinstance(found, ScaleboxMagics):
            found.at_exit()
        ip.run_line_magic("unload_ext", "scalebox_kernel")
        kill_new(server, before)


@pytest.mark.parametrize(
    ("env", "argv", "expected"),
    [
        ({}, [], FILE_TIMEOUT),
        ({"SCALEBOX_SANDBOX_TIMEOUT": str(ENV_TIMEOUT)}, [], ENV_TIMEOUT),
        (
            {"SCALEBOX_SANDBOX_TIMEOUT": str(ENV_TIMEOUT)},
            [f"--ScaleboxConfig.sandbox_timeout={ARG_TIMEOUT}"],
            ARG_TIMEOUT,
        ),
    ],
    ids=["file", "environment", "kernel-option"],
)
def test_the_kernel_reads_it(
    configured: dict[str, str],
    server: LocalServer,
    tmp_path: Path,
    env: dict[str, str],
    argv: list[str],
    expected: int,
) -> None:
    """The file, beaten by the environment, beaten by an option in the kernelspec's argv."""
    jupyter_path = install_kernelspecs(tmp_path / "specs")
    spec = jupyter_path / "kernels" / "scalebox-python" / "kernel.json"
    extra = "".join(f', "{option}"' for option in argv)
    spec.write_text(spec.read_text().replace('"{connection_file}"', f'"{{connection_file}}"{extra}'))
    before = live(server)
    with environ({"JUPYTER_PATH": str(jupyter_path)}):  # the kernelspec is looked up here, in this process
        run = KernelRun(env={**configured, **env})
    try:
        reply, _ = run.execute("print('in the kernel')")
        assert reply["content"]["status"] == "ok", reply["content"]
        assert timeouts_of_new(server, before) == [expected]
    finally:
        run.shutdown()
        kill_new(server, before)


def test_json_beats_py_in_one_directory_and_an_earlier_directory_beats_both(
    configured: dict[str, str], tmp_path: Path
) -> None:
    """As every Jupyter application merges its config files; and a changed file is read again."""
    folder = Path(configured["JUPYTER_CONFIG_PATH"])
    (folder / "jupyter_scalebox_config.json").write_text('{"ScaleboxConfig": {"sandbox_timeout": 777}}')
    assert ScaleboxConfig.load().sandbox_timeout == 777
    first = tmp_path / "first"
    first.mkdir()
    (first / "jupyter_scalebox_config.py").write_text("c.ScaleboxConfig.sandbox_timeout = 888\n")
    with environ({"JUPYTER_CONFIG_PATH": f"{first}{os.pathsep}{folder}"}):
        assert ScaleboxConfig.load().sandbox_timeout == 888
        (first / "jupyter_scalebox_config.py").write_text("c.ScaleboxConfig.sandbox_timeout = 9999\n")
        assert ScaleboxConfig.load().sandbox_timeout == 9999


@pytest.mark.parametrize(
    ("name", "value", "accepts"),
    [
        ("SCALEBOX_SANDBOX_TIMEOUT", "abc", "a whole number of seconds"),
        ("SCALEBOX_SANDBOX_TIMEOUT", "-5", "a whole number of seconds"),
        ("SCALEBOX_REQUEST_TIMEOUT", "soon", "seconds"),
        ("SCALEBOX_REQUEST_TIMEOUT", "nan", "seconds"),
        ("SCALEBOX_IDLE_PAUSE", "inf", "seconds"),
        ("SCALEBOX_CHANNEL", "carrier-pigeon", "auto, jupyter or execute"),
        ("SCALEBOX_LOCAL_AUTOSTART", "maybe", "1 or 0"),
    ],
)
def test_a_bad_value_is_one_line_naming_it(
    configured: dict[str, str], server: LocalServer, tmp_path: Path, name: str, value: str, accepts: str
) -> None:
    with environ({name: value}):
        with pytest.raises(InvalidArgument) as caught:
            ScaleboxConfig.load()
        message = str(caught.value)
        assert name in message and repr(value) in message and accepts in message and "\n" not in message
        # The CLI: one line, no traceback.
        done = subprocess.run(
            [sys.executable, "-m", "scalebox_kernel", "list"], capture_output=True, text=True, timeout=60
        )
        assert done.returncode != 0
        assert name in done.stdout + done.stderr and "Traceback" not in done.stdout + done.stderr


def test_a_bad_config_file_names_itself(configured: dict[str, str]) -> None:
    folder = Path(configured["JUPYTER_CONFIG_PATH"])
    (folder / "jupyter_scalebox_config.py").write_text("c.ScaleboxConfig.sandbox_timeout = 'soon'\n")
    with pytest.raises(InvalidArgument, match="sandbox_timeout"):
        ScaleboxConfig.load()
    (folder / "jupyter_scalebox_config.py").write_text("c.ScaleboxConfig.sandbox_timeout = (\n")
    with pytest.raises(InvalidArgument, match=r"jupyter_scalebox_config\.py"):
        ScaleboxConfig.load()


def test_an_unknown_template_is_refused(configured: dict[str, str], server: LocalServer) -> None:
    with environ({"SCALEBOX_TEMPLATE": "no-such-template"}), pytest.raises(InvalidArgument) as caught:
        Sandbox.create()
    assert "unknown template 'no-such-template'" in str(caught.value)
    assert "'base'" in str(caught.value) and "'code-interpreter'" in str(caught.value)


def test_every_command_shows_every_scalebox_trait(configured: dict[str, str]) -> None:
    names = ScaleboxConfig.class_trait_names(config=True)
    for command in (["serve"], ["list"], ["kill"], ["demo"]):
        done = subprocess.run(
            [sys.executable, "-m", "scalebox_kernel", *command, "--help-all"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        missing = [name for name in names if f"--ScaleboxConfig.{name}" not in done.stdout]
        assert not missing, (command, missing)


def test_ssl_cert_file_is_honoured(local_server_tls: LocalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server our client does not know from a runtime file, over HTTPS: SSL_CERT_FILE is what it trusts."""
    config = ScaleboxConfig(api_key=local_server_tls.api_key, api_url=local_server_tls.url)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with pytest.raises(ScaleboxError, match="certificate"):
        Sandbox.list(config=config)
    assert local_server_tls.certfile
    monkeypatch.setenv("SSL_CERT_FILE", local_server_tls.certfile)
    assert isinstance(Sandbox.list(config=config), list)
