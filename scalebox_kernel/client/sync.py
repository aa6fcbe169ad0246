"""The synchronous API: every method of the async classes, run on one private event-loop thread (the portal).

The portal is a daemon thread with its own loop, one per process, so `Sandbox` works the same from a plain
script and from inside a running event loop (an ipykernel cell, IPython with autoawait). Nothing here
re-implements logic: each sync method sends the async one to the portal and waits. A KeyboardInterrupt while
waiting cancels the coroutine there (which closes its stream: the agent interrupts the cell).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

from ..config import ScaleboxConfig
from ..errors import ScaleboxError
from .commands import AsyncCommands, CommandHandle
from .dual import class_or_instance
from .filesystem import AsyncFilesystem, WatchHandle
from .models import CommandResult
from .pty import AsyncPty, PtyHandle
from .sandbox import AsyncSandbox

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")

#: How long a KeyboardInterrupt waits for the cancelled coroutine to clean up (close its stream, kill a command).
CANCEL_GRACE = 5.0


class Portal:
    """An event loop on a daemon thread; `run(coro)` runs a coroutine there and waits for its result."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            alive = self._thread is not None and self._thread.is_alive() and self._pid == os.getpid()
            if self._loop is None or not alive:  # first use, or we are a forked child without the thread
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="scalebox-portal", daemon=True)
                thread.start()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
            return self._loop

    def submit(self, coro: Coroutine[Any, Any, R]) -> concurrent.futures.Future[R]:
        """Schedule `coro` on the portal's loop; the future can be waited on, or cancelled, from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop())

    def run(self, coro: Coroutine[Any, Any, R]) -> R:
        """Run `coro` on the portal's loop and wait; a KeyboardInterrupt while waiting cancels it."""
        loop = self.loop()
        if threading.current_thread() is self._thread:
            coro.close()
            raise ScaleboxError(
                "A synchronous Sandbox method was called from one of its own callbacks, which would deadlock; "
                "use AsyncSandbox (or do the work after run_code returns)."
            )
        finished = threading.Event()

        async def runner() -> R:
            try:
                return await coro
            finally:
                finished.set()

        future = asyncio.run_coroutine_threadsafe(runner(), loop)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            finished.wait(CANCEL_GRACE)
            raise


portal = Portal()


def _blocking(method: Callable[Concatenate[Any, P], Coroutine[Any, Any, R]]) -> Callable[Concatenate[Any, P], R]:
    """The sync twin of an async method: same arguments, run on the portal against `self._async`."""
    return _blocking_then(method, _same)


def _blocking_then(
    method: Callable[Concatenate[Any, P], Coroutine[Any, Any, R]], wrap: Callable[[R], S]
) -> Callable[Concatenate[Any, P], S]:
    """Like `_blocking`, with the result passed through `wrap` (async handles become sync handles)."""

    @functools.wraps(method)
    def call(self: Any, *args: P.args, **kwargs: P.kwargs) -> S:
        return wrap(portal.run(method(self._async, *args, **kwargs)))

    return call


def _blocking_static(method: Callable[P, Coroutine[Any, Any, R]], wrap: Callable[[R], S]) -> Callable[P, S]:
    @functools.wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> S:
        return wrap(portal.run(method(*args, **kwargs)))

    return call


def _same(value: R) -> R:
    return value


def _direct(method: Callable[Concatenate[Any, P], R]) -> Callable[Concatenate[Any, P], R]:
    """The sync twin of a plain (not async) method: called on `self._async` in this thread."""

    @functools.wraps(method)
    def call(self: Any, *args: P.args, **kwargs: P.kwargs) -> R:
        return method(self._async, *args, **kwargs)

    return call


class SyncCommandHandle:
    """A background command (sync twin of CommandHandle)."""

    def __init__(self, handle: CommandHandle) -> None:
        self._async = handle

    def __repr__(self) -> str:
        return f"CommandHandle(pid={self.pid})"

    @property
    def pid(self) -> int:
        return self._async.pid

    @property
    def stdout(self) -> str:
        return self._async.stdout

    @property
    def stderr(self) -> str:
        return self._async.stderr

    wait = _blocking(CommandHandle.wait)
    kill = _blocking(CommandHandle.kill)
    disconnect = _blocking(CommandHandle.disconnect)


def _sync_handle(value: CommandResult | CommandHandle) -> CommandResult | SyncCommandHandle:
    return SyncCommandHandle(value) if isinstance(value, CommandHandle) else value


class SyncWatchHandle:
    """A running directory watch (sync twin of WatchHandle)."""

    def __init__(self, handle: WatchHandle) -> None:
        self._async = handle

    @property
    def error(self) -> BaseException | None:
        return self._async.error

    stop = _blocking(WatchHandle.stop)


class Filesystem:
    """The sandbox's files, synchronously (see AsyncFilesystem)."""

    def __init__(self, files: AsyncFilesystem) -> None:
        self._async = files

    read = _blocking(AsyncFilesystem.read)
    write = _blocking(AsyncFilesystem.write)
    list = _blocking(AsyncFilesystem.list)
    get_info = _blocking(AsyncFilesystem.get_info)
    exists = _blocking(AsyncFilesystem.exists)
    make_dir = _blocking(AsyncFilesystem.make_dir)
    move = _blocking(AsyncFilesystem.move)
    rename = move
    remove = _blocking(AsyncFilesystem.remove)
    watch_dir = _blocking_then(AsyncFilesystem.watch_dir, SyncWatchHandle)


class Commands:
    """The sandbox's processes, synchronously (see AsyncCommands)."""

    def __init__(self, commands: AsyncCommands) -> None:
        self._async = commands

    run = _blocking_then(AsyncCommands.run, _sync_handle)
    connect = _blocking_then(AsyncCommands.connect, SyncCommandHandle)
    kill = _blocking(AsyncCommands.kill)
    send_stdin = _blocking(AsyncCommands.send_stdin)
    list = _blocking(AsyncCommands.list)


class SyncPtyHandle:
    """A running terminal (sync twin of PtyHandle); its `on_data` callback runs on the portal's thread."""

    def __init__(self, handle: PtyHandle) -> None:
        self._async = handle

    def __repr__(self) -> str:
        return f"PtyHandle(pid={self.pid})"

    @property
    def pid(self) -> int:
        return self._async.pid

    wait = _blocking(PtyHandle.wait)
    kill = _blocking(PtyHandle.kill)
    disconnect = _blocking(PtyHandle.disconnect)


class Pty:
    """The sandbox's terminals, synchronously (see AsyncPty)."""

    def __init__(self, pty: AsyncPty) -> None:
        self._async = pty

    create = _blocking_then(AsyncPty.create, SyncPtyHandle)
    send_stdin = _blocking(AsyncPty.send_stdin)
    resize = _blocking(AsyncPty.resize)
    kill = _blocking(AsyncPty.kill)


class Sandbox:
    """A sandbox, synchronously: the same API as AsyncSandbox without `await` (callbacks run on the portal)."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._async = sandbox
        self.files = Filesystem(sandbox.files)
        self.commands = Commands(sandbox.commands)
        self.pty = Pty(sandbox.pty)

    def __repr__(self) -> str:
        return f"Sandbox(sandbox_id={self.sandbox_id!r}, sandbox_domain={self.sandbox_domain!r})"

    @property
    def sandbox_id(self) -> str:
        return self._async.sandbox_id

    @property
    def template_id(self) -> str:
        return self._async.template_id

    @property
    def sandbox_domain(self) -> str:
        return self._async.sandbox_domain

    @property
    def config(self) -> ScaleboxConfig:
        return self._async.config

    @property
    def agent_url(self) -> str:
        return self._async.agent_url

    def get_host(self, port: int) -> str:
        """Host (and path) that reaches `port` inside the sandbox; see AsyncSandbox.get_host."""
        return self._async.get_host(port)

    def get_url(self, port: int, path: str = "/", *, token: bool = False) -> str:
        """The full URL of `path` on `port` inside the sandbox; see AsyncSandbox.get_url."""
        return self._async.get_url(port, path, token=token)

    def secrets(self) -> list[str]:
        """Values that must never be shown or logged (the API key, the access token)."""
        return self._async.secrets()

    @property
    def async_sandbox(self) -> AsyncSandbox:
        """The async object behind this one (its coroutines must run on `portal`)."""
        return self._async

    create = staticmethod(_blocking_static(AsyncSandbox.create, lambda sandbox: Sandbox(sandbox)))
    connect = staticmethod(_blocking_static(AsyncSandbox.connect, lambda sandbox: Sandbox(sandbox)))
    list = staticmethod(_blocking_static(AsyncSandbox.list, _same))
    kill_by_id = staticmethod(_blocking_static(AsyncSandbox.kill_by_id, _same))
    get_regions = staticmethod(_blocking_static(AsyncSandbox.get_regions, _same))

    # On the class with a sandbox id (`Sandbox.kill("sbx-...")`) or on a sandbox (`sandbox.kill()`).
    kill = class_or_instance(_blocking_static(AsyncSandbox._kill_by_id, _same), _blocking(AsyncSandbox._kill))
    set_timeout = class_or_instance(
        _blocking_static(AsyncSandbox._set_timeout_by_id, _same), _blocking(AsyncSandbox._set_timeout)
    )
    get_info = class_or_instance(
        _blocking_static(AsyncSandbox._get_info_by_id, _same), _blocking(AsyncSandbox._get_info)
    )
    get_metrics = class_or_instance(
        _blocking_static(AsyncSandbox._get_metrics_by_id, _same), _blocking(AsyncSandbox._get_metrics)
    )
    pause = class_or_instance(_blocking_static(AsyncSandbox._pause_by_id, _same), _blocking(AsyncSandbox._pause))

    resume = _blocking(AsyncSandbox.resume)
    download_url = _direct(AsyncSandbox.download_url)
    upload_url = _direct(AsyncSandbox.upload_url)
    is_running = _blocking(AsyncSandbox.is_running)
    create_code_context = _blocking(AsyncSandbox.create_code_context)
    destroy_context = _blocking(AsyncSandbox.destroy_context)
    run_code = _blocking(AsyncSandbox.run_code)
    close = _blocking(AsyncSandbox.close)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.kill()
        finally:
            self.close()
