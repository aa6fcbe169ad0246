"""Helpers for the agent tests: one sandbox on a test server, and raw Connect calls with arrival times.

`wire.py` reads whole streams; these tests also need to see when each frame arrived, to send extra headers,
and to walk away from a stream half way (which is how clients cancel).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import wire
from google.protobuf.message import Message

from scalebox_kernel.protocol import connect, pb

CODECS = [connect.PROTO, connect.JSON]
CODEC_IDS = ["proto", "json"]
EXECUTE = "sandboxagent.ExecutionService/Execute"
START = "sandboxagent.Process/Start"


class Box:
    """One sandbox of a test server: its id, access token and agent base URL."""

    def __init__(self, server: Any, http: httpx.Client, **fields: Any) -> None:
        r = http.post("/v1/sandboxes", json={"template": "code-interpreter", **fields})
        assert r.status_code == 201, r.text
        data = r.json()["data"]
        self.http = http
        self.id: str = data["sandbox_id"]
        self.token: str = data["envd_access_token"]
        self.base = wire.agent_base(server.url, data["sandbox_domain"])

    def kill(self) -> None:
        self.http.delete(f"/v1/sandboxes/{self.id}")

    def unary(self, method: str, request: Message, response_type: type[Message], codec: connect.Codec = connect.PROTO):
        """(status, message) on success, (status, error dict) otherwise."""
        return wire.unary(self.http, self.base, method, request, response_type, self.token, codec)

    def ok(self, method: str, request: Message, response_type: type[Message], codec: connect.Codec = connect.PROTO):
        status, body = self.unary(method, request, response_type, codec)
        assert status == 200, body
        return body

    def stream(
        self, method: str, request: Message, response_type: type[Message], codec: connect.Codec = connect.PROTO
    ) -> wire.StreamReply:
        return wire.stream(self.http, self.base, method, request, response_type, self.token, codec)

    @contextlib.contextmanager
    def open(
        self,
        method: str,
        request: Message,
        response_type: type[Message],
        codec: connect.Codec = connect.PROTO,
        **headers: str,
    ) -> Iterator[Frames]:
        """A streaming call left open: iterate its frames as they come; leaving the block drops the connection."""
        all_headers = dict(wire.SDK_HEADERS, **{"Content-Type": codec.stream_content_type}, **headers)
        all_headers["X-Access-Token"] = self.token
        body = connect.envelope(codec.encode(request))
        # A client of its own: closing the stream must really close the socket, as a disconnecting SDK does.
        with (
            httpx.Client(timeout=httpx.Timeout(60)) as client,
            client.stream("POST", f"{self.base}/{method}", content=body, headers=all_headers) as r,
        ):
            assert r.status_code == 200 and r.headers["content-type"] == codec.stream_content_type
            yield Frames(r, codec, response_type)

    def execute(self, code: str, codec: connect.Codec = connect.PROTO, **fields: Any) -> wire.StreamReply:
        reply = self.stream(EXECUTE, pb.ExecuteRequest(code=code, **fields), pb.ExecuteResponse, codec)
        assert reply.status == 200 and reply.ended
        return reply

    def run(self, command: str, **fields: Any) -> wire.StreamReply:
        """`bash -l -c command`, as both SDKs send commands."""
        config = pb.ProcessConfig(cmd="/bin/bash", args=["-l", "-c", command], **fields)
        reply = self.stream(START, pb.StartRequest(process=config), pb.StartResponse)
        assert reply.status == 200 and reply.ended
        return reply


@dataclass
class Frame:
    at: float  # seconds since the stream was opened
    message: Any


class Frames:
    """The data frames of an open stream, each with its arrival time; `error`/`ended` once the end came."""

    def __init__(self, response: httpx.Response, codec: connect.Codec, response_type: type[Message]) -> None:
        self._chunks = response.iter_raw()
        self._reader = connect.EnvelopeReader()
        self._codec = codec
        self._type = response_type
        self._pending: list[Frame] = []
        self._opened = time.monotonic()
        self.error: connect.ConnectError | None = None
        self.ended = False

    def __iter__(self) -> Iterator[Frame]:
        while True:
            while self._pending:
                yield self._pending.pop(0)
            if self.ended:
                return
            try:
                chunk = next(self._chunks)
            except StopIteration:
                return
            now = time.monotonic() - self._opened
            for flags, payload in self._reader.feed(chunk):
                if flags & connect.FLAG_END_STREAM:
                    self.error = connect.parse_end_stream(payload)
                    self.ended = True
                else:
                    self._pending.append(Frame(now, self._codec.decode(payload, self._type)))

    def next(self) -> Frame:
        for frame in self:
            return frame
        raise AssertionError(f"the stream ended early (error: {self.error!r})")


def stdout_of(reply: wire.StreamReply) -> str:
    return "".join(m.stdout.content for m in reply.messages if m.HasField("stdout"))


def stderr_of(reply: wire.StreamReply) -> str:
    return "".join(m.stderr.content for m in reply.messages if m.HasField("stderr"))


def results_of(reply: wire.StreamReply) -> list[pb.Result]:
    return [m.result for m in reply.messages if m.HasField("result")]


def process_output(reply: wire.StreamReply, kind: str = "stdout") -> bytes:
    return b"".join(
        getattr(m.event.data, kind) for m in reply.messages if m.event.HasField("data") and m.event.data.HasField(kind)
    )


def end_of(reply: wire.StreamReply) -> pb.ProcessEvent.EndEvent:
    ends = [m.event.end for m in reply.messages if m.event.HasField("end")]
    assert len(ends) == 1, reply.messages
    return ends[0]


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")
