"""Fuzzing scalebox-local's edge: every REST route, every Connect RPC (both codecs, unary and enveloped), /upload
and /download, with malformed JSON, wrong types, extreme numbers, deep nesting, NUL bytes, lone surrogates and
truncated envelopes and multipart bodies.

What must hold throughout: no 5xx (bar the two the protocol asks for), every error a
JSON or Connect body, the one keep-alive connection never dropped, no sandbox left behind by a failed create, and
at the end a healthy server that still runs code. Derandomised and bounded (about a minute on a busy machine).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import wire
from agent_support import Box
from client_support import config_for
from conftest import LocalServer
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scalebox_kernel.client import Sandbox
from scalebox_kernel.protocol import connect, pb
from scalebox_kernel.server.agent.rpcs import RPCS

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=30),  # only a hang detector: the machine is shared and slow at times
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# ---- values --------------------------------------------------------------------------------------------------

NASTY_STRINGS = ["", "\x00", "a\x00b", "x" * 5000, "é☃", "../..", "/", " ", "\n", "%00", "\ud800", "a=b", "$(id)"]
text = st.one_of(st.sampled_from(NASTY_STRINGS), st.text(max_size=12))
encodable = text.filter(lambda s: not any(0xD800 <= ord(c) <= 0xDFFF for c in s))
EXTREME_NUMBERS = [0, -1, -3, 1, 2**31, 2**32, 2**63, -(2**63), 10**15, 10**30, 0.5, 1e23, -0.0, 1e308, 3.0]
numbers = st.one_of(st.sampled_from(EXTREME_NUMBERS), st.integers(), st.floats(allow_nan=False))
leaf = st.one_of(st.none(), st.booleans(), numbers, text)
json_values = st.recursive(
    leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)),
    max_leaves=8,
)
uint32 = st.one_of(st.sampled_from([0, 1, 65535, 65536, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
# Paths that mutating RPCs and uploads may touch: under a scratch directory, with nasty but harmless names.
safe_name = st.text(min_size=1, max_size=300).filter(lambda s: "/" not in s and s not in (".", ".."))
scratch_path = st.one_of(
    st.builds(lambda name: f"/tmp/fuzz/{name}", safe_name), st.sampled_from(["", "\x00", "/tmp/fuzz/a\x00b"])
)
# Paths a stream must not be able to watch (a valid one would stream until the client leaves).
unwatchable = st.one_of(
    st.sampled_from(["", "\x00", "/tmp/\x00", "x" * 5000, "/nonexistent/dir", "/etc/hostname"]),
    st.builds(lambda name: f"/nonexistent/{name}", safe_name),
)


def deep(depth: int, opener: bytes = b"[", closer: bytes = b"]") -> bytes:
    return opener * depth + closer * depth


RAW_BODIES = [
    deep(5000),
    deep(33),
    b"[" * 5000,
    b'{"a":' * 40 + b"1" + b"}" * 40,
    b"{",
    b'{"timeout": NaN}',
    b'{"timeout": Infinity}',
    b'{"timeout": 1' + b"0" * 5000 + b"}",
    b'{"a": "\\ud800"}',
    b'{"path": "\\ud800", "code": "\\udfff"}',
    b"\xff\xfe",
    b'{"a": 1, "a": 2',
    b"\x00",
]
#: Bodies that are never a valid JSON object (whitespace or `null` would be `{}`, a valid create).
raw_json = st.one_of(st.sampled_from(RAW_BODIES), st.binary(max_size=64).map(lambda b: b"#" + b))

# ---- the fuzzing client ----------------------------------------------------------------------------------------


class Fuzzer:
    """One HTTP client on one connection, whose every response is checked (and whose new connections are counted)."""

    def __init__(self, server: LocalServer) -> None:
        self.server = server
        self.http = httpx.Client(
            base_url=server.url,
            headers={"X-API-KEY": server.api_key},
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            timeout=httpx.Timeout(60),
        )
        self.connections = 0
        self.requests = 0
        self.created: list[str] = []  # sandboxes a fuzzed create made after all (killed at once)
        self.running: set[str] = set()  # sandboxes of this module that are running

    def _trace(self, event: str, info: Any) -> None:
        if event == "connection.connect_tcp.complete":
            self.connections += 1

    def send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request; asserts the answer is no 5xx (bar 502 for a sandbox that is not running) and has a body
        a client can parse."""
        r = self.http.request(method, url, extensions={"trace": self._trace}, **kwargs)
        self.requests += 1
        assert r.status_code < 500 or self._by_design(r, url), f"{method} {url[:200]}: {r.status_code} {r.text[:500]}"
        if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
            body = r.json()
            assert isinstance(body, dict) and ("error" in body or "code" in body), r.text[:300]
        if r.headers.get("content-type", "").startswith("application/connect+"):
            self.check_stream(r)
        return r

    def _by_design(self, r: httpx.Response, url: str) -> bool:
        """The two 5xx the protocol asks for: 501 `unimplemented` for an RPC scalebox-local does not have (Connect's
        mapping), and 502, the file endpoints' "that sandbox is not running" (never for ours)."""
        if not url.startswith(f"{self.server.url}/sbx/"):
            return False
        sandbox_id, _, rest = url.removeprefix(f"{self.server.url}/sbx/").partition("/")
        if r.status_code == 501:
            return r.json()["code"] == "unimplemented" and rest not in RPCS
        return r.status_code == 502 and sandbox_id not in self.running

    @staticmethod
    def check_stream(r: httpx.Response) -> None:
        """A Connect stream: whole frames, the last one the end of the stream."""
        reader = connect.EnvelopeReader(max_message_bytes=2**31)
        frames = list(reader.feed(r.content))
        assert reader.pending == 0 and frames, r.content[:200]
        assert frames[-1][0] & connect.FLAG_END_STREAM, frames[-1]
        error = connect.parse_end_stream(frames[-1][1])
        assert error is None or error.code != "internal", error

    def created_by_fuzz(self, r: httpx.Response) -> None:
        """A create that went through after all: kill it at once (each costs a second)."""
        if r.status_code == 201:
            sandbox_id = r.json()["data"]["sandbox_id"]
            self.created.append(sandbox_id)
            assert self.send("DELETE", f"/v1/sandboxes/{sandbox_id}").status_code == 200


@pytest.fixture(scope="module")
def server(server_factory: Any) -> Iterator[LocalServer]:
    """A server of this module's own: the fuzz must not disturb, or be disturbed by, other tests."""
    srv = server_factory()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def fuzzer(server: LocalServer) -> Iterator[Fuzzer]:
    fuzzer = Fuzzer(server)
    yield fuzzer
    fuzzer.http.close()


@pytest.fixture(scope="module")
def box(server: LocalServer, fuzzer: Fuzzer) -> Iterator[Box]:
    """The sandbox the agent-plane fuzzing talks to (running throughout, never paused or killed by the fuzz)."""
    sandbox = Box(server, fuzzer.http, timeout=3600, metadata={"role": "fuzz"})
    fuzzer.running.add(sandbox.id)
    r = fuzzer.send(
        "POST",
        sandbox.base + "/sandboxagent.Filesystem/MakeDir",
        content=pb.MakeDirRequest(path="/tmp/fuzz").SerializeToString(),
        headers={"Content-Type": "application/proto", "X-Access-Token": sandbox.token},
    )
    assert r.status_code == 200, r.text
    yield sandbox
    fuzzer.running.discard(sandbox.id)
    fuzzer.http.delete(f"/v1/sandboxes/{sandbox.id}")


# ---- REST ------------------------------------------------------------------------------------------------------

#: A field and a value that make any create body invalid, whatever else it holds.
POISON = [
    ("timeout", 0),
    ("timeout", -1),
    ("timeout", 10**9),
    ("timeout", "300"),
    ("timeout", True),
    ("timeout", 1e23),
    ("timeout", 2**63),
    ("timeout", 0.5),
    ("cpu_count", -3),
    ("cpu_count", 0),
    ("cpu_count", 10**6),
    ("cpu_count", 2**63),
    ("cpu_count", 1.5),
    ("cpu_count", "2"),
    ("memory_mb", -5),
    ("memory_mb", 2**63),
    ("memory_mb", 1e23),
    ("memory_mb", 10**15),
    ("memory_mb", 1),
    ("memory_mb", False),
    ("disk_mb", 1),
    ("disk_mb", 10**12),
    ("storage_gb", 0),
    ("storage_gb", 10**9),
    ("storage_gb", "1"),
    ("env_vars", {"A-B": "1"}),
    ("env_vars", {"A": "a\x00"}),
    ("env_vars", {"": "x"}),
    ("env_vars", {"1A": "x"}),
    ("env_vars", {"A=B": "x"}),
    ("env_vars", {"__SCALEBOX_ENV_0": "x"}),
    ("env_vars", {"A": "\ud800"}),
    ("env_vars", []),
    ("env_vars", {"A": 1}),
    ("metadata", {"k": None}),
    ("metadata", {"k": "v\x00"}),
    ("metadata", {"k\ud800": "v"}),
    ("metadata", "k=v"),
    ("metadata", {str(i): "v" for i in range(300)}),
    ("template", 7),
    ("template", "t" * 200),
    ("template", "a\x00"),
    ("template", ["base"]),
    ("secure", "yes"),
    ("auto_pause", 1),
    ("allow_internet_access", "false"),
    ("is_async", "no"),
    ("locality", "local"),
    ("locality", {"force": "yes"}),
    ("locality", {"force": True, "region": "mars"}),
    ("object_storage", [{"uri": "s3://b"}]),
    ("object_storage", "s3://bucket/"),
    ("object_storage", [{"uri": "s3://bucket/", "mount_point": "/etc/x", "access_key": "a", "secret_key": "b"}]),
    ("object_storage", {"uri": "s3://bucket/..", "mount_point": "/mnt/x", "access_key": "a", "secret_key": "b"}),
    ("object_storage", [{"uri": "s3://bucket/", "mount_point": "/mnt/x\x00", "access_key": "a", "secret_key": "b"}]),
    ("object_storage", [None]),
    ("object_storage_direct_mount", "yes"),
    ("s3fs_executable_path", "/bin/sh"),
    ("net_proxy_country", "japan"),
]
CREATE_FIELDS = [
    "template",
    "timeout",
    "metadata",
    "env_vars",
    "secure",
    "allow_internet_access",
    "auto_pause",
    "cpu_count",
    "memory_mb",
    "disk_mb",
    "storage_gb",
    "is_async",
    "locality",
    "name",
    "object_storage",
    "object_storage_direct_mount",
    "s3fs_executable_path",
]


@st.composite
def poisoned_create_body(draw: st.DrawFn) -> bytes:
    extra = draw(st.dictionaries(st.one_of(st.sampled_from(CREATE_FIELDS), text), json_values, max_size=5))
    field, value = draw(st.sampled_from(POISON))
    body = json.dumps({**extra, field: value}).encode()
    if draw(st.integers(0, 5)) == 0:  # cut short: never valid
        body = body[: draw(st.integers(1, len(body) - 1))]
    return body


@settings(FUZZ, max_examples=400)
@given(body=st.one_of(poisoned_create_body(), raw_json), content_type=st.sampled_from(["application/json", "text/x"]))
def test_fuzz_create(fuzzer: Fuzzer, body: bytes, content_type: str) -> None:
    r = fuzzer.send("POST", "/v1/sandboxes", content=body, headers={"Content-Type": content_type})
    fuzzer.created_by_fuzz(r)
    assert r.status_code in (400, 409, 413), r.text[:300]
    try:
        sent = json.loads(body)
    except (ValueError, RecursionError):
        return
    message = r.json()["error"]
    if isinstance(sent, dict) and r.status_code == 400:  # the answer names a field of the body
        assert "request body" in message or any(str(field)[:64] in message for field in sent), (message, sent)


SANDBOX_ROUTES = [
    ("GET", ""),
    ("DELETE", ""),
    ("POST", "/timeout"),
    ("PUT", "/timeout"),
    ("POST", "/connect"),
    ("POST", "/resume"),
    ("POST", "/pause"),
    ("GET", "/metrics"),
    ("GET", "/status"),
    ("PATCH", ""),
]
fake_ids = st.one_of(
    st.sampled_from(["sbx-missing", "sbx-" + "0" * 16, "%00", "a%2Fb", "x" * 3000, "..", "%ff", "%C3%A9"]),
    st.text(alphabet="abcdef0123456789-_.~", min_size=1, max_size=40),
)
bad_timeouts = st.sampled_from([0, -5, 10**9, 2**63, 1e23, "soon", True, [], {}, 0.5, -0.0])


@settings(FUZZ, max_examples=500)
@given(
    route=st.sampled_from(SANDBOX_ROUTES),
    target=st.sampled_from(["fake", "box"]),
    fake_id=fake_ids,
    body=st.one_of(
        raw_json,
        st.builds(
            lambda t, extra: json.dumps({**extra, "timeout": t}).encode(),
            bad_timeouts,
            st.dictionaries(text, json_values, max_size=3),
        ),
        st.just(b""),
    ),
    key=st.sampled_from([None, "wrong", ""]),
)
def test_fuzz_sandbox_routes(
    fuzzer: Fuzzer, box: Box, route: tuple[str, str], target: str, fake_id: str, body: bytes, key: str | None
) -> None:
    method, suffix = route
    if (target == "box" and method in ("DELETE", "PATCH")) or route == ("POST", "/pause"):
        target = "fake"  # the box must stay running: only harmless calls (and invalid timeouts) reach it
    sandbox_id = box.id if target == "box" else fake_id
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["X-API-KEY"] = key
    content = body if method in ("POST", "PUT", "PATCH") else None
    r = fuzzer.send(method, f"/v1/sandboxes/{sandbox_id}{suffix}", content=content, headers=headers)
    assert r.status_code != 200 or (target == "box" and method == "GET") or suffix in ("/connect", "/resume"), r.text


@settings(FUZZ, max_examples=200)
@given(
    params=st.dictionaries(
        st.sampled_from(["status", "limit", "page_size", "page", "offset", "skip", "metadata", "state"]),
        st.one_of(text.filter(lambda s: "\ud800" not in s), st.sampled_from(["0", "9" * 5000, "²", "-1", "running,x"])),
        max_size=4,
    ),
    path=st.sampled_from(["/v1/sandboxes", "/v1/scalebox-regions", "/health", "/v1/sandboxes/", "/v1"]),
)
def test_fuzz_list_and_regions(fuzzer: Fuzzer, box: Box, params: dict[str, str], path: str) -> None:
    try:
        r = fuzzer.send("GET", path, params=params)
    except UnicodeEncodeError:  # the client cannot send it
        return
    if r.status_code == 200 and path == "/v1/sandboxes":
        assert r.json()["success"] is True


# ---- Connect ---------------------------------------------------------------------------------------------------

ptext = encodable  # protobuf cannot even hold a lone surrogate: those go in raw JSON bodies
safe_code = st.one_of(
    st.sampled_from(["1", "print('fuzz')", "", "\x00", "a\x00b", "'''", "x" * 10000, "raise ValueError(1)"]),
    st.text(alphabet="abc ()'\"\\\n\x00#", max_size=30),
)
env_names = st.one_of(st.from_regex(r"[A-Z_][A-Z0-9_]{0,8}", fullmatch=True), ptext)
env_maps = st.dictionaries(env_names, ptext, max_size=3)
selectors = st.one_of(
    st.builds(lambda pid: pb.ProcessSelector(pid=pid), uint32),
    st.builds(lambda tag: pb.ProcessSelector(tag=tag), ptext),
)
sizes = st.builds(lambda cols, rows: pb.PTY(size=pb.PTY.Size(cols=cols, rows=rows)), uint32, uint32)


def _config(cmd: str, args: list[str], envs: dict[str, str], cwd: str | None) -> pb.ProcessConfig:
    config = pb.ProcessConfig(cmd=cmd, args=args, envs=envs)
    if cwd is not None:
        config.cwd = cwd
    return config


def _start(config: pb.ProcessConfig, pty: pb.PTY | None, tag: str | None) -> pb.StartRequest:
    request = pb.StartRequest(process=config)
    if pty is not None:
        request.pty.CopyFrom(pty)
    if tag is not None:
        request.tag = tag
    return request


def _input(selector: pb.ProcessSelector, data: bytes, to_pty: bool) -> pb.SendInputRequest:
    given_input = pb.ProcessInput(pty=data) if to_pty else pb.ProcessInput(stdin=data)
    return pb.SendInputRequest(process=selector, input=given_input)


def _update(selector: pb.ProcessSelector, pty: pb.PTY | None) -> pb.UpdateRequest:
    request = pb.UpdateRequest(process=selector)
    if pty is not None:
        request.pty.CopyFrom(pty)
    return request


#: Requests for every method of the proto's services, built so that none can harm the box or never end.
REQUESTS: dict[str, st.SearchStrategy[Message]] = {
    "sandboxagent.Filesystem/Stat": st.builds(pb.StatRequest, path=ptext),
    "sandboxagent.Filesystem/MakeDir": st.builds(pb.MakeDirRequest, path=scratch_path),
    "sandboxagent.Filesystem/Move": st.builds(pb.MoveRequest, source=scratch_path, destination=scratch_path),
    "sandboxagent.Filesystem/ListDir": st.builds(pb.ListDirRequest, path=ptext, depth=uint32),
    "sandboxagent.Filesystem/Remove": st.builds(pb.RemoveRequest, path=scratch_path),
    "sandboxagent.Filesystem/WatchDir": st.builds(pb.WatchDirRequest, path=unwatchable, recursive=st.booleans()),
    "sandboxagent.Filesystem/CreateWatcher": st.builds(
        pb.CreateWatcherRequest, path=unwatchable, recursive=st.booleans()
    ),
    "sandboxagent.Filesystem/GetWatcherEvents": st.builds(pb.GetWatcherEventsRequest, watcher_id=ptext),
    "sandboxagent.Filesystem/RemoveWatcher": st.builds(pb.RemoveWatcherRequest, watcher_id=ptext),
    "sandboxagent.Process/List": st.just(pb.ListRequest()),
    "sandboxagent.Process/Connect": st.builds(pb.ConnectRequest, process=selectors),
    "sandboxagent.Process/Start": st.builds(
        _start,
        st.builds(
            _config,
            st.sampled_from(["true", "echo", "", "\x00", "ech\x00o", "no-such-program", "x" * 5000, "/"]),
            st.lists(ptext, max_size=3),
            env_maps,
            st.one_of(st.none(), ptext),
        ),
        st.one_of(st.none(), sizes),
        st.one_of(st.none(), ptext),
    ),
    "sandboxagent.Process/Update": st.builds(_update, selectors, st.one_of(st.none(), sizes)),
    "sandboxagent.Process/StreamInput": st.just(pb.StreamInputRequest()),
    "sandboxagent.Process/SendInput": st.builds(_input, selectors, st.binary(max_size=16), st.booleans()),
    "sandboxagent.Process/SendSignal": st.builds(
        pb.SendSignalRequest, process=selectors, signal=st.sampled_from([0, 9, 15, 2, 99, 2**31 - 1])
    ),
    "sandboxagent.ExecutionService/Execute": st.builds(
        pb.ExecuteRequest,
        context_id=st.one_of(st.just(""), st.sampled_from(["nope", "\x00", "python-" + "0" * 16, "x" * 3000])),
        code=safe_code,
        language=st.one_of(
            st.sampled_from(["", "python"]), st.sampled_from(["PYTHON", "py\x00", "no-such-language", "x" * 300])
        ),
        env_vars=env_maps,
    ),
    "sandboxagent.ContextService/CreateContext": st.builds(
        pb.CreateContextRequest,
        language=st.sampled_from(["\x00", "no-such-language", "py\x00thon", "x" * 300, "python\n"]),
        cwd=ptext,
    ),
    "sandboxagent.ContextService/DestroyContext": st.builds(pb.DestroyContextRequest, context_id=ptext),
}


def test_every_rpc_of_the_protocol_is_fuzzed() -> None:
    methods = {
        f"{service.full_name}/{method.name}"
        for service in pb.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert methods == set(REQUESTS)


def _encode(codec: connect.Codec, message: Message) -> bytes | None:
    """The message in that codec, or None where it cannot be written (protobuf refuses invalid UTF-8)."""
    try:
        return codec.encode(message)
    except (ValueError, UnicodeError):
        return None


@st.composite
def rpc_calls(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """(method, content type, body): a valid or nasty message, enveloped or not, sometimes cut or mangled."""
    method = draw(st.sampled_from(sorted(REQUESTS)))
    codec = draw(st.sampled_from([connect.PROTO, connect.JSON]))
    streaming = method.endswith(("/WatchDir", "/Connect", "/Start", "/Execute", "/StreamInput"))
    if draw(st.integers(0, 9)) == 0:
        streaming = not streaming  # the wrong kind of call
    content_type = codec.stream_content_type if streaming else codec.unary_content_type
    if draw(st.integers(0, 19)) == 0:
        content_type = draw(st.sampled_from(["text/plain", "application/grpc", "", "application/connect+xml"]))
    how = draw(st.sampled_from(["message", "message", "message", "raw", "json", "cut", "frames", "length", "flags"]))
    payload = _encode(codec, draw(REQUESTS[method])) or b""
    if how == "raw":
        payload = draw(raw_json) if codec is connect.JSON else draw(st.binary(max_size=64))
    elif how == "json" and codec is connect.JSON:
        payload = json.dumps(draw(st.dictionaries(text, json_values, max_size=4))).encode()
    body = connect.envelope(payload) if streaming else payload
    if how == "cut" and body:
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif how == "frames" and streaming:
        body = body + draw(st.sampled_from([body, connect.end_stream(), connect.envelope(b"", 0x80)]))
    elif how == "length" and streaming:
        body = draw(st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1])).to_bytes(4, "big").rjust(5, b"\x00") + payload
    elif how == "flags" and streaming:
        body = bytes([draw(st.integers(0, 255))]) + body[1:]
    return method, content_type, body


@settings(FUZZ, max_examples=2500)
@given(call=rpc_calls(), token=st.sampled_from(["box", "box", "box", "box", "none", "wrong"]))
def test_fuzz_rpcs(fuzzer: Fuzzer, box: Box, call: tuple[str, str, bytes], token: str) -> None:
    method, content_type, body = call
    headers = dict(wire.SDK_HEADERS, **{"Content-Type": content_type})
    if token != "none":
        headers["X-Access-Token"] = box.token if token == "box" else "wrong"
    if token == "box" and content_type.startswith("application/connect"):
        headers["Keepalive-Ping-Interval"] = "9" * 5000 if len(body) % 2 else "²".encode()
    fuzzer.send("POST", f"{box.base}/{method}", content=body, headers=headers)


def test_fuzz_rpcs_against_unknown_sandboxes(fuzzer: Fuzzer, server: LocalServer) -> None:
    for sandbox_id in ("sbx-missing", "x" * 3000, "%00"):
        for path in ("health", "download/tmp/x", "upload"):
            fuzzer.send("POST" if path == "upload" else "GET", f"{server.url}/sbx/{sandbox_id}/{path}")
        for content_type in ("application/proto", "application/connect+json"):
            fuzzer.send(
                "POST",
                f"{server.url}/sbx/{sandbox_id}/sandboxagent.Filesystem/Stat",
                content=b"",
                headers={"Content-Type": content_type, "X-Access-Token": "t"},
            )


# ---- /upload and /download -------------------------------------------------------------------------------------


@st.composite
def multipart_bodies(draw: st.DrawFn) -> tuple[str, bytes, str | None]:
    """(content type, body, query path): mostly a `path` and a `file` part, plus odd ones, sometimes cut short."""
    boundary = draw(st.text(alphabet="abcXYZ0123456789'()+_,-./:=?", min_size=1, max_size=72))
    names = [
        name
        for name, wanted in (("path", draw(st.integers(0, 9)) < 7), ("file", draw(st.integers(0, 9)) < 8))
        if wanted
    ]
    names += draw(st.lists(st.sampled_from(["file", "path", "other", "", 'fi"le']), max_size=2))
    parts = []
    for name in names:
        filename = draw(st.one_of(st.none(), scratch_path.filter(lambda p: "\r" not in p and "\n" not in p)))
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        value = scratch_path.map(lambda p: p.encode("utf-8", "replace")) if name == "path" else st.binary(max_size=64)
        content = draw(value)
        header = f"Content-Disposition: {disposition}\r\n\r\n".encode("utf-8", "replace")
        parts.append(b"--" + boundary.encode() + b"\r\n" + header + content + b"\r\n")
    body = b"".join(parts) + b"--" + boundary.encode() + b"--\r\n"
    if draw(st.integers(0, 2)) == 0:
        body = body[: draw(st.integers(0, len(body) - 1))]
    content_type = draw(
        st.sampled_from(
            [f'multipart/form-data; boundary="{boundary}"'] * 5
            + [f"multipart/form-data; boundary={boundary}", "multipart/form-data; boundary=other"]
            + ["multipart/form-data", "text/plain", ""]
        )
    )
    query = draw(st.one_of(st.none(), st.none(), scratch_path))
    return content_type, body, query


@settings(FUZZ, max_examples=400)
@given(upload=multipart_bodies())
def test_fuzz_upload(fuzzer: Fuzzer, box: Box, upload: tuple[str, bytes, str | None]) -> None:
    content_type, body, query = upload
    params = {"path": query} if query is not None else None
    headers = {"Content-Type": content_type, "X-Access-Token": box.token}
    try:
        r = fuzzer.send("POST", f"{box.base}/upload", content=body, headers=headers, params=params)
    except UnicodeEncodeError:  # the client cannot send it
        return
    assert r.status_code in (200, 400, 404, 413), r.text[:300]


download_paths = st.one_of(
    st.sampled_from(["a" * 300, "x/" * 3000, "%00", "..", "tmp", "dev/zero", "dev/null", "", "tmp/fuzz/%ff", "%2F"]),
    text.map(lambda s: quote(s.encode("utf-8", "surrogatepass"), safe="/")),
)


@settings(FUZZ, max_examples=300)
@given(path=download_paths, query=st.one_of(st.none(), encodable), token=st.sampled_from(["box", "box", "wrong"]))
def test_fuzz_download(fuzzer: Fuzzer, box: Box, path: str, query: str | None, token: str) -> None:
    params = {"path": query} if query is not None else None
    headers = {"X-Access-Token": box.token if token == "box" else "wrong"}
    fuzzer.send("GET", f"{box.base}/download/{path}", headers=headers, params=params)


# ---- afterwards ------------------------------------------------------------------------------------------------


def test_after_the_fuzz_nothing_leaked_and_the_server_is_healthy(fuzzer: Fuzzer, box: Box, server: LocalServer) -> None:
    # Creates that the fuzz sent valid on purpose, with unusual but allowed spellings, show up and go.
    for body in ({"memory_mb": 64.0, "storage_gb": 1, "name": "ignored"}, {"cpu_count": 1, "disk_mb": 16}):
        r = fuzzer.send("POST", "/v1/sandboxes", json=body)
        assert r.status_code == 201, r.text
        data = r.json()["data"]
        assert data["disk_mb"] == body.get("disk_mb", 1024)
        fuzzer.created_by_fuzz(r)
    listed = fuzzer.send("GET", "/v1/sandboxes", params={"status": "running,paused"}).json()["data"]["sandboxes"]
    assert [s["sandbox_id"] for s in listed] == [box.id]  # nothing a failed create made, nothing half-killed
    assert fuzzer.send("GET", "/health").json()["status"] == "ok"
    assert fuzzer.connections == 1, f"{fuzzer.connections} connections for {fuzzer.requests} requests"
    assert fuzzer.requests > 4000
    sandbox = Sandbox.connect(box.id, config=config_for(server))
    try:
        assert sandbox.run_code("6 * 7").text == "42"
    finally:
        sandbox.close()
    assert server.process.poll() is None
