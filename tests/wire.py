"""Raw Connect calls to a sandbox agent, for protocol-level tests of scalebox-local (both codecs).

This is a test helper, not a client: it sends exactly what the official SDKs send and returns what came back,
frame by frame, so tests can assert on the wire itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
from google.protobuf.message import Message

from scalebox_kernel.protocol import connect

SDK_HEADERS = {"Connect-Protocol-Version": "1", "Authorization": "Bearer root"}


@dataclass
class StreamReply:
    """What a server-streaming call returned: HTTP status, content type, decoded messages, end-stream error."""

    status: int
    content_type: str
    messages: list[Any] = field(default_factory=list)
    error: connect.ConnectError | None = None
    ended: bool = False


def agent_base(server_url: str, sandbox_domain: str) -> str:
    scheme = server_url.split("://", 1)[0]
    return sandbox_domain if "://" in sandbox_domain else f"{scheme}://{sandbox_domain}"


def unary(
    http: httpx.Client,
    base: str,
    method: str,
    request: Message,
    response_type: type[Message],
    token: str | None,
    codec: connect.Codec = connect.PROTO,
) -> tuple[int, Any]:
    """POST one unary RPC; returns (status, decoded message) or (status, error dict)."""
    headers = dict(SDK_HEADERS, **{"Content-Type": codec.unary_content_type})
    if token is not None:
        headers["X-Access-Token"] = token
    r = http.post(f"{base}/{method}", content=codec.encode(request), headers=headers)
    if r.status_code == 200:
        assert r.headers["content-type"] == codec.unary_content_type
        return 200, codec.decode(r.content, response_type)
    return r.status_code, r.json()


def stream(
    http: httpx.Client,
    base: str,
    method: str,
    request: Message | bytes,
    response_type: type[Message],
    token: str | None,
    codec: connect.Codec = connect.PROTO,
    timeout: float = 60,
) -> StreamReply:
    """POST one server-streaming RPC (enveloped body) and read every frame until the end-of-stream frame."""
    headers = dict(SDK_HEADERS, **{"Content-Type": codec.stream_content_type})
    if token is not None:
        headers["X-Access-Token"] = token
    body = request if isinstance(request, bytes) else connect.envelope(codec.encode(request))
    with http.stream("POST", f"{base}/{method}", content=body, headers=headers, timeout=timeout) as r:
        reply = StreamReply(status=r.status_code, content_type=r.headers.get("content-type", ""))
        reader = connect.EnvelopeReader()
        for chunk in r.iter_raw():
            for flags, payload in reader.feed(chunk):
                if flags & connect.FLAG_END_STREAM:
                    reply.error = connect.parse_end_stream(payload)
                    reply.ended = True
                else:
                    reply.messages.append(codec.decode(payload, response_type))
    return reply
