"""Named sessions: several sandboxes side by side in one shell or kernel, one of them current.

Each door keeps one `Sessions`; the Scalebox kernel's subclass backs the `default` session with the notebook's own
sandbox. Everything that awaits runs on the loop that owns the sandboxes."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..client import Execution
from ..config import ScaleboxConfig
from ..errors import SandboxNotFound
from ..session import Attach, SandboxSession
from ..session._progress import ProgressCallback, Tracker
from ._output import Output

DEFAULT = "default"
#: Status panels of one session that follow its pause and resume (older ones keep their last reading).
MAX_WATCHERS = 8
_SANDBOX_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{5,}$")


@dataclass
class NamedSession:
    """A name the user gave (or `default`), the sandbox behind it once opened, and per-session settings."""

    name: str
    session: SandboxSession | None = None
    session_id: str | None = None  # known before opening when attaching by id
    language: str = "python"
    timeout: int | None = None
    envs: dict[str, str] = field(default_factory=dict)
    keep: bool = False  # leave the sandbox running when the shell exits / the kernel shuts down
    attached: bool = False  # someone else's sandbox, attached to by `%scalebox use`
    create: dict[str, Any] = field(default_factory=dict)  # settings of its sandbox, before it starts (%scalebox new)
    _paused: bool = False
    watchers: list[Callable[[], None]] = field(default_factory=list)  # status panels, told when it resumes

    @property
    def paused(self) -> bool:
        """Paused by `%scalebox pause`, the panel or the idle heartbeat since the last cell."""
        return self._paused

    @paused.setter
    def paused(self, value: bool) -> None:
        changed, self._paused = self._paused != value, value
        if changed:  # a cell resumed it, say: a panel showing "paused" reads the state again
            for watcher in list(self.watchers):
                with contextlib.suppress(Exception):
                    watcher()

    def watch(self, watcher: Callable[[], None]) -> None:
        """Call `watcher` whenever the session is paused or resumed (the last few watchers only)."""
        self.watchers = [*self.watchers[-(MAX_WATCHERS - 1) :], watcher]

    @property
    def created(self) -> bool:
        """Whether this door made the sandbox (rather than attaching to someone's)."""
        return self.session is not None and self.session.attach in (Attach.CREATED, Attach.REPLACED)

    @property
    def sandbox_id(self) -> str | None:
        return self.session.session_id if self.session is not None else self.session_id


class Sessions:
    """The named sessions of one door. `open` creates (or attaches to) a sandbox on first use."""

    #: When sandboxes that are not kept are killed; said by `%scalebox keep`.
    exit_event = "this shell exits"
    #: Seconds opening a sandbox may take (None: the client's own timeouts).
    open_timeout: float | None = None

    def __init__(self, config: ScaleboxConfig, language: str = "python") -> None:
        self.config = config
        self.language = language  # of new sessions
        self.named: dict[str, NamedSession] = {}
        self.current = DEFAULT
        self.closed: dict[str, str] = {}  # name -> the sandbox `close` killed, announced when the name reopens

    def entry(self, name: str | None = None) -> NamedSession:
        """The named session (created empty on first mention; the sandbox comes when it is first used)."""
        name = name or self.current
        if name not in self.named:
            self.named[name] = NamedSession(name, language=self.language)
        return self.named[name]

    def find(self, name_or_id: str) -> NamedSession | None:
        if name_or_id in self.named:
            return self.named[name_or_id]
        return next((e for e in self.named.values() if name_or_id == e.sandbox_id), None)

    @staticmethod
    def looks_like_id(text: str) -> bool:
        return bool(_SANDBOX_ID.match(text))

    def metadata(self, entry: NamedSession) -> dict[str, str]:
        """Metadata put on the sandboxes this door creates."""
        return {"scalebox_magics_session": entry.name}

    def channel_of(self, entry: NamedSession) -> str | None:
        """How this door's cells reach the entry's sandbox kernel, when the door has a choice (`%scalebox info`)."""
        return None

    def secrets(self) -> list[str]:
        """What must never be shown: the API key in effect (the client already redacts access tokens)."""
        secrets = self.config.secrets()
        secrets.extend(e.session.sandbox.connection.api_key for e in self.named.values() if e.session is not None)
        return secrets

    # ------------------------------------------------------------------------------------------ opening

    async def open(
        self, entry: NamedSession, out: Output, language: str | None = None, *, replace_missing: bool = True
    ) -> SandboxSession:
        """The entry's session, opened on first use (a sandbox that replaced a lost one, or one opened after
        `close`, is announced on stderr), with the context of `language` started."""
        session = entry.session
        if session is None:
            session = await self._open(entry, out, replace_missing)
            closed = self.closed.pop(entry.name, None)
            if closed and session.attach is not Attach.REPLACED:
                new = session.session_id
                out.stream(
                    "stderr", f"Sandbox {closed} was closed; session {entry.name} goes on in a new one, {new}.\n"
                )
        if language is not None and not session.has_context(language):
            await out.progress(lambda on_progress: _start_context(session, language, on_progress), "Starting")
        return session

    async def _open(self, entry: NamedSession, out: Output, replace_missing: bool) -> SandboxSession:
        """Create or attach to the entry's sandbox and say so if it replaced a lost one (a door may do more)."""

        async def opening(on_progress: ProgressCallback) -> SandboxSession:
            return await SandboxSession.open(
                entry.session_id,
                config=self.config,
                timeout=entry.timeout,
                metadata=self.metadata(entry),
                replace_missing=replace_missing,
                on_progress=on_progress,
                envs=entry.create.get("envs"),
                create={k: v for k, v in entry.create.items() if k != "envs"},
            )

        work = opening if self.open_timeout is None else lambda cb: asyncio.wait_for(opening(cb), self.open_timeout)
        session = await out.progress(work, "Opening a sandbox")
        entry.session, entry.session_id = session, session.session_id
        if session.attach is Attach.REPLACED and session.notice:
            out.stream("stderr", session.notice + "\n")
        return session

    async def lost(self, entry: NamedSession) -> None:
        """The entry's sandbox turned out gone: the next `open` finds out and announces what replaced it."""
        old, entry.session = entry.session, None
        if old is not None:
            with contextlib.suppress(Exception):
                await old.close(kill=False)

    async def run(
        self,
        entry: NamedSession,
        out: Output,
        code: str,
        *,
        language: str,
        prepare: Callable[[SandboxSession], Awaitable[Any]] | None = None,
        **options: Any,
    ) -> tuple[SandboxSession, Execution]:
        """Run `code` in the entry's session (after `prepare`, if given); when its sandbox turns out gone before
        any output came, open a new one (announced) and run it there. `options` go to `run_code`."""
        shown = 0

        def counted(callback: Callable[[Any], Any] | None) -> Callable[[Any], Any] | None:
            def call(value: Any) -> Any:
                nonlocal shown
                shown += 1
                return callback(value) if callback else None

            return call if callback else None

        for key in ("on_stdout", "on_stderr", "on_result", "on_error"):
            options[key] = counted(options.get(key))
        for attempt in range(2):
            session = await self.open(entry, out, language)
            if entry.paused:  # resumed before the flag changes: whoever follows it reads it running
                await session.resume()
                entry.paused = False
            try:
                if prepare is not None:
                    await prepare(session)
                return session, await session.run_code(code, language=language, **options)
            except SandboxNotFound:
                if attempt or shown:
                    raise
                await self.lost(entry)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------------------------------ closing

    def set_keep(self, entry: NamedSession, keep: bool) -> None:
        entry.keep = keep

    def lifetime_rows(self, entry: NamedSession, session: SandboxSession) -> list[tuple[str, str]]:
        """More `%scalebox info` rows on how the session's sandbox is kept (a door that keeps it says how)."""
        return []

    async def close(self, entry: NamedSession, kill: bool = True) -> None:
        """Kill the entry's sandbox (kill=False: only let go of it) and forget the entry."""
        session = entry.session
        self.named.pop(entry.name, None)
        if kill and entry.sandbox_id:  # before the kill: a cell that reopens the name meanwhile must say it
            self.closed[entry.name] = entry.sandbox_id
        if self.current == entry.name:
            self.current = DEFAULT
        if session is not None:
            with contextlib.suppress(SandboxNotFound):
                await session.close(kill=kill)

    async def shutdown(self, restart: bool = False) -> None:
        """At exit: kill the sandboxes created here and not kept, let go of the others."""
        for entry in list(self.named.values()):
            if entry.session is not None:
                with contextlib.suppress(Exception):
                    await entry.session.close(kill=entry.created and not entry.keep)
                entry.session = None


async def _start_context(session: SandboxSession, language: str, on_progress: ProgressCallback) -> None:
    """Start the context of `language` (a kernel start: a wait worth a progress bar)."""
    tracker = Tracker(on_progress)
    await tracker.start("connecting", f"Starting the {language} kernel")
    await session.context(language)
    await tracker.finish()
