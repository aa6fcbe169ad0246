"""Bounded buffers between what produces a stream's messages (a cell, a command) and the client that reads them.

A client that reads slower than a cell prints must not make the server hold the difference in memory. A
`StreamBuffer` keeps at most `limit` bytes of messages in memory; past that it either spills them, in order, to an
unnamed file in a private directory (for producers that must never wait: a kernel's iopub has to be drained or
ZMQ drops), or it tells the producer to wait (`room()`: a command's pipe, which then blocks the command's writes).
Everything is freed when the stream ends or its client goes away (`discard`).
"""

from __future__ import annotations

import asyncio
import os
import struct
import tempfile
from collections import deque
from pathlib import Path
from typing import IO, Generic, TypeVar

from google.protobuf.message import Message

from ..protocol.connect import ConnectError

M = TypeVar("M", bound=Message)

MiB = 1024 * 1024
_LENGTH = struct.Struct(">I")


class StreamBuffer(Generic[M]):
    """A FIFO of one stream's messages: `put` by the producer, `get` by the stream, `close` at the end."""

    def __init__(
        self, message_type: type[M], limit: int, spill_dir: Path | None = None, spill_limit: int = 1024 * MiB
    ) -> None:
        self._type = message_type
        self._limit = max(1, limit)
        self._spill_dir = spill_dir
        self._spill_limit = spill_limit
        self.dropped = 0  # messages refused because the spill file was full (the client read nothing for long)
        self._memory: deque[tuple[M, int]] = deque()
        self._memory_bytes = 0
        self._file: IO[bytes] | None = None  # the spill file, once needed (unnamed: gone when closed)
        self._spilled = 0  # messages in the file
        self._read_at = self._write_at = 0
        self._closed = False
        self._error: ConnectError | None = None
        self._discarded = False
        self._changed = asyncio.Event()  # a message or the end arrived
        self._room = asyncio.Event()  # memory dropped under the limit
        self._room.set()

    @property
    def has_room(self) -> bool:
        return self._discarded or self._memory_bytes < self._limit

    def put(self, message: M, *, always: bool = False) -> None:
        """Add a message; never waits. Past the limit it goes to the spill file, if this buffer has one; past the
        spill's own limit it is dropped and counted (`always`: a short notice that must get through)."""
        if self._closed or self._discarded:
            return
        if not always and self._write_at - self._read_at >= self._spill_limit:
            self.dropped += 1
            return
        size = message.ByteSize()
        fits = self._memory_bytes + size <= self._limit or not self._memory
        if self._spill_dir is None or (self._spilled == 0 and fits):
            self._memory.append((message, size))
            self._memory_bytes += size
            if self._memory_bytes >= self._limit:
                self._room.clear()
        else:
            try:
                self._spill(message.SerializeToString())
            except OSError:  # the disk that holds the spill is full: this one cannot wait anywhere
                self.dropped += 1
                return
        self._changed.set()

    def close(self, error: ConnectError | None = None) -> None:
        """No more messages: `get` returns None (or raises `error`) once the ones before are read."""
        if not self._closed:
            self._closed, self._error = True, error
            self._changed.set()

    def discard(self) -> None:
        """The stream is gone: drop what is held, remove the spill file, and ignore further messages."""
        self._discarded = self._closed = True
        self._memory.clear()
        self._memory_bytes = 0
        self._close_file()
        self._room.set()
        self._changed.set()

    async def room(self) -> None:
        """Wait until memory is under the limit again (or the stream is gone)."""
        while not self.has_room:
            self._room.clear()
            await self._room.wait()

    def peek(self) -> M | None:
        """The next message if it is in memory already (else None), without taking it."""
        return self._memory[0][0] if self._memory else None

    def take(self) -> None:
        """Drop the message `peek` returned (the caller took it)."""
        _, size = self._memory.popleft()
        self._memory_bytes -= size
        if self._memory_bytes < self._limit:
            self._room.set()

    async def get(self) -> M | None:
        """The next message, waiting for it; None at the end. Safe to cancel: nothing is taken until it returns."""
        while True:
            if self._memory:
                message = self._memory[0][0]
                self.take()
                return message
            if self._spilled:
                return self._unspill()
            if self._closed:
                if self._error is not None and not self._discarded:
                    error, self._error = self._error, None
                    raise error
                return None
            self._changed.clear()
            await self._changed.wait()

    # ------------------------------------------------------------------ the spill file

    def _spill(self, data: bytes) -> None:
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self._spill_dir)  # noqa: SIM115 (O_TMPFILE: no name, mode 0600)
        fd = self._file.fileno()
        header = _LENGTH.pack(len(data))
        os.pwrite(fd, header, self._write_at)
        os.pwrite(fd, data, self._write_at + len(header))
        self._write_at += len(header) + len(data)
        self._spilled += 1

    def _unspill(self) -> M:
        assert self._file is not None
        fd = self._file.fileno()
        (length,) = _LENGTH.unpack(os.pread(fd, _LENGTH.size, self._read_at))
        data = os.pread(fd, length, self._read_at + _LENGTH.size)
        self._read_at += _LENGTH.size + length
        self._spilled -= 1
        if not self._spilled:  # drained: give the disk space back
            os.ftruncate(fd, 0)
            self._read_at = self._write_at = 0
        return self._type.FromString(data)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._spilled = self._read_at = self._write_at = 0
