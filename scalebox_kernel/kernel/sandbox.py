"""The notebook's sandbox as the kernel sees it: opened lazily through SandboxSession, remembered per notebook so
that a new kernel process re-attaches, kept alive while the notebook is used, and let go of at shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from ..client import AsyncSandbox
from ..config import ScaleboxConfig
from ..errors import ScaleboxError
from ..session import Attach, SandboxSession
from .languages import KernelLanguage
from .notebooks import NotebookSandboxes
from .relay import CellRelay, OpeningProgress

log = logging.getLogger(__name__)


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
    _touched: float = 0.0
    _background: set[asyncio.Future[None]] = field(default_factory=set)

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

    async def open(self, relay: CellRelay) -> SandboxSession:
        """The session, opened on first use: re-attached to the remembered sandbox (resumed if paused) or a new
        one, whose replacing an expired one is announced in the cell; a progress line shows if it takes long."""
        if self.session is not None:
            return self.session
        remembered = self.recall()
        progress = OpeningProgress(relay, self.progress_delay)

        async def opening() -> SandboxSession:
            session = await SandboxSession.open(
                str(remembered["sandbox_id"]) if remembered else None,
                config=self.config,
                metadata={"scalebox_kernel": self.lang.kernel_name},
                on_progress=progress.update,
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
        self._touched = time.monotonic()
        self.keep = self.keep or bool(remembered.get("keep"))
        self.remember()
        if session.attach is Attach.REPLACED and session.notice:
            relay.stream("stderr", session.notice + "\n")
        return session

    def lost(self) -> None:
        """The sandbox turned out gone: the next `open` finds out and announces what replaced it."""
        self.session = None

    def keep_alive_later(self) -> None:
        """Give an active notebook's sandbox its full lifetime again (at most every tenth of it), in the background."""
        session = self.session
        if session is None or time.monotonic() - self._touched < max(session.timeout / 10, 1):
            return
        self._touched = time.monotonic()

        async def touch() -> None:
            try:
                await session.sandbox.set_timeout(session.timeout)
            except Exception as exc:  # the next cell will say what is wrong, if anything is
                log.debug("Could not extend sandbox %s: %s", session.session_id, exc)

        task = asyncio.ensure_future(touch())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self, restart: bool) -> None:
        """Restart: a fresh context in the same sandbox. Shutdown: let go of a kept sandbox, else kill it."""
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
