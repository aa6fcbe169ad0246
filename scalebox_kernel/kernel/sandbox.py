"""The notebook's sandbox as the kernel sees it: opened lazily through SandboxSession, remembered per notebook so
that a new kernel process re-attaches, kept alive while the kernel lives, paused when the notebook sits idle
(`idle_pause`; the next cell resumes it, and says so once), and let go of at shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..client import AsyncSandbox
from ..config import ScaleboxConfig
from ..errors import SandboxNotFound, ScaleboxError
from ..session import Attach, SandboxSession
from .languages import KernelLanguage
from .notebooks import NotebookSandboxes
from .relay import CellRelay, OpeningProgress

log = logging.getLogger(__name__)

#: The most seconds between two heartbeats (each extends the sandbox, or pauses it when the notebook is idle).
HEARTBEAT_MAX = 60.0


@dataclass
class NotebookSandbox:
    """One notebook's sandbox session (None until the first cell needs it) and what happens to it at the end."""

    config: ScaleboxConfig
    lang: KernelLanguage
    notebook: str  # notebooks.notebook_key()
    keep: bool = False  # keep the sandbox when the kernel shuts down
    progress_delay: float = 1.0
    open_timeout: float = 90.0
    store: NotebookSandboxes = field(default_factory=NotebookSandboxes)
    session: SandboxSession | None = None
    busy: Callable[[], bool] = lambda: False  # a cell is running (set by the kernel)
    on_idle_pause: Callable[[], None] = lambda: None  # the heartbeat paused the sandbox (set by the kernel)
    still_paused: Callable[[], bool] = lambda: True  # nothing resumed it since (a panel, a silent cell; the kernel)
    idle_paused_at: float | None = None  # time.time() of that pause, until a cell resumes it
    _last_active: float = 0.0
    _heartbeat: asyncio.Task[None] | None = None
    _pausing: asyncio.Lock = field(default_factory=asyncio.Lock)  # the heartbeat's pause step, and wake()

    @property
    def server(self) -> str:
        """Which back end the sandbox ids belong to (they are remembered per server)."""
        return self.config.api_url or ("cloud" if self.config.api_key else "scalebox-local")

    def recall(self) -> dict[str, object]:
        """What the store remembers for this notebook's sandbox (empty if nothing)."""
        return self.store.recall(self.notebook, self.server, self.lang.key) or {}

    def remember(self, *, restart: bool = False) -> None:
        if self.session is not None:
            self.store.remember(
                self.notebook, self.server, self.lang.key, self.session.session_id, restart=restart, keep=self.keep
            )

    async def open(
        self,
        relay: CellRelay,
        *,
        create: dict[str, Any] | None = None,
        envs: dict[str, str] | None = None,
        timeout: int | None = None,
    ) -> SandboxSession:
        """The session, opened on first use: re-attached to the remembered sandbox (resumed if paused) or a new
        one, whose replacing an expired one is announced in the cell; a progress line shows if it takes long.
        `create`, `envs` and `timeout` (`%scalebox new default --cpu 2 …`) shape a new sandbox only."""
        if self.session is not None:
            return self.session
        remembered = self.recall()
        progress = OpeningProgress(relay, self.progress_delay)

        async def opening() -> SandboxSession:
            session = await SandboxSession.open(
                str(remembered["sandbox_id"]) if remembered else None,
                config=self.config,
                timeout=timeout,
                metadata={"scalebox_kernel": self.lang.kernel_name},
                envs=envs,
                on_progress=progress.update,
                create=create,
            )
            try:
                if remembered.get("restart") and session.attach in (Attach.ATTACHED, Attach.RESUMED):
                    await session.restart(self.lang.wire)  # the previous kernel process was restarted
                progress.note(f"Starting the {self.lang.display} context")
                await session.context(self.lang.wire)
            except BaseException:
                await session.close(kill=session.attach in (Attach.CREATED, Attach.REPLACED))
                raise
            return session

        session = await progress.wait(asyncio.wait_for(opening(), self.open_timeout))
        self.session = session
        self.idle_paused_at = None
        self.activity()
        self._start_heartbeat()
        self.keep = self.keep or bool(remembered.get("keep"))
        self.remember()
        if session.attach is Attach.REPLACED and session.notice:
            relay.stream("stderr", session.notice + "\n")
        if (create or envs or timeout) and session.attach in (Attach.ATTACHED, Attach.RESUMED):
            relay.stream(
                "stderr",
                f"The notebook's sandbox {session.session_id} already exists, so the settings given apply to new "
                "sandboxes only: `%scalebox close` ends it, then `%scalebox new default …` makes one with them.\n",
            )
        return session

    def lost(self) -> None:
        """The sandbox turned out gone: the next `open` finds out and announces what replaced it."""
        self.session = None
        self._stop_heartbeat()

    def activity(self) -> None:
        """The notebook is in use (a cell starts or ends): the idle time starts again."""
        self._last_active = time.monotonic()

    @property
    def idle_pause(self) -> float:
        return float(self.config.idle_pause)

    async def wake(self) -> str | None:
        """Before a cell: resume a sandbox the heartbeat paused for idleness; the one notice that says so."""
        self.activity()
        async with self._pausing:  # a pause under way finishes first (and, seeing this activity, undoes itself)
            session, paused_at = self.session, self.idle_paused_at
            if session is None or paused_at is None:
                return None
            self.idle_paused_at = None
            try:
                await session.resume()
            except SandboxNotFound:  # gone meanwhile (killed, expired): the cell opens a new one and says so
                self.lost()
                return None
        when = time.strftime("%H:%M:%S", time.localtime(paused_at))
        return (
            f"scalebox: this notebook's sandbox {session.session_id} was paused at {when}, after "
            f"{_span(self.idle_pause)} without a cell (SCALEBOX_IDLE_PAUSE); it is resumed, its variables and files "
            "kept.\n"
        )

    def _start_heartbeat(self) -> None:
        self._stop_heartbeat()
        self._heartbeat = asyncio.ensure_future(self._beat())

    def _stop_heartbeat(self) -> None:
        task, self._heartbeat = self._heartbeat, None
        if task is not None and not task.done():
            task.cancel()

    def _period(self, session: SandboxSession) -> float:
        period = min(max(session.timeout / 3, 1.0), HEARTBEAT_MAX)
        return min(period, max(self.idle_pause / 2, 0.5)) if self.idle_pause else period

    async def _beat(self) -> None:
        """While the kernel lives: extend the sandbox before it ends, or pause it once the notebook has been idle
        for `idle_pause` seconds (a running cell is not idle). An explicit `%scalebox timeout` is left alone."""
        while (session := self.session) is not None:
            await asyncio.sleep(self._period(session))
            if self.session is not session:
                continue
            if self.idle_paused_at is not None:
                if self.still_paused():
                    continue
                self.idle_paused_at = None  # resumed by another way (the panel, a silent cell): keep it alive again
            if self.busy():
                self.activity()
            try:
                if self.idle_pause and time.monotonic() - self._last_active >= self.idle_pause:
                    async with self._pausing:
                        quiet_since = self._last_active
                        await session.pause()
                        if self._last_active != quiet_since or self.busy():  # a cell came during the pause
                            await session.resume()
                            continue
                        self.idle_paused_at = time.time()
                        self.on_idle_pause()
                    log.info("paused idle sandbox %s", session.session_id)
                elif not session.pinned:
                    await session.sandbox.set_timeout(session.timeout)
            except Exception as exc:  # the next cell will say what is wrong, if anything is
                log.debug("heartbeat of sandbox %s: %s", session.session_id, exc)

    async def close(self, restart: bool) -> None:
        """Restart: a fresh context in the same sandbox. Shutdown: let go of a kept sandbox, else kill it."""
        self._stop_heartbeat()
        session = self.session
        if session is None:
            await self._close_remembered(restart)
            return
        if restart:
            try:
                await session.restart(self.lang.wire)
                self.remember()
            except ScaleboxError:
                self.remember(restart=True)  # the next kernel process restarts the context
            await session.close(kill=False)
        elif self.keep:
            self.remember()
            await session.close(kill=False)
        else:
            self.store.forget(self.notebook, self.server, self.lang.key)
            await session.close(kill=True)
        self.session = None

    async def _close_remembered(self, restart: bool) -> None:
        """No sandbox open in this process: act on the remembered one without opening it."""
        remembered = self.recall()
        if not remembered:
            return
        sandbox_id = str(remembered["sandbox_id"])
        keep = self.keep or bool(remembered.get("keep"))
        if restart:
            self.store.remember(self.notebook, self.server, self.lang.key, sandbox_id, restart=True, keep=keep)
        elif not keep:
            self.store.forget(self.notebook, self.server, self.lang.key)
            await AsyncSandbox.kill_by_id(sandbox_id, config=self.config)


def _span(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"
