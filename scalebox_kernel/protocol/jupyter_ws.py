"""The two framings of Jupyter's kernel WebSocket (PROTOCOL.md section 11), on messages kept as their JSON bytes.

A message here is its channel, its four JSON parts (header, parent_header, metadata, content) as bytes, and its
binary buffers: exactly what travels in ZMQ frames. Neither framing needs the parts parsed, so a relay passes a
20 MB display through without decoding it:

- `v1.kernel.websocket.jupyter.org`: one binary frame; a little-endian u64 count N, then N u64 offsets (where the
  channel name starts, then where each later piece starts, then the end), then the channel, the four parts and the
  buffers.
- the default framing: one JSON text frame `{header, parent_header, metadata, content, channel}`; a message with
  buffers goes as one binary frame instead: a big-endian u32 count N, N u32 offsets, the JSON and the buffers.
"""

from __future__ import annotations

import itertools
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

V1_SUBPROTOCOL = "v1.kernel.websocket.jupyter.org"
#: The channels a frontend may send on (iopub only flows from the kernel).
CLIENT_CHANNELS = frozenset({"shell", "control", "stdin"})
CHANNELS = frozenset({*CLIENT_CHANNELS, "iopub"})
PART_NAMES = ("header", "parent_header", "metadata", "content")
#: Most pieces (parts plus buffers) one message may have: far beyond any real message, and it bounds the work.
MAX_PIECES = 1024

Bytes = bytes | bytearray | memoryview


class FramingError(ValueError):
    """A WebSocket frame that is not a kernel message in the framing in use."""


@dataclass
class WireMessage:
    """One kernel message: its channel, its four JSON parts as bytes, and its buffers."""

    channel: str
    parts: Sequence[Bytes]
    buffers: Sequence[Bytes] = field(default_factory=list)

    def part(self, index: int) -> dict[str, object]:
        """One JSON part decoded (an empty dict if it is not an object)."""
        value = json.loads(bytes(self.parts[index]))
        return value if isinstance(value, dict) else {}

    @property
    def header(self) -> dict[str, object]:
        return self.part(0)

    @property
    def parent_header(self) -> dict[str, object]:
        return self.part(1)

    @property
    def content(self) -> dict[str, object]:
        return self.part(3)


def _channel(name: str, *, from_client: bool) -> str:
    allowed = CLIENT_CHANNELS if from_client else CHANNELS
    if name not in allowed:
        raise FramingError(f"unknown channel {name!r}; a message goes on one of {', '.join(sorted(allowed))}")
    return name


def encode_v1(message: WireMessage) -> bytes:
    channel = message.channel.encode()
    pieces = [channel, *message.parts, *message.buffers]
    count = len(pieces) + 1
    offsets = [8 * (1 + count)]
    for piece in pieces:
        offsets.append(offsets[-1] + len(piece))
    return b"".join([struct.pack(f"<{count + 1}Q", count, *offsets), *pieces])


def decode_v1(data: Bytes, *, from_client: bool = True) -> WireMessage:
    view = memoryview(data)
    if len(view) < 8:
        raise FramingError("a v1 frame starts with an 8-byte offset count")
    (count,) = struct.unpack_from("<Q", view)
    if not 6 <= count <= MAX_PIECES + 1 or len(view) < 8 * (1 + count):
        raise FramingError(f"a v1 frame with {count} offsets does not hold a channel and four parts")
    offsets = struct.unpack_from(f"<{count}Q", view, 8)
    if offsets[0] != 8 * (1 + count) or offsets[-1] != len(view) or list(offsets) != sorted(offsets):
        raise FramingError("the offsets of a v1 frame do not match its length")
    pieces = [view[start:end] for start, end in itertools.pairwise(offsets)]
    try:
        name = bytes(pieces[0]).decode()
    except UnicodeDecodeError:
        raise FramingError("the channel name of a v1 frame is not UTF-8") from None
    return WireMessage(_channel(name, from_client=from_client), pieces[1:5], pieces[5:])


def encode_json(message: WireMessage) -> str | bytes:
    """A text frame, or (with buffers) a binary frame of the default framing; the parts are spliced in as they
    are (they are JSON already)."""
    fields = [f'"{name}":'.encode() + bytes(part) for name, part in zip(PART_NAMES, message.parts, strict=True)]
    fields.append(b'"channel":' + json.dumps(message.channel).encode())
    document = b"{" + b",".join(fields) + b"}"
    if not message.buffers:
        return document.decode("utf-8", "replace")
    pieces = [document, *message.buffers]
    offsets = [4 * (len(pieces) + 1)]
    for piece in pieces[:-1]:
        offsets.append(offsets[-1] + len(piece))
    return b"".join([struct.pack(f"!{len(pieces) + 1}I", len(pieces), *offsets), *pieces])


def decode_json(data: str | Bytes, *, from_client: bool = True) -> WireMessage:
    buffers: Sequence[Bytes] = []
    if isinstance(data, str):
        document: str | bytes = data
    else:
        view = memoryview(data)
        if len(view) < 8:
            raise FramingError("a binary frame starts with a buffer count and its offsets")
        (count,) = struct.unpack_from("!I", view)
        if not 1 <= count <= MAX_PIECES or len(view) < 4 * (1 + count):
            raise FramingError(f"a binary frame of {count} pieces does not fit its length")
        offsets = [*struct.unpack_from(f"!{count}I", view, 4), len(view)]
        if offsets[0] != 4 * (1 + count) or offsets != sorted(offsets):
            raise FramingError("the offsets of a binary frame do not match its length")
        pieces = [view[start:end] for start, end in itertools.pairwise(offsets)]
        document, buffers = bytes(pieces[0]), pieces[1:]
    try:
        value = json.loads(document)
    except ValueError as exc:
        raise FramingError(f"the message is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise FramingError("a message is a JSON object")
    parts = []
    for name in PART_NAMES:
        part = value.get(name, {})
        if not isinstance(part, dict):
            raise FramingError(f"the message's {name} is not an object")
        parts.append(json.dumps(part).encode())
    return WireMessage(_channel(str(value.get("channel", "")), from_client=from_client), parts, buffers)


def encode(message: WireMessage, subprotocol: str | None) -> str | bytes:
    return encode_v1(message) if subprotocol == V1_SUBPROTOCOL else encode_json(message)


def decode(data: str | Bytes, subprotocol: str | None, *, from_client: bool = True) -> WireMessage:
    if subprotocol == V1_SUBPROTOCOL:
        if isinstance(data, str):
            raise FramingError(f"{V1_SUBPROTOCOL} carries binary frames only")
        return decode_v1(data, from_client=from_client)
    return decode_json(data, from_client=from_client)
