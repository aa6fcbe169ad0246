"""A kernel's own stdout and stderr (start-up messages, crashes, what ipykernel echoes of fd-level output), kept
bounded: a pipe the server drains into a log file of at most `limit` bytes, beside the sandbox and out of its
reach; past the limit the bytes are counted and dropped, so no kernel can fill the server's disk through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

LIMIT = 1024 * 1024
TAIL = 4096
READ_SIZE = 64 * 1024


class KernelLog:
    """One kernel process's output log; `writer` is the fd to give the kernel as stdout and stderr."""

    def __init__(self, path: Path, limit: int = LIMIT) -> None:
        self.path = path
        self.limit = limit
        self._read_fd, self.writer = os.pipe()
        os.set_blocking(self._read_fd, False)
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 (closed in close)
        self._written = self._file.tell()
        self._dropped = 0
        self._tail = b""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._read_fd, self._readable)

    def started(self) -> None:
        """The kernel has its copy of the writer: drop ours, so the pipe ends when the kernel's side does."""
        if self.writer >= 0:
            os.close(self.writer)
            self.writer = -1

    def _readable(self) -> None:
        try:
            chunk = os.read(self._read_fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._loop.remove_reader(self._read_fd)
            return
        self._tail = (self._tail + chunk)[-TAIL:]
        room = self.limit - self._written
        if room > 0:
            self._file.write(chunk[:room])
            self._written += min(room, len(chunk))
        self._dropped += max(0, len(chunk) - max(room, 0))

    def tail(self, lines: int = 5) -> str:
        """The last lines the kernel wrote, printable only (they come from the sandbox)."""
        text = self._tail.decode(errors="replace")
        kept = [line.strip() for line in text.strip().splitlines()[-lines:] if line.strip()]
        return "".join(c if c.isprintable() else "?" for c in " / ".join(kept))

    def close(self) -> None:
        """Take what is still in the pipe (a dying kernel's last words), then stop."""
        self.started()
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._read_fd)
        for _ in range(64):
            before = self._written + self._dropped
            self._readable()
            if self._written + self._dropped == before:
                break
        with contextlib.suppress(OSError):
            os.close(self._read_fd)
        if self._dropped:
            with contextlib.suppress(OSError):
                self._file.write(f"\n[scalebox-local: {self._dropped} more bytes were dropped]\n".encode())
        self._file.close()
