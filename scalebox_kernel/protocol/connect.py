"""The Connect protocol as the Scalebox agent speaks it: codecs, envelopes, end-of-stream frames, errors.

Both sides use this module: scalebox-local to answer, the client to ask. See PROTOCOL.md section 2.2.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

FLAG_DATA = 0x00
FLAG_COMPRESSED = 0x01
FLAG_END_STREAM = 0x02

_PREFIX = struct.Struct(">BI")
PREFIX_SIZE = _PREFIX.size

#: The largest single message either side accepts (a cell's code, a result with a big PNG).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Connect error code -> HTTP status, for unary errors (the standard table).
CODE_TO_STATUS = {
    "canceled": 499,
    "unknown": 500,
    "invalid_argument": 400,
    "deadline_exceeded": 504,
    "not_found": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "resource_exhausted": 429,
    "failed_precondition": 400,
    "aborted": 409,
    "out_of_range": 400,
    "unimplemented": 501,
    "internal": 500,
    "unavailable": 503,
    "data_loss": 500,
    "unauthenticated": 401,
}
# HTTP status -> Connect code, for errors that did not come with a Connect body (a proxy's 502, say).
_STATUS_TO_CODE = {
    400: "invalid_argument",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    408: "deadline_exceeded",
    409: "aborted",
    413: "resource_exhausted",
    429: "unavailable",
    499: "canceled",
    501: "unimplemented",
    502: "unavailable",
    503: "unavailable",
    504: "deadline_exceeded",
}


class ConnectError(Exception):
    """A Connect error: a code from the table above and a message meant for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code if code in CODE_TO_STATUS else "unknown"
        self.message = message

    @property
    def http_status(self) -> int:
        return CODE_TO_STATUS[self.code]

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}

    @classmethod
    def from_dict(cls, body: Any, http_status: int | None = None) -> ConnectError:
        if isinstance(body, dict) and isinstance(body.get("code"), str):
            return cls(body["code"], str(body.get("message", "")))
        code = _STATUS_TO_CODE.get(http_status or 0, "unknown")
        return cls(code, f"HTTP {http_status}" if http_status else "malformed error")

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"ConnectError({self.code!r}, {self.message!r})"


M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class Codec:
    """One of the two Connect codecs: binary protobuf or proto3 JSON."""

    name: str
    unary_content_type: str
    stream_content_type: str

    def encode(self, message: Message) -> bytes:
        if self.name == "proto":
            return message.SerializeToString()
        return json_format.MessageToJson(message, indent=None).encode()

    def decode(self, data: bytes, message_type: type[M]) -> M:
        message = message_type()
        try:
            if self.name == "proto":
                message.ParseFromString(data)
            else:
                json_format.Parse(data.decode("utf-8") if data else "{}", message, ignore_unknown_fields=True)
        except (DecodeError, json_format.ParseError, UnicodeDecodeError, ValueError) as exc:
            raise ConnectError("invalid_argument", f"cannot decode {message_type.__name__}: {exc}") from None
        return message


PROTO = Codec("proto", "application/proto", "application/connect+proto")
JSON = Codec("json", "application/json", "application/connect+json")


def codec_for(content_type: str | None) -> tuple[Codec, bool] | None:
    """The codec and whether the call is streaming, from a request's Content-Type; None if unsupported."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    for codec in (PROTO, JSON):
        if media == codec.unary_content_type:
            return codec, False
        if media == codec.stream_content_type:
            return codec, True
    return None


def envelope(payload: bytes, flags: int = FLAG_DATA) -> bytes:
    return _PREFIX.pack(flags, len(payload)) + payload


def end_stream(error: ConnectError | None = None) -> bytes:
    """The frame that closes every stream; errors on streams travel here, inside HTTP 200."""
    body: dict[str, Any] = {"error": error.to_dict()} if error else {}
    return envelope(json.dumps(body).encode(), FLAG_END_STREAM)


def parse_end_stream(payload: bytes) -> ConnectError | None:
    try:
        body = json.loads(payload or b"{}")
    except ValueError:
        return ConnectError("internal", "malformed end-of-stream frame")
    error = body.get("error") if isinstance(body, dict) else None
    return ConnectError.from_dict(error) if error else None


class EnvelopeReader:
    """Splits a byte stream into (flags, payload) frames; feed it chunks as they arrive."""

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_message_bytes

    def feed(self, chunk: bytes) -> Iterator[tuple[int, bytes]]:
        self._buffer += chunk
        while len(self._buffer) >= PREFIX_SIZE:
            flags, length = _PREFIX.unpack_from(self._buffer)
            if length > self._max:
                raise ConnectError(
                    "resource_exhausted", f"message of {length} bytes is larger than the limit of {self._max} bytes"
                )
            if flags & FLAG_COMPRESSED:
                raise ConnectError("unimplemented", "compressed frames are not supported")
            if flags & ~FLAG_END_STREAM:
                raise ConnectError("invalid_argument", f"unknown envelope flags 0x{flags:02x}")
            if len(self._buffer) < PREFIX_SIZE + length:
                return
            payload = bytes(self._buffer[PREFIX_SIZE : PREFIX_SIZE + length])
            del self._buffer[: PREFIX_SIZE + length]
            yield flags, payload

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame still buffered (non-zero at the end means a truncated stream)."""
        return len(self._buffer)
