"""A kernel's iopub, read without loss: one task per kernel drains the socket all the time and routes each message
to the cell (or barrier) whose request it answers.

ZMQ's PUB side drops messages when a subscriber's pipe is full, so the subscriber socket has no high-water mark
(RCVHWM 0) and this reader never waits for a client: the cell's `StreamBuffer` takes what it is given, spilling to
disk past its limit. Frames are received without copying; the signature is checked over memoryviews; and a big
stream message's text is decoded slice by slice (`TEXT_SLICE` bytes each) instead of parsing the whole frame, so
a 300 MB print costs about its own size once, and reaches the client as frames it accepts.

Kernels started through our launcher (python and bash: ipykernel) number the iopub messages they really send, per
process, in the metadata (`SEQUENCE_KEY`); `LossTracker` counts the numbers that never arrived. Jupyter's own msg_id
counters cannot serve: ipykernel also spends them on messages it builds and never sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

log = logging.getLogger(__name__)

DELIMITER = b"<IDS|MSG>"
#: Metadata key of the per-process number that the launcher puts on every iopub message it sends.
SEQUENCE_KEY = "scalebox_iopub"
#: Most bytes of a stream message's JSON text turned into one piece of output (so at most 1 MiB of text).
TEXT_SLICE = 1024 * 1024

#: Largest message content decoded whole (a display, a result, an error); bigger ones are dropped with a notice.
MAX_DECODED = 64 * 1024 * 1024
#: Largest message ZMQ takes from a kernel at all (a bigger one drops the connection, which is then reported
#: as lost output): what a cell can cost the server in memory, once.
MAX_MESSAGE = 512 * 1024 * 1024

#: Messages handled in a row before the reader lets the streams send.
BATCH = 64
#: (msg_type, content) of one message for one route; a big stream message arrives as several `stream` pieces.
Handler = Callable[[str, dict[str, Any]], None]

_TEXT_KEY = re.compile(rb'"text"\s*:\s*"')
_HIGH_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}")


class MalformedMessage(ValueError):
    """A multipart message that is not a signed Jupyter message."""


@dataclass
class IopubMessage:
    """One iopub message as the reader needs it: who it answers, what it is, and its number if it has one."""

    msg_type: str
    parent_id: str
    content: dict[str, Any]
    sequence: tuple[int, int] | None = None  # (pid, number) from the launcher
    pieces: Iterator[str] | None = None  # a big stream message's text, slice by slice (content["text"] is "")

    def parts(self) -> Iterator[dict[str, Any]]:
        """The content, or for a big stream message one content per piece of its text."""
        if self.pieces is None:
            yield self.content
            return
        for piece in self.pieces:
            if piece:
                yield {**self.content, "text": piece}


def _json(frame: zmq.Frame) -> Any:
    return json.loads(frame.bytes.decode("utf-8", "replace"))


def parse(
    frames: list[zmq.Frame], auth: hmac.HMAC | None, wanted: Callable[[str, str], bool] | None = None
) -> IopubMessage:
    """A received multipart message (`copy=False` frames) as an IopubMessage; MalformedMessage if it is not one.
    Its content is decoded only if `wanted(msg_type, parent_id)` (another client's output costs no parsing)."""
    index = next((i for i, f in enumerate(frames) if len(f) == len(DELIMITER) and f.bytes == DELIMITER), None)
    if index is None:
        raise MalformedMessage("no <IDS|MSG> delimiter")
    parts = frames[index + 1 : index + 6]
    if len(parts) < 5:
        raise MalformedMessage(f"{len(parts)} message parts after the delimiter, not 5")
    signature, header_frame, parent_frame, metadata_frame, content_frame = parts
    try:
        header, parent, metadata = _json(header_frame), _json(parent_frame), _json(metadata_frame)
    except ValueError as exc:
        raise MalformedMessage(f"undecodable header: {exc}") from None
    msg_type = str(header.get("msg_type", "")) if isinstance(header, dict) else ""
    parent_id = str(parent.get("msg_id", "")) if isinstance(parent, dict) else ""
    message = IopubMessage(msg_type, parent_id, {}, sequence=_sequence(metadata))
    if wanted is not None and not wanted(msg_type, parent_id):
        return message  # nothing is done with it (a Jupyter endpoint client's output): not worth an HMAC
    if auth is not None:
        check = auth.copy()
        for frame in (header_frame, parent_frame, metadata_frame, content_frame):
            check.update(frame.buffer)
        if not hmac.compare_digest(check.hexdigest().encode(), signature.bytes):
            raise MalformedMessage("invalid signature")
    if msg_type == "stream" and len(content_frame) > TEXT_SLICE:
        split = _split_stream(content_frame.buffer)
        if split is not None:
            message.content, message.pieces = split
            return message
    if len(content_frame) > MAX_DECODED:  # decoding it would cost the server several times its size
        size = len(content_frame) / 1024 / 1024
        notice = (
            f"scalebox-local: a {msg_type or 'kernel'} message of {size:.0f} MiB was too big to relay "
            f"(at most {MAX_DECODED // 1024 // 1024} MiB) and was dropped.\n"
        )
        message.msg_type, message.content = "stream", {"name": "stderr", "text": notice}
        return message
    try:
        content = _json(content_frame)
    except ValueError as exc:
        raise MalformedMessage(f"undecodable content: {exc}") from None
    message.content = content if isinstance(content, dict) else {}
    return message


def _sequence(metadata: Any) -> tuple[int, int] | None:
    value = metadata.get(SEQUENCE_KEY) if isinstance(metadata, dict) else None
    if isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value):
        return value[0], value[1]
    return None


def _split_stream(content: memoryview) -> tuple[dict[str, Any], Iterator[str]] | None:
    """(content without its text, the text's pieces) for a stream message shaped as ipykernel writes it
    (`{"name": ..., "text": "..."}`); None for any other shape (then the whole frame is parsed)."""
    head = bytes(content[:4096])
    match = _TEXT_KEY.search(head)
    if match is None:
        return None
    try:
        rest = json.loads(head[: match.end()] + b'"}')
    except ValueError:
        return None
    if not isinstance(rest, dict) or rest.get("text") != "" or rest.get("name") not in ("stdout", "stderr"):
        return None
    return rest, _text_pieces(content, match.end())


def _text_pieces(content: memoryview, start: int) -> Iterator[str]:
    """The JSON string that starts at `start`, decoded in slices cut only between whole characters and escapes."""
    position, end, emitted = start, len(content), 0
    while position < end:
        chunk = bytes(content[position : position + TEXT_SLICE])
        close = _closing_quote(chunk)
        cut = close if close >= 0 else _safe_cut(chunk)
        while 0 < cut < len(chunk) and chunk[cut] & 0xC0 == 0x80:  # never split a UTF-8 character
            cut -= 1
        if cut == len(chunk) and position + cut < end and content[position + cut] & 0xC0 == 0x80:
            cut -= 1
            while cut > 0 and chunk[cut] & 0xC0 == 0x80:
                cut -= 1
        if cut <= 0 and close < 0:
            break
        piece = chunk[:cut]
        text = json.loads(b'"' + piece + b'"') if b"\\" in piece else piece.decode("utf-8", "replace")
        emitted += len(text)
        yield text
        if close >= 0:
            return
        position += cut
    yield from _rest_of_text(content, emitted)  # not a string we can slice (no closing quote, say)


def _closing_quote(chunk: bytes) -> int:
    """Index of the first unescaped `"` in a chunk that starts between escapes; -1 if there is none."""
    index = chunk.find(b'"')
    while index >= 0:
        run = 0
        while run < index and chunk[index - run - 1] == 0x5C:
            run += 1
        if run % 2 == 0:
            return index
        index = chunk.find(b'"', index + 1)
    return -1


def _safe_cut(chunk: bytes) -> int:
    """Where to end a slice of a string's body so that no escape (or surrogate pair of escapes) is split."""
    size = len(chunk)
    last = chunk.rfind(b"\\", max(0, size - 12))
    if last < 0:
        return size
    first = last
    while first > 0 and chunk[first - 1] == 0x5C:
        first -= 1
    if (last - first) % 2 == 1:  # an even run: the last backslash ends an escaped backslash
        return size
    unicode = last + 1 < size and chunk[last + 1] == 0x75  # \uXXXX
    if last + (6 if unicode else 2) <= size and not (unicode and _HIGH_SURROGATE.match(chunk, last)):
        return size
    if last >= 6 and _HIGH_SURROGATE.match(chunk, last - 6) and _escape_starts(chunk, last - 6):
        return last - 6  # keep a surrogate pair together
    return last


def _escape_starts(chunk: bytes, index: int) -> bool:
    run = 0
    while run < index and chunk[index - run - 1] == 0x5C:
        run += 1
    return run % 2 == 0


def _rest_of_text(content: memoryview, emitted: int) -> Iterator[str]:
    """The text after its first `emitted` characters, the slow way (parsing the whole frame)."""
    log.warning("a stream message could not be decoded in slices; parsing it whole")
    text = str(json.loads(bytes(content).decode("utf-8", "replace")).get("text", ""))
    for offset in range(emitted, len(text), TEXT_SLICE):
        yield text[offset : offset + TEXT_SLICE]


class LossTracker:
    """Which numbered iopub messages have not arrived: per process, the next number expected and those seen
    beyond it (messages from several threads may arrive slightly out of order)."""

    #: Numbers kept waiting per process, and processes followed: the numbers come from the sandbox, so what they
    #: may cost the server is bounded (past it, the gap is counted as lost at once).
    MAX_AHEAD = 10_000
    MAX_PROCESSES = 64

    def __init__(self) -> None:
        self._next: dict[int, int] = {}
        self._ahead: dict[int, set[int]] = {}
        self._lost = 0

    def see(self, pid: int, number: int) -> None:
        expected = self._next.get(pid)
        if expected is None:  # the first one seen from this process: what came before is not ours to count
            if len(self._next) >= self.MAX_PROCESSES:
                oldest = next(iter(self._next))
                self._lost += self._missing_of(oldest)
                del self._next[oldest], self._ahead[oldest]
            self._next[pid], self._ahead[pid] = number + 1, set()
            return
        ahead = self._ahead[pid]
        if number == expected:
            expected += 1
            while expected in ahead:
                ahead.remove(expected)
                expected += 1
            self._next[pid] = expected
        elif number > expected:
            ahead.add(number)
            if len(ahead) > self.MAX_AHEAD:
                self._lost += self._missing_of(pid)
                self._next[pid] = max(ahead) + 1
                ahead.clear()

    def _missing_of(self, pid: int) -> int:
        ahead = self._ahead[pid]
        return max(ahead) + 1 - self._next[pid] - len(ahead) if ahead else 0

    def missing(self) -> int:
        """How many numbers below the highest seen have not arrived (yet), and those already given up on."""
        return self._lost + sum(self._missing_of(pid) for pid in self._ahead)

    def settle(self) -> int:
        """Count what is missing as lost, and stop waiting for it."""
        lost = self.missing()
        self._lost = 0
        for pid, ahead in self._ahead.items():
            if ahead:
                self._next[pid] = max(ahead) + 1
                ahead.clear()
        return lost


class IopubReader:
    """Drains one kernel's iopub socket in a task of its own and hands each message to the route of its parent."""

    def __init__(self, socket: zmq.asyncio.Socket, auth: hmac.HMAC | None, name: str) -> None:
        self._socket = socket
        self._auth = auth
        self._name = name
        self._routes: dict[str, Handler] = {}
        self.losses = LossTracker()
        self._task: asyncio.Task[None] | None = None
        self.execution_state = "starting"  # the kernel's last status, whoever's request it was about
        self.last_activity = time.time()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"scalebox {self._name} iopub")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._routes.clear()

    def route(self, parent_id: str, handler: Handler) -> None:
        """Send the messages that answer request `parent_id` to `handler` (called in the reader's task)."""
        self._routes[parent_id] = handler

    def unroute(self, *parent_ids: str) -> None:
        for parent_id in parent_ids:
            self._routes.pop(parent_id, None)

    async def _run(self) -> None:
        while not self._socket.closed:
            try:
                await self._handle(await self._socket.recv_multipart(copy=False))
                for _ in range(BATCH):  # what is there already, without a wakeup of the loop for each message
                    try:
                        frames = await self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    await self._handle(frames)
                    del frames
            except zmq.ZMQError as exc:
                if not self._socket.closed:
                    log.warning("reading the iopub of %s failed: %s", self._name, exc)
                    await asyncio.sleep(0.1)
            await asyncio.sleep(0)

    def _wanted(self, msg_type: str, parent_id: str) -> bool:
        return msg_type == "status" or parent_id in self._routes

    async def _handle(self, frames: list[zmq.Frame]) -> None:
        """One message (its frames are freed when this returns, before the next one is read)."""
        try:
            message = parse(frames, self._auth, self._wanted)
        except MalformedMessage as exc:
            log.warning("dropped an iopub message of %s: %s", self._name, exc)
            return
        if message.sequence is not None:
            self.losses.see(*message.sequence)
        self.last_activity = time.time()
        if message.msg_type == "status":
            state = message.content.get("execution_state")
            if isinstance(state, str) and state in ("busy", "idle", "starting"):
                self.execution_state = state
        handler = self._routes.get(message.parent_id)
        if handler is None:
            return
        try:
            for count, content in enumerate(message.parts()):
                handler(message.msg_type, content)
                if count and message.pieces is not None:
                    await asyncio.sleep(0)  # a big message: let the streams send between its pieces
        except Exception:
            log.exception("handling an iopub message of %s failed", self._name)
