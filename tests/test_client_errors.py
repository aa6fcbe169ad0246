"""Typed, actionable errors from the client, configuration resolution, and no secret in any message."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from client_support import access_token, assert_no_secret, config_for

from scalebox_kernel.client import AsyncSandbox, Sandbox
from scalebox_kernel.client.connection import Connection, agent_url
from scalebox_kernel.config import ScaleboxConfig
from scalebox_kernel.errors import (
    AuthenticationError,
    InvalidArgument,
    LanguageNotAvailable,
    NotFound,
    SandboxExpired,
    SandboxNotFound,
    ScaleboxError,
    ServerUnavailable,
)


@pytest.fixture(scope="module")
def sandbox(local_server: Any) -> Iterator[Sandbox]:
    with Sandbox.create(config=config_for(local_server)) as sbx:
        yield sbx


def _secrets(sandbox: Sandbox) -> tuple[str | None, str]:
    return sandbox.config.api_key, access_token(sandbox)


def test_wrong_api_key(local_server: Any) -> None:
    config = ScaleboxConfig(api_key="wrong-key-0123456789", api_url=local_server.url)
    with pytest.raises(AuthenticationError) as caught:
        Sandbox.list(config=config)
    message = str(caught.value)
    assert "401" in message and "SCALEBOX_API_KEY" in message
    assert_no_secret(message, "wrong-key-0123456789", local_server.api_key)
    with pytest.raises(AuthenticationError):
        Sandbox.create(config=config)


def test_unknown_sandbox(local_server: Any) -> None:
    config = config_for(local_server)
    with pytest.raises(SandboxNotFound) as caught:
        Sandbox.connect("no-such-sandbox", config=config)
    assert "no-such-sandbox" in str(caught.value)
    assert not Sandbox.kill_by_id("no-such-sandbox", config=config)


def test_unknown_language(sandbox: Sandbox) -> None:
    with pytest.raises(LanguageNotAvailable) as caught:
        sandbox.run_code("1", language="cobol")
    assert "cobol" in str(caught.value)
    with pytest.raises(LanguageNotAvailable):
        sandbox.create_code_context(language="cobol")
    assert sandbox.run_code("1 + 1").text == "2"  # the sandbox keeps serving


def test_dot_dot_cannot_climb_out_of_the_sandbox(sandbox: Sandbox) -> None:
    name = f"clamped-{sandbox.sandbox_id}.txt"
    sandbox.files.write(f"/../../../tmp/{name}", "inside")
    assert sandbox.files.read(f"/tmp/{name}") == "inside"  # `..` stops at the sandbox's own root
    assert not (Path("/tmp") / name).exists()
    assert sandbox.files.read(f"/tmp/../../tmp/{name}") == "inside"


def test_symlinks_resolve_inside_the_sandbox_for_every_file_api(sandbox: Sandbox) -> None:
    """A link to /etc is the sandbox's /etc (read-only, as its own code sees it), never a way onto the host."""
    sandbox.commands.run("ln -sfn /etc escape")
    key, token = _secrets(sandbox)
    inside = sandbox.commands.run("cat /etc/hostname").stdout
    assert sandbox.files.read("/home/user/escape/hostname") == inside  # what `cat` in the sandbox shows
    passwd = sandbox.files.read("/home/user/escape/passwd")
    assert "sandbox user" in passwd and "daemon:" not in passwd  # the sandbox's passwd, not the host's
    assert {e.name for e in sandbox.files.list("/home/user/escape")} >= {"passwd", "hostname"}
    assert sandbox.files.get_info("/home/user/escape/passwd").name == "passwd"
    for call in (
        lambda: sandbox.files.write("/home/user/escape/evil.txt", "x"),
        lambda: sandbox.files.make_dir("/home/user/escape/evil"),
        lambda: sandbox.files.move("/home/user/escape/hostname", "/tmp/stolen"),
        lambda: sandbox.files.remove("/home/user/escape/hostname"),
    ):
        with pytest.raises(InvalidArgument) as caught:
            call()
        message = str(caught.value)
        assert ("permission denied" in message or "across file systems" in message) and "/home/user/escape/" in message
        assert_no_secret(str(caught.value), key, token)
    assert not Path("/etc/evil.txt").exists() and not Path("/etc/evil").exists()
    assert sandbox.files.exists("/tmp")  # and the sandbox keeps serving


def test_reading_a_missing_file(sandbox: Sandbox) -> None:
    with pytest.raises(NotFound) as caught:
        sandbox.files.read("/tmp/definitely-missing.txt")
    assert not isinstance(caught.value, SandboxNotFound)
    assert "definitely-missing" in str(caught.value)


def test_bad_arguments_fail_on_the_client(sandbox: Sandbox) -> None:
    with pytest.raises(InvalidArgument):
        sandbox.files.list("/tmp", depth=0)


def test_no_secret_in_any_error_message(local_server: Any, sandbox: Sandbox) -> None:
    key, token = _secrets(sandbox)
    assert key and token
    failures: list[BaseException] = []
    for call in (
        lambda: sandbox.files.read("/nope/nope"),
        lambda: sandbox.files.make_dir(""),
        lambda: sandbox.commands.send_stdin(999999, "x"),
        lambda: sandbox.destroy_context("no-such-context"),
        lambda: sandbox.run_code("1", language="cobol"),
        lambda: Sandbox.connect("nope", config=config_for(local_server)),
    ):
        with pytest.raises(ScaleboxError) as caught:
            call()
        failures.append(caught.value)
    for exc in failures:
        assert_no_secret(f"{exc} {exc!r} {exc.args}", key, token)
    assert_no_secret(repr(sandbox) + str(sandbox) + repr(sandbox.async_sandbox), key, token)
    assert_no_secret(repr(sandbox.async_sandbox.connection), key, token)
    assert set(sandbox.secrets()) == {key, token}


def test_wrong_access_token_is_an_authentication_error(local_server: Any, sandbox: Sandbox) -> None:
    inner = sandbox.async_sandbox
    saved = dict(inner._rpc.headers)
    inner._rpc.headers["X-Access-Token"] = "not-the-token"
    try:
        with pytest.raises(AuthenticationError):
            sandbox.files.exists("/tmp")
        with pytest.raises(AuthenticationError):
            sandbox.run_code("1")
        with pytest.raises(AuthenticationError):
            sandbox.files.read("/tmp/x")
    finally:
        inner._rpc.headers.clear()
        inner._rpc.headers.update(saved)
    assert sandbox.files.exists("/tmp")


def test_unreachable_server_fails_fast() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket is closed
    config = ScaleboxConfig(api_key="k" * 20, api_url=f"http://127.0.0.1:{port}", request_timeout=2)
    started = time.monotonic()
    with pytest.raises(ServerUnavailable) as caught:
        Sandbox.list(config=config)
    assert time.monotonic() - started < 10
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert_no_secret(str(caught.value), "k" * 20)


async def test_no_key_uses_scalebox_local_from_the_runtime_file(
    local_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(local_server.runtime_dir))
    config = ScaleboxConfig()
    assert not config.api_key
    async with await AsyncSandbox.create(config=config, metadata={"via": "runtime-file"}) as sbx:
        assert sbx.connection.local and sbx.connection.api_url == local_server.url
        listed = await AsyncSandbox.list(metadata={"via": "runtime-file"}, config=config)
        assert [i.sandbox_id for i in listed] == [sbx.sandbox_id]


def test_no_key_and_no_local_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    with pytest.raises(ServerUnavailable) as caught:
        Sandbox.list(config=ScaleboxConfig(local_autostart=False))
    assert "jupyter scalebox serve" in str(caught.value)


def test_key_without_url_means_the_cloud() -> None:
    from scalebox_kernel.client.connection import resolve_connection
    from scalebox_kernel.client.sync import portal

    _, connection = portal.run(resolve_connection(ScaleboxConfig(api_key="cloud-key-123456")))
    assert connection.api_url == "https://api.scalebox.dev" and not connection.local
    assert "cloud-key" not in repr(connection)


@pytest.mark.parametrize(
    ("api_url", "domain", "expected"),
    [
        ("http://127.0.0.1:8000", "127.0.0.1:8000/sbx/abc", "http://127.0.0.1:8000/sbx/abc"),
        ("https://127.0.0.1:8000", "127.0.0.1:8000/sbx/abc", "https://127.0.0.1:8000/sbx/abc"),
        ("http://127.0.0.1:8000", "abc.sandbox.example", "https://abc.sandbox.example"),
        ("https://api.scalebox.dev", "http://127.0.0.1:9/x", "http://127.0.0.1:9/x"),
    ],
)
def test_agent_url(api_url: str, domain: str, expected: str) -> None:
    assert agent_url(Connection(api_url, "key-1234", True, 30), domain) == expected


def test_url_without_key_is_refused_unless_it_is_scalebox_local(
    local_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(local_server.runtime_dir))
    with pytest.raises(AuthenticationError) as caught:
        Sandbox.list(config=ScaleboxConfig(api_url="https://elsewhere.example"))
    assert "SCALEBOX_API_KEY" in str(caught.value)
    # scalebox-local's own URL needs no key: the runtime file has it
    assert isinstance(Sandbox.list(config=ScaleboxConfig(api_url=local_server.url)), list)


def test_expired_sandbox_says_so_everywhere(local_server: Any) -> None:
    config = config_for(local_server)
    sbx = Sandbox.create(config=config)
    try:
        sbx.set_timeout(1)  # shortening works too
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                sbx.get_info()
            except SandboxExpired:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the sandbox did not expire")
        for call in (lambda: sbx.run_code("1"), lambda: sbx.files.read("x"), lambda: sbx.set_timeout(60)):
            with pytest.raises(SandboxExpired) as caught:
                call()
            assert "expired" in str(caught.value)
        with pytest.raises(SandboxExpired):
            Sandbox.connect(sbx.sandbox_id, config=config)
    finally:
        sbx.close()


def test_untrusted_certificate_says_what_to_do(local_server_tls: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    config = ScaleboxConfig(api_key=local_server_tls.api_key, api_url=local_server_tls.url)  # no ca_file
    with pytest.raises(ServerUnavailable) as caught:
        Sandbox.list(config=config)
    assert "SCALEBOX_CA_FILE" in str(caught.value)
    # scalebox-local's own URL: its certificate comes from the runtime file
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(local_server_tls.runtime_dir))
    assert isinstance(Sandbox.list(config=config), list)
