"""Directory watching for the Filesystem service (WatchDir streams and polled watchers), by comparing snapshots.

Polling every 0.2 s needs no dependency and works the same on every platform; renames show as remove + create.
The watched directory is opened once, inside the sandbox and as its uid, and every snapshot reads through that
fd: swapping the directory for a symlink afterwards changes nothing about what is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import stat
from collections.abc import AsyncIterator

from ...protocol import pb
from ...protocol.connect import ConnectError
from ..isolation.tree import OwnedFd, SandboxTree, walk_fd
from .filesystem import MAX_DEPTH, MAX_ENTRIES, missing, os_error, text
from .paths import SandboxPaths

POLL_INTERVAL = 0.2
#: Events a polled watcher keeps between two GetWatcherEvents calls; older ones are dropped.
MAX_PENDING_EVENTS = 10_000
#: Watches (polled watchers and WatchDir streams) one sandbox may have at once: each costs the server a scan
#: every POLL_INTERVAL.
MAX_WATCHES = 32

Snapshot = dict[str, tuple[int, int, int]]  # relative name -> (mtime_ns, size, mode)


def snapshot(directory: int, recursive: bool) -> Snapshot:
    """What is in the directory open at fd `directory` now (one level, or the tree without following links)."""
    found: Snapshot = {}
    try:
        for _, _, entry in walk_fd(directory, "", MAX_DEPTH if recursive else 1):
            found[text(entry.path.lstrip("/"))] = (entry.info.st_mtime_ns, entry.info.st_size, entry.info.st_mode)
            if len(found) >= MAX_ENTRIES:
                break
    except OSError:
        pass
    return found


def _gone(directory: int) -> bool:
    """Whether the directory open at fd `directory` was removed."""
    return os.fstat(directory).st_nlink == 0


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

    def __init__(self, tree: SandboxTree, directory: int, recursive: bool) -> None:
        self.tree = tree
        self.directory = OwnedFd(directory)
        self.recursive = recursive
        self.events: list[pb.FilesystemEvent] = []
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        try:
            before = await self.directory.use(self.tree.run, snapshot, self.recursive)
            while True:
                await asyncio.sleep(POLL_INTERVAL)
                after = await self.directory.use(self.tree.run, snapshot, self.recursive)
                self.events.extend(diff(before, after))
                del self.events[:-MAX_PENDING_EVENTS]
                before = after
        finally:
            self.directory.close()


class Watchers:
    """WatchDir, CreateWatcher, GetWatcherEvents and RemoveWatcher for one sandbox."""

    def __init__(self, paths: SandboxPaths, tree: SandboxTree) -> None:
        self.paths = paths
        self.tree = tree
        self._watchers: dict[str, _Watcher] = {}
        self._streams = 0

    def _check_room(self) -> None:
        if len(self._watchers) + self._streams >= MAX_WATCHES:
            raise ConnectError(
                "resource_exhausted", f"this sandbox already has {MAX_WATCHES} watches; remove one (RemoveWatcher)"
            )

    def _open(self, path: str) -> int:
        """An fd of the directory to watch (blocking: on the tree's threads)."""
        try:
            if not self.tree.exists(path):
                raise missing(path, "watch")
            if not self.tree.is_dir(path):
                raise ConnectError("invalid_argument", f"watch {path}: not a directory")
            return self.tree.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise os_error(exc, "watch", path) from None

    async def watch_dir(self, request: pb.WatchDirRequest, keepalive: float) -> AsyncIterator[pb.WatchDirResponse]:
        """The WatchDir stream: a start event, then filesystem events, with keepalives when quiet."""
        self._check_room()
        self._streams += 1
        try:
            directory = OwnedFd(await self.tree.run(self._open, self.paths.normalize(request.path)))
        except BaseException:
            self._streams -= 1
            raise
        try:
            before = await directory.use(self.tree.run, snapshot, request.recursive)
            yield pb.WatchDirResponse(start=pb.WatchDirResponse.StartEvent())
            loop = asyncio.get_running_loop()
            last_sent = loop.time()
            while True:
                await asyncio.sleep(POLL_INTERVAL)
                after = await directory.use(self.tree.run, snapshot, request.recursive)
                for event in diff(before, after):
                    yield pb.WatchDirResponse(filesystem=event)
                    last_sent = loop.time()
                before = after
                if _gone(directory.fd):
                    return  # the watched directory itself is gone: nothing more can happen
                if loop.time() - last_sent >= keepalive:
                    yield pb.WatchDirResponse(keepalive=pb.WatchDirResponse.KeepAlive())
                    last_sent = loop.time()
        finally:
            directory.close()
            self._streams -= 1

    async def create(self, request: pb.CreateWatcherRequest) -> pb.CreateWatcherResponse:
        self._check_room()
        directory = await self.tree.run(self._open, self.paths.normalize(request.path))
        watcher = _Watcher(self.tree, directory, request.recursive)
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
