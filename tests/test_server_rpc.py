"""scalebox-local's Connect dispatch on the wire: codecs, content types, framing, limits, auth, sandbox states."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import wire
from agent_support import Box
from conftest import LocalServer

from scalebox_kernel.protocol import connect, pb
from scalebox_kernel.server.metrics import sandbox_processes

STAT = "sandboxagent.Filesystem/Stat"
EXECUTE = "sandboxagent.ExecutionService/Execute"


@pytest.fixture(scope="module")
def box(local_server: LocalServer, http: httpx.Client) -> Iterator[Box]:
    sandbox = Box(local_server, http)
    yield sandbox
    http.delete(f"/v1/sandboxes/{sandbox.id}")


@pytest.fixture(scope="module")
def other(local_server: LocalServer, http: httpx.Client) -> Iterator[Box]:
    sandbox = Box(local_server, http)
    yield sandbox
    http.delete(f"/v1/sandboxes/{sandbox.id}")


def post(http: httpx.Client, url: str, body: bytes, content_type: str, token: str | None, **headers: str) -> Any:
    all_headers = dict(wire.SDK_HEADERS, **{"Content-Type": content_type}, **headers)
    if token is not None:
        all_headers["X-Access-Token"] = token
    return http.post(url, content=body, headers=all_headers)


def frames(body: bytes) -> list[tuple[int, bytes]]:
    reader = connect.EnvelopeReader()
    out = list(reader.feed(body))
    assert reader.pending == 0
    return out


@pytest.mark.parametrize("codec", [connect.PROTO, connect.JSON], ids=["proto", "json"])
def test_unary_in_both_codecs_with_exact_content_types(http: httpx.Client, box: Box, codec: connect.Codec) -> None:
    r = post(
        http,
        f"{box.base}/{STAT}",
        codec.encode(pb.StatRequest(path="/home/user")),
        codec.unary_content_type,
        box.token,
        **{"Accept-Encoding": "gzip, deflate, br"},
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == codec.unary_content_type
    assert "content-encoding" not in r.headers
    entry = codec.decode(r.content, pb.StatResponse).entry
    assert entry.type == pb.FILE_TYPE_DIRECTORY and entry.path == "/home/user"
    if codec is connect.JSON:
        assert json.loads(r.content)["entry"]["path"] == "/home/user"

    r = post(
        http, f"{box.base}/{STAT}", codec.encode(pb.StatRequest(path="/nope")), codec.unary_content_type, box.token
    )
    assert r.status_code == 404 and r.headers["content-type"] == "application/json"
    assert r.json()["code"] == "not_found" and "no such file or directory" in r.json()["message"]


@pytest.mark.parametrize("codec", [connect.PROTO, connect.JSON], ids=["proto", "json"])
def test_stream_in_both_codecs_ends_with_end_stream(http: httpx.Client, box: Box, codec: connect.Codec) -> None:
    reply = wire.stream(
        http, box.base, EXECUTE, pb.ExecuteRequest(code="print(6 * 7)"), pb.ExecuteResponse, box.token, codec
    )
    assert reply.status == 200 and reply.content_type == codec.stream_content_type
    assert reply.ended and reply.error is None
    assert [m.stdout.content for m in reply.messages if m.HasField("stdout")] == ["42\n"]

    reply = wire.stream(
        http, box.base, EXECUTE, pb.ExecuteRequest(code="x", language="cobol"), pb.ExecuteResponse, box.token, codec
    )
    assert reply.status == 200 and reply.ended  # a stream error travels in the end-of-stream frame
    assert reply.error is not None and reply.error.code == "invalid_argument"


def test_chunked_request_body(http: httpx.Client, box: Box) -> None:
    body = connect.envelope(pb.ExecuteRequest(code="print('chunked')").SerializeToString())

    def pieces() -> Iterator[bytes]:  # what urllib3 and aiohttp send: Transfer-Encoding: chunked, no length
        yield body[:3]
        yield body[3:]

    headers = dict(wire.SDK_HEADERS, **{"Content-Type": "application/connect+proto", "X-Access-Token": box.token})
    r = http.post(f"{box.base}/{EXECUTE}", content=pieces(), headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == "application/connect+proto"
    got = frames(r.content)
    assert got[-1][0] == connect.FLAG_END_STREAM and json.loads(got[-1][1]) == {}
    stdout = [pb.ExecuteResponse.FromString(p).stdout.content for f, p in got[:-1]]
    assert "chunked\n" in stdout


def test_malformed_requests_get_clear_errors(http: httpx.Client, box: Box) -> None:
    url = f"{box.base}/{EXECUTE}"
    stream_ct = "application/connect+proto"

    def stream_error(body: bytes) -> connect.ConnectError:
        r = post(http, url, body, stream_ct, box.token)
        assert r.status_code == 200 and r.headers["content-type"] == stream_ct
        (flags, payload), *_ = frames(r.content)
        assert flags == connect.FLAG_END_STREAM
        error = connect.parse_end_stream(payload)
        assert error is not None
        return error

    error = stream_error(b"\x00\x00\x00\x00\x09abc")
    assert error.code == "invalid_argument" and "truncated" in error.message
    one = connect.envelope(pb.ExecuteRequest(code="1").SerializeToString())
    assert "exactly one" in stream_error(one + one).message
    assert "exactly one" in stream_error(b"").message
    assert stream_error(connect.envelope(b"\xff\xff\xff", connect.FLAG_COMPRESSED)).code == "unimplemented"
    assert stream_error(connect.envelope(b"\x0a\xff\x01")).code == "invalid_argument"  # not a protobuf

    r = post(http, f"{box.base}/{STAT}", b"\x0a\xff\xff\xff", "application/proto", box.token)
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument" and "StatRequest" in r.json()["message"]
    r = post(http, f"{box.base}/{STAT}", b"{path:", "application/json", box.token)
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"
    r = post(http, f"{box.base}/{STAT}", b"{}", "text/plain", box.token)
    assert r.status_code == 415 and "Content-Type" in r.json()["message"] and r.json()["code"]
    r = post(http, f"{box.base}/{STAT}", b"", "application/connect+proto", box.token)  # unary as a stream
    assert r.status_code == 200 and "unary" in connect.parse_end_stream(frames(r.content)[0][1]).message  # type: ignore[union-attr]
    # The server is fine afterwards.
    assert wire.unary(http, box.base, STAT, pb.StatRequest(path="/tmp"), pb.StatResponse, box.token)[0] == 200


def test_unknown_method_is_unimplemented(http: httpx.Client, box: Box) -> None:
    for method in ("sandboxagent.Filesystem/Format", "sandboxagent.Process/StreamInput", "other.Service/Call"):
        status, body = wire.unary(http, box.base, method, pb.StatRequest(), pb.StatResponse, box.token)
        assert status == 501 and body["code"] == "unimplemented" and method in body["message"]


def test_tokens(http: httpx.Client, box: Box, other: Box) -> None:
    req = pb.StatRequest(path="/home/user")
    for token, needle in (
        (None, "missing X-Access-Token"),
        ("wrong", "invalid access token"),
        (other.token, "invalid"),
    ):
        status, body = wire.unary(http, box.base, STAT, req, pb.StatResponse, token)
        assert status == 401 and body["code"] == "unauthenticated" and needle in body["message"]
        reply = wire.stream(http, box.base, EXECUTE, pb.ExecuteRequest(code="1"), pb.ExecuteResponse, token)
        assert reply.status == 200 and reply.error is not None and reply.error.code == "unauthenticated"
        assert reply.messages == []
    assert wire.unary(http, other.base, STAT, req, pb.StatResponse, other.token)[0] == 200
    for path in ("health", "download/home/user/x.txt"):
        assert http.get(f"{box.base}/{path}", headers={"X-Access-Token": other.token}).status_code == 401
    r = http.post(f"{box.base}/upload", files={"file": ("/tmp/x", b"x")}, data={"path": "/tmp/x"})
    assert r.status_code == 401 and "error" in r.json()
    # The Python SDK polls file watchers without any headers: accepted (an unknown watcher is then not_found).
    r = http.post(
        f"{box.base}/sandboxagent.Filesystem/GetWatcherEvents",
        content=pb.GetWatcherEventsRequest(watcher_id="w-none").SerializeToString(),
        headers={"Content-Type": "application/proto"},
    )
    assert r.status_code != 401
    assert http.get(f"{box.base}/health", headers={"X-Access-Token": box.token}).status_code == 204


def test_unknown_paused_and_expired_sandboxes(local_server: LocalServer, http: httpx.Client) -> None:
    base = local_server.url + "/sbx/sbx-missing"
    status, body = wire.unary(http, base, STAT, pb.StatRequest(path="/"), pb.StatResponse, "t")
    assert status == 404 and body == {"code": "not_found", "message": "sandbox sbx-missing not found"}
    reply = wire.stream(http, base, EXECUTE, pb.ExecuteRequest(code="1"), pb.ExecuteResponse, "t")
    assert reply.status == 200 and reply.error is not None and reply.error.code == "not_found"

    paused = Box(local_server, http)
    try:
        assert http.post(f"/v1/sandboxes/{paused.id}/pause").status_code == 200
        status, body = wire.unary(http, paused.base, STAT, pb.StatRequest(path="/"), pb.StatResponse, paused.token)
        assert status == 400 and body["code"] == "failed_precondition" and "is paused; connect" in body["message"]
        assert http.get(f"{paused.base}/health", headers={"X-Access-Token": paused.token}).status_code == 502
        assert http.post(f"/v1/sandboxes/{paused.id}/connect", json={"timeout": 60}).status_code == 200
        status, _ = wire.unary(http, paused.base, STAT, pb.StatRequest(path="/"), pb.StatResponse, paused.token)
        assert status == 200
    finally:
        http.delete(f"/v1/sandboxes/{paused.id}")

    short = Box(local_server, http, timeout=1)
    deadline = time.monotonic() + 10
    while http.get(f"/v1/sandboxes/{short.id}").status_code != 404:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    status, body = wire.unary(http, short.base, STAT, pb.StatRequest(path="/"), pb.StatResponse, short.token)
    assert status == 404 and "expired" in body["message"]


@pytest.fixture(scope="module")
def tuned(server_factory: Callable[..., LocalServer]) -> Iterator[LocalServer]:
    """A server with a small request limit and paused sandboxes stopped after 1 s."""
    server = server_factory(extra=["--ServerSettings.max_request_bytes=65536", "--ServerSettings.pause_stop_after=1"])
    yield server
    server.stop()


def test_oversized_bodies(tuned: LocalServer) -> None:
    with tuned.client() as http:
        small = Box(tuned, http)
        big = pb.StatRequest(path="/" + "a" * 70000)
        r = post(http, f"{small.base}/{STAT}", big.SerializeToString(), "application/proto", small.token)
        assert r.status_code == 413 and r.json()["code"] == "resource_exhausted" and "65536" in r.json()["message"]
        request = connect.envelope(pb.ExecuteRequest(code="#" + "x" * 70000).SerializeToString())
        r = post(http, f"{small.base}/{EXECUTE}", request, "application/connect+proto", small.token)
        assert r.status_code == 200
        error = connect.parse_end_stream(frames(r.content)[-1][1])
        assert error is not None and error.code == "resource_exhausted"
        # Still serving, and a request under the limit works.
        assert wire.unary(http, small.base, STAT, pb.StatRequest(path="/tmp"), pb.StatResponse, small.token)[0] == 200
        http.delete(f"/v1/sandboxes/{small.id}")


def test_long_paused_sandbox_is_stopped_and_says_so(tuned: LocalServer) -> None:
    with tuned.client() as http:
        http.timeout = httpx.Timeout(60)
        sandbox = Box(tuned, http)
        run = pb.ExecuteRequest(code="x = 1\nprint('set')")
        assert wire.stream(http, sandbox.base, EXECUTE, run, pb.ExecuteResponse, sandbox.token).error is None
        root = tuned.data_dir / "sandboxes" / sandbox.id / "root"
        assert sandbox_processes(root)  # the kernel
        assert http.post(f"/v1/sandboxes/{sandbox.id}/pause").status_code == 200
        deadline = time.monotonic() + 15
        while sandbox_processes(root):  # stopped to free memory after pause_stop_after
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert http.post(f"/v1/sandboxes/{sandbox.id}/connect", json={"timeout": 60}).status_code == 200
        reply = wire.stream(
            http, sandbox.base, EXECUTE, pb.ExecuteRequest(code="print('back')"), pb.ExecuteResponse, sandbox.token
        )
        stderr = "".join(m.stderr.content for m in reply.messages)
        assert "paused for more than 1 s" in stderr
        assert [m.stdout.content for m in reply.messages if m.HasField("stdout")] == ["back\n"]
        http.delete(f"/v1/sandboxes/{sandbox.id}")


def test_client_disconnect_interrupts_execute(http: httpx.Client, box: Box) -> None:
    code = "import time\nfor i in range(600):\n    print(i, flush=True)\n    time.sleep(0.05)\n"
    body = connect.envelope(pb.ExecuteRequest(code=code).SerializeToString())
    headers = dict(wire.SDK_HEADERS, **{"Content-Type": "application/connect+proto", "X-Access-Token": box.token})
    with http.stream("POST", f"{box.base}/{EXECUTE}", content=body, headers=headers) as r:
        reader = connect.EnvelopeReader()
        seen = 0
        for chunk in r.iter_raw():
            seen += sum(1 for flags, _ in reader.feed(chunk) if flags == 0)
            if seen >= 3:
                break
    time.sleep(1.0)
    reply = wire.stream(http, box.base, EXECUTE, pb.ExecuteRequest(code="print(i)"), pb.ExecuteResponse, box.token)
    assert reply.error is None
    printed = [m.stdout.content for m in reply.messages if m.HasField("stdout")]
    assert printed and int(printed[0]) < 200  # the loop stopped long before its 30 s; the kernel kept `i`
