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


# ---- validation at the edge, and one state at a time -----------------------------------------------------------


def test_nul_bytes_bad_names_and_huge_sizes_are_invalid_argument(box: Box) -> None:
    def start_error(request: pb.StartRequest, codec: connect.Codec = connect.PROTO) -> connect.ConnectError:
        reply = box.stream("sandboxagent.Process/Start", request, pb.StartResponse, codec)
        assert reply.status == 200 and reply.messages == [] and reply.error is not None
        return reply.error

    def config(**fields: Any) -> pb.ProcessConfig:
        return pb.ProcessConfig(**{"cmd": "/bin/echo", **fields})

    cases = [
        (pb.StartRequest(process=config(cmd="ec\x00ho")), "process.cmd"),
        (pb.StartRequest(process=config(args=["a", "b\x00"])), "process.args[1]"),
        (pb.StartRequest(process=config(envs={"A": "x\x00y"})), "process.envs.A"),
        (pb.StartRequest(process=config(envs={"A-B": "1"})), "environment variable name"),
        (pb.StartRequest(process=config(envs={"__SCALEBOX_ENV_3": "1"})), "reserved"),
        (pb.StartRequest(process=config(cwd="/tmp\x00")), "process.cwd"),
        (pb.StartRequest(process=config(), pty=pb.PTY(size=pb.PTY.Size(cols=70000, rows=24))), "65535"),
    ]
    for request, needle in cases:
        for codec in (connect.PROTO, connect.JSON):
            error = start_error(request, codec)
            assert error.code == "invalid_argument" and needle in error.message, (needle, error)

    for fields, needle in (
        ({"code": "print(1)\x00"}, "code"),
        ({"code": "1", "language": "py\x00"}, "language"),
        ({"code": "1", "env_vars": {"NOT-A-NAME": "1"}}, "environment variable name"),
    ):
        reply = box.stream(EXECUTE, pb.ExecuteRequest(**fields), pb.ExecuteResponse)
        assert reply.error is not None and reply.error.code == "invalid_argument" and needle in reply.error.message
    status, body = box.unary(
        "sandboxagent.Process/Update",
        pb.UpdateRequest(process=pb.ProcessSelector(pid=1), pty=pb.PTY(size=pb.PTY.Size(cols=1, rows=2**32 - 1))),
        pb.UpdateResponse,
    )
    assert status == 400 and body["code"] == "invalid_argument" and "pty.size.rows" in body["message"]
    status, body = box.unary(
        "sandboxagent.ContextService/CreateContext", pb.CreateContextRequest(cwd="/\x00"), pb.Context
    )
    assert status == 400 and body["code"] == "invalid_argument" and "cwd" in body["message"]
    # A JSON body nested deeper than any request needs: refused before it is parsed.
    deep = b'{"path": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    r = post(box.http, f"{box.base}/{STAT}", deep, "application/json", box.token)
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument" and "deeper" in r.json()["message"]
    assert box.execute("print('still fine')").error is None


def _multipart(boundary: str, path: str, content: bytes) -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="path"\r\n\r\n{path}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )


def test_truncated_multipart_upload_is_refused_and_leaves_no_file(box: Box) -> None:
    headers = {"Content-Type": "multipart/form-data; boundary=b0undary", "X-Access-Token": box.token}
    whole = _multipart("b0undary", "/tmp/upload-whole.txt", b"all of it")
    assert box.http.post(f"{box.base}/upload", content=whole, headers=headers).status_code == 200
    assert box.ok(STAT, pb.StatRequest(path="/tmp/upload-whole.txt"), pb.StatResponse).entry.size == 9
    body = _multipart("b0undary", "/tmp/upload-cut.txt", b"the start of a big file")
    for cut in (body[: -len("--\r\n")], body[: body.index(b"big")], body[: -len("\r\n--b0undary--\r\n")]):
        r = box.http.post(f"{box.base}/upload", content=cut, headers=headers)
        assert r.status_code == 400 and "truncated" in r.json()["error"], r.text
        status, _ = box.unary(STAT, pb.StatRequest(path="/tmp/upload-cut.txt"), pb.StatResponse)
        assert status == 404


def test_download_of_a_too_long_name_is_400(box: Box) -> None:
    headers = {"X-Access-Token": box.token}
    r = box.http.get(f"{box.base}/download/tmp/{'a' * 300}", headers=headers)
    assert r.status_code == 400 and "longer than 255" in r.json()["error"]
    r = box.http.get(f"{box.base}/download/x", params={"path": "/tmp/" + "b/" * 3000}, headers=headers)
    assert r.status_code == 400 and "4096" in r.json()["error"]


def test_an_expired_sandbox_never_reads_as_paused(local_server: LocalServer, http: httpx.Client) -> None:
    """Around the moment of expiry every call says running or expired, never paused (which would make a kernel
    wait for a resume instead of opening a new sandbox)."""
    short = Box(local_server, http, timeout=1)
    seen: set[str] = set()
    expired_calls = 0
    for _ in range(2000):  # each round is a few requests; the whole loop ends soon after the expiry
        r = http.get(f"/v1/sandboxes/{short.id}")
        seen.add(r.json()["data"]["status"] if r.status_code == 200 else r.json()["code"])
        status, body = short.unary(STAT, pb.StatRequest(path="/"), pb.StatResponse)
        seen.add("rpc-ok" if status == 200 else f"rpc-{body['code']}")
        reply = short.stream(EXECUTE, pb.ExecuteRequest(code="1"), pb.ExecuteResponse)
        seen.add("execute-ok" if reply.error is None else f"execute-{reply.error.code}")
        if r.status_code == 404:
            expired_calls += 1
            if expired_calls > 20:
                break
    assert expired_calls > 20
    # A cell already running when the time runs out ends as its kernel stops ("context ... is shutting down").
    allowed = {"running", "sandbox_expired", "rpc-ok", "rpc-not_found", "execute-ok", "execute-not_found"}
    assert seen <= allowed | {"execute-unavailable"}, seen
    assert {"sandbox_expired", "rpc-not_found", "execute-not_found"} <= seen
    assert short.id not in {s["sandbox_id"] for s in http.get("/v1/sandboxes").json()["data"]["sandboxes"]}
    r = http.post(f"/v1/sandboxes/{short.id}/connect", json={"timeout": 60})
    assert r.status_code == 404 and r.json()["code"] == "sandbox_expired"
