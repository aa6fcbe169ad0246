"""Jupyter messages on ZMQ frames: signing, framing and parsing (the kernel's own, on pyzmq alone).

A message on the wire is `[routing ids…, b"<IDS|MSG>", signature, header, parent_header, metadata, content,
buffers…]`, the four JSON parts signed together with the connection file's key (HMAC). The kernel process
imports this instead of jupyter_client's Session, whose package costs a sixth of a second to import; the method
names are the same, so that the kernel's code reads as any kernel's.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import uuid
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

DELIMITER = b"<IDS|MSG>"
#: The message protocol this kernel speaks (its headers and its kernel_info say so).
PROTOCOL_VERSION = "5.3"
#: Signatures remembered to refuse a replayed message (as many as jupyter_client keeps).
DIGEST_HISTORY = 2**16


class InvalidMessage(ValueError):
    """A message that is not signed with the connection's key, is a replay, or is not Jupyter's format."""


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, bytes | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, set | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def pack(value: Any) -> bytes:
    """JSON as jupyter_client writes it (UTF-8, no NaN: a frontend's JSON.parse would refuse one)."""
    try:
        return json.dumps(value, default=_default, ensure_ascii=False, allow_nan=False).encode("utf-8", "replace")
    except ValueError:  # a NaN or infinity: as null, rather than a message no frontend reads
        text = json.dumps(value, default=_default, ensure_ascii=False)
        cleaned = json.loads(text, parse_constant=lambda _name: None)
        return json.dumps(cleaned, ensure_ascii=False).encode("utf-8", "replace")


def _bytes(frame: Any) -> bytes:
    return frame if isinstance(frame, bytes) else bytes(getattr(frame, "bytes", frame))


class Wire:
    """One kernel's message session: its id, its key and how messages are signed, made and read."""

    def __init__(self, key: bytes, signature_scheme: str = "hmac-sha256", username: str | None = None) -> None:
        self.key = key
        self.session_id = uuid.uuid4().hex
        self.username = username or os.environ.get("USER") or "kernel"
        scheme, _, digest = signature_scheme.partition("-")
        if scheme != "hmac" or digest not in hashlib.algorithms_available:
            raise ValueError(f"unsupported signature scheme {signature_scheme!r} (it takes hmac-<hash>)")
        self._digest = digest
        self._auth = hmac.new(key, digestmod=digest) if key else None
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    # ------------------------------------------------------------------------------------------ making

    def sign(self, parts: list[Any]) -> bytes:
        if self._auth is None:
            return b""
        mac = self._auth.copy()
        for part in parts:
            mac.update(part)
        return mac.hexdigest().encode()

    def header(self, msg_type: str) -> dict[str, Any]:
        return {
            "msg_id": uuid.uuid4().hex,
            "msg_type": msg_type,
            "username": self.username,
            "session": self.session_id,
            "date": datetime.now(UTC),
            "version": PROTOCOL_VERSION,
        }

    def msg(
        self,
        msg_type: str,
        content: dict[str, Any] | None = None,
        parent: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A message answering `parent` (a parsed message, or a dict with its `header`)."""
        header = self.header(msg_type)
        return {
            "header": header,
            "msg_id": header["msg_id"],
            "msg_type": msg_type,
            "parent_header": dict(parent.get("header") or {}) if parent else {},
            "metadata": metadata or {},
            "content": content if content is not None else {},
        }

    def send(
        self,
        socket: Any,
        msg_or_type: dict[str, Any] | str,
        content: dict[str, Any] | None = None,
        parent: dict[str, Any] | None = None,
        ident: bytes | list[bytes] | None = None,
        buffers: list[Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Sign and send a message (made here from its type, or made before with `msg`); the message sent."""
        message = msg_or_type if isinstance(msg_or_type, dict) else self.msg(msg_or_type, content, parent, metadata)
        parts = [
            pack(message["header"]),
            pack(message["parent_header"]),
            pack(message["metadata"]),
            pack(message["content"]),
        ]
        self._send(socket, ident, [self.sign(parts), *parts, *(buffers or [])])
        return message

    def send_raw(
        self, socket: Any, parts: list[Any], copy: bool = True, ident: bytes | list[bytes] | None = None
    ) -> None:
        """Send a message made elsewhere (header, parent, metadata, content, buffers…), signed with this key."""
        self._send(socket, ident, [self.sign(parts[:4]), *parts], copy=copy)

    @staticmethod
    def _send(socket: Any, ident: bytes | list[bytes] | None, frames: list[Any], copy: bool = True) -> None:
        idents = [ident] if isinstance(ident, bytes) else list(ident or [])
        result = socket.send_multipart([*idents, DELIMITER, *frames], copy=copy)
        add_done_callback = getattr(result, "add_done_callback", None)  # an asyncio socket's send is a future
        if add_done_callback is not None:
            add_done_callback(_sent)

    # ------------------------------------------------------------------------------------------ reading

    @staticmethod
    def feed_identities(frames: list[Any], copy: bool = True) -> tuple[list[bytes], list[Any]]:
        """Split the routing ids from the message (which then starts with its signature)."""
        for index, frame in enumerate(frames):
            if _bytes(frame) == DELIMITER:
                return [_bytes(f) for f in frames[:index]], list(frames[index + 1 :])
        raise InvalidMessage("no <IDS|MSG> delimiter in the message")

    def deserialize(self, parts: list[Any], content: bool = True, copy: bool = True) -> dict[str, Any]:
        """The message after its routing ids, its signature checked (and never accepted twice); `parts` holds
        its four signed parts as they came."""
        if len(parts) < 5:
            raise InvalidMessage(f"a message has at least 5 parts after its ids, not {len(parts)}")
        frames = [_bytes(part) for part in parts[:5]]
        signature = frames[0]
        if self._auth is not None:
            if not signature:
                raise InvalidMessage("an unsigned message")
            if not hmac.compare_digest(signature, self.sign(frames[1:5])):
                raise InvalidMessage("a message whose signature does not match this kernel's key")
            if signature in self._seen:
                raise InvalidMessage("a replayed message (its signature was seen before)")
            self._seen[signature] = None
            if len(self._seen) > DIGEST_HISTORY:
                self._seen.popitem(last=False)
        try:
            header = json.loads(frames[1])
            parent = json.loads(frames[2])
            metadata = json.loads(frames[3])
            body = json.loads(frames[4]) if content else frames[4]
        except (ValueError, RecursionError) as exc:
            raise InvalidMessage(f"a message part that is not JSON: {exc}") from None
        if not isinstance(header, dict) or not isinstance(parent, dict) or not isinstance(metadata, dict):
            raise InvalidMessage("a message whose header, parent or metadata is not an object")
        if content and not isinstance(body, dict):
            raise InvalidMessage("a message whose content is not an object")
        return {
            "header": header,
            "msg_id": header.get("msg_id"),
            "msg_type": header.get("msg_type"),
            "parent_header": parent,
            "metadata": metadata,
            "content": body,
            "buffers": [memoryview(_bytes(part)) for part in parts[5:]],
            "parts": frames[1:5],  # as signed: a relay passes them on unchanged
        }


def _sent(future: Any) -> None:
    if not future.cancelled() and future.exception() is not None:
        import logging

        logging.getLogger(__name__).warning("a message was not sent: %s", future.exception())
