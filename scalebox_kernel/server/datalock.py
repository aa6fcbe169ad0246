"""One scalebox-local per data dir: an exclusive lock on `<data dir>/scalebox-local.lock`, held for the server's
life, with the holder's pid and URL in it (no secret) for the one that finds it taken."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

LOCK_NAME = "scalebox-local.lock"
#: Seconds `--replace` waits for the running server to stop and let go of the lock.
REPLACE_WAIT = 30.0


class DataDirBusy(Exception):
    """Another scalebox-local holds the data dir."""


class DataDirLock:
    def __init__(self, data: Path) -> None:
        self.path = data / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, replace: bool = False) -> None:
        """Take the lock; DataDirBusy (saying who holds it) if another server has it, unless `replace`, which
        stops that server (SIGTERM) and waits for it to let go."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            if not self._try(fd):
                holder = self.holder()
                if not replace:
                    raise DataDirBusy(
                        f"scalebox-local is already serving the data dir {self.path.parent}{_described(holder)}; "
                        "use that one (jupyter scalebox stop ends it), or pass --replace to stop it and take over"
                    )
                self._replace(fd, holder)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._write({"pid": os.getpid()})  # at once: a crashed predecessor's pid must not stay named

    @staticmethod
    def _try(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _replace(self, fd: int, holder: dict[str, Any]) -> None:
        pid = holder.get("pid")
        if isinstance(pid, int) and pid > 1 and pid != os.getpid() and _is_scalebox_local(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + REPLACE_WAIT
        while not self._try(fd):
            if time.monotonic() > deadline:
                raise DataDirBusy(
                    f"the scalebox-local serving {self.path.parent}{_described(holder)} did not stop within "
                    f"{REPLACE_WAIT:g} s of SIGTERM"
                )
            time.sleep(0.1)

    def holder(self) -> dict[str, Any]:
        """What the holder wrote (pid, url), or {} if it wrote nothing yet (it is starting) or it is unreadable."""
        try:
            found = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    def announce(self, url: str) -> None:
        """Write this server's pid and URL into the lock file, for a second server to name."""
        self._write({"pid": os.getpid(), "url": url})

    def _write(self, holder: dict[str, Any]) -> None:
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(holder).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def _is_scalebox_local(pid: int) -> bool:
    """Whether `pid` is still a scalebox-local (and not a process that reused a dead one's pid)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return sys.platform != "linux"  # no /proc to ask: trust the lock file
    return any(b"scalebox" in part for part in argv) and any(b"serve" in part for part in argv)


def _described(holder: dict[str, Any]) -> str:
    url, pid = holder.get("url"), holder.get("pid")
    if url and pid:
        return f" at {url} (pid {pid})"
    if pid:
        return f" (pid {pid}, still starting)"
    return " (it is still starting)"
