"""Directory watching for the Filesystem service (WatchDir streams and polled watchers), by comparing snapshots.

Polling every 0.2 s needs no dependency and works the same on every platform; renames show as remove + create.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import stat
from collections.abc import AsyncIterator
from pathlib import Path

from ...protocol import pb
from ...protocol.connect import ConnectError
from .filesystem import missing
from .paths import SandboxPaths

POLL_INTERVAL = 0.2
#: Events a polled watcher keeps between two GetWatcherEvents calls; older ones are dropped.
MAX_PENDING_EVENTS = 10_000

Snapshot = dict[str, tuple[int, int, int]]  # relative name -> (mtime_ns, size, mode)


def snapshot(directory: Path, recursive: bool) -> Snapshot:
    """What is in a directory now (one level, or the whole tree without following symlinks)."""
    found: Snapshot = {}
    pending = [(directory, "")]
    while pending:
        current, prefix = pending.pop()
        try:
            children = list(os.scandir(current))
        except OSError:
            continue
        for child in children:
            try:
                info = child.stat(follow_symlinks=False)
            except OSError:
                continue
            name = prefix + child.name
            found[name] = (info.st_mtime_ns, info.st_size, info.st_mode)
            if recursive and stat.S_ISDIR(info.st_mode):
                pending.append((Path(child.path), name + "/"))
    return found


def diff(before: Snapshot, after: Snapshot) -> list[pb.FilesystemEvent]:
    """The events that turn one snapshot into the next, in name order."""
    events: list[pb.FilesystemEvent] = []
    for name in sorted(before.keys() | after.keys()):
        old, new = before.get(name), after.get(name)
        if old is None:
            events.append(pb.FilesystemEvent(name=name, type=pb.EVENT_TYPE_CREATE))
        elif new is None:
            events.append(pb.FilesystemEvent(name=name, type=pb.EVENT_TYPE_REMOVE))
        elif old[:2] != new[:2] and not stat.S_ISDIR(new[2]):
            events.append(pb.FilesystemEvent(name=name, type=pb.EVENT_TYPE_WRITE))
        elif stat.S_IMODE(old[2]) != stat.S_IMODE(new[2]):
            events.append(pb.FilesystemEvent(name=name, type=pb.EVENT_TYPE_CHMOD))
    return events


class _Watcher:
    """A polled watcher: a task that collects events until the client fetches them."""

    def __init__(self, directory: Path, recursive: bool) -> None:
        self.directory = directory
        self.recursive = recursive
        self.events: list[pb.FilesystemEvent] = []
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        before = await asyncio.to_thread(snapshot, self.directory, self.recursive)
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            after = await asyncio.to_thread(snapshot, self.directory, self.recursive)
            self.events.extend(diff(before, after))
            del self.events[:-MAX_PENDING_EVENTS]
            before = after


class Watchers:
    """WatchDir, CreateWatcher, GetWatcherEvents and RemoveWatcher for one sandbox."""

    def __init__(self, paths: SandboxPaths) -> None:
        self.paths = paths
        self._watchers: dict[str, _Watcher] = {}

    def _directory(self, path: str) -> tuple[str, Path]:
        sandbox_path = self.paths.normalize(path)
        host = self.paths.to_host(sandbox_path)
        if not os.path.lexists(host):
            raise missing(sandbox_path, "watch")
        if not host.is_dir():
            raise ConnectError("invalid_argument", f"watch {sandbox_path}: not a directory")
        return sandbox_path, host

    async def watch_dir(self, request: pb.WatchDirRequest, keepalive: float) -> AsyncIterator[pb.WatchDirResponse]:
        """The WatchDir stream: a start event, then filesystem events, with keepalives when quiet."""
        _, host = self._directory(request.path)
        before = await asyncio.to_thread(snapshot, host, request.recursive)
        yield pb.WatchDirResponse(start=pb.WatchDirResponse.StartEvent())
        loop = asyncio.get_running_loop()
        last_sent = loop.time()
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            after = await asyncio.to_thread(snapshot, host, request.recursive)
            for event in diff(before, after):
                yield pb.WatchDirResponse(filesystem=event)
                last_sent = loop.time()
            before = after
            if not host.is_dir():
                return  # the watched directory itself is gone: nothing more can happen
            if loop.time() - last_sent >= keepalive:
                yield pb.WatchDirResponse(keepalive=pb.WatchDirResponse.KeepAlive())
                last_sent = loop.time()

    async def create(self, request: pb.CreateWatcherRequest) -> pb.CreateWatcherResponse:
        _, host = self._directory(request.path)
        watcher = _Watcher(host, request.recursive)
        watcher_id = "w-" + secrets.token_hex(8)
        watcher.task = asyncio.create_task(watcher.run(), name=f"scalebox watcher {watcher_id}")
        self._watchers[watcher_id] = watcher
        return pb.CreateWatcherResponse(watcher_id=watcher_id)

    def _get(self, watcher_id: str) -> _Watcher:
        watcher = self._watchers.get(watcher_id)
        if watcher is None:
            raise ConnectError("not_found", f"watcher {watcher_id!r} not found")
        return watcher

    async def events(self, request: pb.GetWatcherEventsRequest) -> pb.GetWatcherEventsResponse:
        watcher = self._get(request.watcher_id)
        events, watcher.events = watcher.events, []
        return pb.GetWatcherEventsResponse(events=events)

    async def remove(self, request: pb.RemoveWatcherRequest) -> pb.RemoveWatcherResponse:
        watcher = self._get(request.watcher_id)
        del self._watchers[request.watcher_id]
        await self._stop(watcher)
        return pb.RemoveWatcherResponse()

    async def close(self) -> None:
        watchers = list(self._watchers.values())
        self._watchers.clear()
        for watcher in watchers:
            await self._stop(watcher)

    @staticmethod
    async def _stop(watcher: _Watcher) -> None:
        if watcher.task is not None:
            watcher.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher.task
