"""The seed SDK's surface in our client, against a real scalebox-local: terminals (`sandbox.pty`), metrics,
regions and locality, signed file URLs, and the class forms `Sandbox.kill(id)` / `Sandbox.set_timeout(id, …)`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from client_support import access_token, assert_no_secret, config_for

from scalebox_kernel.client import (
    AsyncSandbox,
    Locality,
    PtySize,
    Sandbox,
    SandboxMetrics,
    ScaleboxRegion,
    SyncPtyHandle,
)
from scalebox_kernel.config import ScaleboxConfig
from scalebox_kernel.errors import InvalidArgument, SandboxNotFound, ScaleboxError
from scalebox_kernel.protocol.signature import sign

UNKNOWN_ID = "sbx-doesnotexist0000"


@pytest.fixture(scope="module")
def config(local_server: Any) -> ScaleboxConfig:
    return config_for(local_server)


@pytest.fixture(scope="module")
def sandbox(config: ScaleboxConfig) -> Iterator[Sandbox]:
    with Sandbox.create(config=config, metadata={"suite": "test_client_surface"}) as sbx:
        yield sbx


def _wait_for(chunks: list[bytes], marker: bytes, timeout: float = 30.0) -> bytes:
    """Everything the terminal wrote, once `marker` is in it (fails with what arrived, after `timeout` s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = b"".join(chunks)
        if marker in seen:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"{marker!r} never came from the terminal; it wrote {b''.join(chunks)[-2000:]!r}")


# ---------------------------------------------------------------------------------------------------- terminals


def test_pty_interactive_shell_input_resize_and_exit_status(sandbox: Sandbox) -> None:
    chunks: list[bytes] = []
    handle = sandbox.pty.create(
        size=PtySize(rows=24, cols=80), on_data=chunks.append, cwd="/tmp", envs={"SURFACE": "pty-env"}
    )
    assert isinstance(handle, SyncPtyHandle) and handle.pid > 0
    # The typed line is echoed back as typed; only the shell's expansion of it proves it ran.
    sandbox.pty.send_stdin(handle.pid, "echo marker-$SURFACE-$(pwd)-$TERM; [ -t 0 ] && [ -t 1 ] && echo tty$((6*7))\n")
    _wait_for(chunks, b"marker-pty-env-/tmp-xterm-256color")
    _wait_for(chunks, b"tty42")
    assert all(isinstance(chunk, bytes) for chunk in chunks)

    sandbox.pty.send_stdin(handle.pid, b"stty size\n")
    _wait_for(chunks, b"24 80")
    sandbox.pty.resize(handle.pid, PtySize(rows=40, cols=120))
    sandbox.pty.send_stdin(handle.pid, "stty size\n")
    _wait_for(chunks, b"40 120")

    seen = b"".join(chunks)
    sandbox.pty.send_stdin(handle.pid, "exit 3\n")
    result = handle.wait()  # a terminal's exit status is returned, not raised
    assert result.exit_code == 3, (result, seen[-500:])
    assert not sandbox.pty.kill(handle.pid)  # it is gone


def test_pty_kill_and_lifetime_end_the_terminal(sandbox: Sandbox) -> None:
    handle = sandbox.pty.create()
    assert sandbox.pty.kill(handle.pid)
    assert handle.wait().exit_code == -1  # killed by a signal

    started = time.monotonic()
    timed = sandbox.pty.create(timeout=1.5)
    assert timed.wait().exit_code == -1
    assert 1.0 < time.monotonic() - started < 20


def test_pty_refuses_a_bad_size(sandbox: Sandbox) -> None:
    with pytest.raises(InvalidArgument, match="rows"):
        sandbox.pty.create(size=PtySize(rows=0, cols=80))
    with pytest.raises(InvalidArgument, match="cols"):
        sandbox.pty.create(size=PtySize(rows=24, cols=70000))


@pytest.mark.asyncio
async def test_async_pty_with_a_coroutine_callback_and_the_class_forms(config: ScaleboxConfig) -> None:
    sbx = await AsyncSandbox.create(config=config)
    try:
        chunks: list[bytes] = []

        async def on_data(data: bytes) -> None:
            await asyncio.sleep(0)
            chunks.append(data)

        handle = await sbx.pty.create(PtySize(rows=30, cols=100), on_data)
        await sbx.pty.send_stdin(handle.pid, "stty size; exit 7\n")
        result = await asyncio.wait_for(handle.wait(), 30)
        assert result.exit_code == 7
        assert b"30 100" in b"".join(chunks)

        await AsyncSandbox.set_timeout(sbx.sandbox_id, 700, config=config)
        info = await AsyncSandbox.get_info(sbx.sandbox_id, config=config)
        assert info.end_at is not None
        assert abs((info.end_at - datetime.now(UTC)).total_seconds() - 700) < 30
        assert await AsyncSandbox.kill(sbx)  # the class called with a sandbox is the instance form
        assert not await AsyncSandbox.kill(sbx.sandbox_id, config=config)
    finally:
        await sbx.kill()
        await sbx.close()


# ---------------------------------------------------------------------------------------------------- metrics, regions


def test_metrics_of_a_sandbox_and_by_id(sandbox: Sandbox, config: ScaleboxConfig) -> None:
    sandbox.run_code("ballast = bytearray(20 * 1024 * 1024)")  # a running kernel holding memory
    samples = sandbox.get_metrics()
    assert samples and all(isinstance(sample, SandboxMetrics) for sample in samples)
    sample = samples[-1]
    info = sandbox.get_info()
    assert sample.cpu_count == info.cpu_count >= 1
    assert 0.0 <= sample.cpu_used_pct <= 100.0
    assert sample.mem_total == info.memory_mb * 1024 * 1024
    assert 20 * 1024 * 1024 <= sample.mem_used <= sample.mem_total, sample
    assert 0 <= sample.disk_used <= sample.disk_total and sample.disk_total > 0, sample
    assert sample.timestamp is not None
    assert abs((datetime.now(UTC) - sample.timestamp).total_seconds()) < 60

    by_id = Sandbox.get_metrics(sandbox.sandbox_id, config=config)
    assert by_id and by_id[-1].mem_total == sample.mem_total and by_id[-1].cpu_count == sample.cpu_count


def test_regions_and_locality(config: ScaleboxConfig) -> None:
    regions = Sandbox.get_regions(config=config)
    assert regions and all(isinstance(region, ScaleboxRegion) for region in regions)
    assert "local" in [region.id for region in regions] and all(region.name for region in regions)

    with pytest.raises(ScaleboxError) as refused:
        Sandbox.create(config=config, locality={"region": "mars-1", "force": True})
    assert refused.value.status_code == 409 and "mars-1" in str(refused.value)
    with pytest.raises(ScaleboxError) as wrong:
        Sandbox.create(config=config, locality=Locality(region="local", force="yes"))  # type: ignore[arg-type]
    assert wrong.value.status_code == 400

    placed = Sandbox.create(config=config, locality=Locality(region=regions[0].id, force=True))
    try:
        assert placed.get_info().state == "running"
        # The class form by id, from a connection of its own; then the sandbox is gone for every form.
        assert Sandbox.kill(placed.sandbox_id, config=config) is True
        with pytest.raises(SandboxNotFound):
            Sandbox.get_info(placed.sandbox_id, config=config)
        assert Sandbox.kill(placed.sandbox_id, config=config) is False
        assert placed.kill() is False
    finally:
        placed.close()


# ---------------------------------------------------------------------------------------------------- class forms


def test_class_forms_by_id(sandbox: Sandbox, config: ScaleboxConfig) -> None:
    Sandbox.set_timeout(sandbox.sandbox_id, 900, config=config)
    info = Sandbox.get_info(sandbox.sandbox_id, config=config)
    assert info.sandbox_id == sandbox.sandbox_id and info.end_at is not None
    assert abs((info.end_at - datetime.now(UTC)).total_seconds() - 900) < 30
    sandbox.set_timeout(600)  # the instance form still works beside it
    left = (sandbox.get_info().end_at or datetime.now(UTC)) - datetime.now(UTC)
    assert abs(left.total_seconds() - 600) < 30


@pytest.mark.parametrize(
    "call",
    [
        lambda config: Sandbox.set_timeout(UNKNOWN_ID, 120, config=config),
        lambda config: Sandbox.get_info(UNKNOWN_ID, config=config),
        lambda config: Sandbox.get_metrics(UNKNOWN_ID, config=config),
        lambda config: Sandbox.pause(UNKNOWN_ID, config=config),
    ],
    ids=["set_timeout", "get_info", "get_metrics", "pause"],
)
def test_class_forms_with_an_unknown_id_raise_sandbox_not_found(
    call: Callable[[ScaleboxConfig], object], config: ScaleboxConfig
) -> None:
    with pytest.raises(SandboxNotFound) as caught:
        call(config)
    assert UNKNOWN_ID in str(caught.value)
    assert_no_secret(str(caught.value), config.api_key)


def test_kill_of_an_unknown_id_is_false(config: ScaleboxConfig) -> None:
    assert Sandbox.kill(UNKNOWN_ID, config=config) is False


# ---------------------------------------------------------------------------------------------------- signed URLs


def _query(url: str) -> dict[str, str]:
    return {name: values[0] for name, values in parse_qs(urlsplit(url).query).items()}


def _with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    return parts._replace(query=urlencode({**_query(url), **changes})).geturl()


def test_signed_urls_upload_and_download_without_headers(sandbox: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    token = access_token(sandbox)
    path = "/tmp/signed/hello world.txt"
    upload = sandbox.upload_url(path)
    download = sandbox.download_url(path, use_signature_expiration=120)
    assert capsys.readouterr().out == ""  # the seed prints the signature's pre-image, with the token; we do not
    assert_no_secret(upload + download, token, sandbox.config.api_key)
    assert _query(upload)["signature"].startswith("v1_") and _query(upload)["path"] == path
    assert int(_query(download)["signature_expiration"]) > time.time() + 100

    with httpx.Client(timeout=30) as plain:  # no headers at all: the URL is the credential
        # The multipart `path` part cannot redirect a signed upload: the signed path wins.
        sent = plain.post(upload, files={"file": ("x.txt", b"signed bytes")}, data={"path": "/tmp/elsewhere.txt"})
        assert sent.status_code == 200, sent.text
        got = plain.get(download)
        assert got.status_code == 200, got.text
        assert got.content == b"signed bytes"
        assert sandbox.files.read(path) == "signed bytes"
        assert not sandbox.files.exists("/tmp/elsewhere.txt")

        assert plain.get(download.replace("signed/hello", "signed/other")).status_code == 401  # another file
        overridden = _with_query(download, path="/etc/hostname")
        assert plain.get(overridden).status_code == 401  # ?path= is what a download reads: it must be signed
        later = _with_query(download, signature_expiration=str(int(time.time()) + 99999))
        assert plain.get(later).status_code == 401  # the expiry is signed
        flipped = _query(download)["signature"]
        flipped = flipped[:-1] + ("A" if flipped[-1] != "A" else "B")
        assert plain.get(_with_query(download, signature=flipped)).status_code == 401
        assert plain.get(_with_query(download, username="user")).status_code == 401  # the user is signed
        read_for_write = _with_query(upload, signature=_query(sandbox.download_url(path))["signature"])
        refused = plain.post(read_for_write, files={"file": ("x.txt", b"nope")})
        assert refused.status_code == 401 and "invalid signature" in refused.json()["message"]

        past = int(time.time()) - 5
        signed_in_the_past = sign(path, "read", "root", token, past)
        expired = _with_query(download, signature_expiration=str(past), signature=signed_in_the_past)
        answer = plain.get(expired)
        assert answer.status_code == 403 and "expired" in answer.json()["message"], answer.text

        unsigned = urlsplit(download)._replace(query="").geturl()
        assert plain.get(unsigned).status_code == 401  # neither a token nor a signature
        for text in (answer.text, refused.text):
            assert_no_secret(text, token)
    assert sandbox.files.read(path) == "signed bytes"  # nothing refused touched the file


def test_signature_matches_the_seed_sdk() -> None:
    # Computed with scalebox-sdk 1.0.10's scalebox.sandbox.signature.get_signature for the same inputs.
    assert sign("/tmp/a b.txt", "read", "root", "tok-fake") == "v1_EcgicW9kUHN2QUK0CYkuQj+uiZMeKI7ItF0gUw00xDA"


def test_signed_url_argument_errors(sandbox: Sandbox) -> None:
    with pytest.raises(InvalidArgument, match="use_signature_expiration"):
        sandbox.download_url("/tmp/a.txt", use_signature_expiration=0)
    with pytest.raises(InvalidArgument, match="path"):
        sandbox.upload_url("")
