"""The magics' named sessions: several sandboxes side by side in one shell, one of them current."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

from ..config import ScaleboxConfig
from ..errors import SandboxNotFound
from ..session import Attach, SandboxSession
from ..session._progress import ProgressCallback

DEFAULT = "default"
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
    keep: bool = False  # leave the sandbox running when the shell exits

    @property
    def created(self) -> bool:
        """Whether this shell made the sandbox (rather than attaching to someone's)."""
        return self.session is not None and self.session.attach in (Attach.CREATED, Attach.REPLACED)


class Sessions:
    """Named sessions of one shell. Opening happens on the portal's loop (all methods that await run there)."""

    def __init__(self, config: ScaleboxConfig) -> None:
        self.config = config
        self.named: dict[str, NamedSession] = {}
        self.current = DEFAULT

    def entry(self, name: str | None = None) -> NamedSession:
        """The named session (created empty on first mention; the sandbox comes when it is first used)."""
        name = name or self.current
        if name not in self.named:
            self.named[name] = NamedSession(name)
        return self.named[name]

    def find(self, name_or_id: str) -> NamedSession | None:
        if name_or_id in self.named:
            return self.named[name_or_id]
        for entry in self.named.values():
            if name_or_id in (entry.session_id, entry.session.session_id if entry.session else None):
                return entry
        return None

    @staticmethod
    def looks_like_id(text: str) -> bool:
        return bool(_SANDBOX_ID.match(text))

    async def open(
        self, entry: NamedSession, on_progress: ProgressCallback | None = None, *, replace_missing: bool = True
    ) -> SandboxSession:
        """The entry's sandbox session, creating (or attaching to) the sandbox on first use."""
        if entry.session is None:
            entry.session = await SandboxSession.open(
                entry.session_id,
                config=self.config,
                timeout=entry.timeout,
                metadata={"scalebox_magics_session": entry.name},
                replace_missing=replace_missing,
                on_progress=on_progress,
            )
            entry.session_id = entry.session.session_id
        return entry.session

    async def reopen(self, entry: NamedSession, on_progress: ProgressCallback | None = None) -> SandboxSession:
        """After the sandbox vanished: a new one under the same name (its `notice` says what was lost)."""
        old = entry.session
        entry.session = None
        if old is not None:
            await old.close(kill=False)
        session = await self.open(entry, on_progress)
        if session.attach is not Attach.REPLACED:
            session.attach = Attach.REPLACED
            session.notice = f"Sandbox {entry.session_id} was gone; created sandbox {session.session_id}."
        return session

    async def close(self, entry: NamedSession, kill: bool = True) -> None:
        session = entry.session
        self.named.pop(entry.name, None)
        if session is not None:
            with contextlib.suppress(SandboxNotFound):
                await session.close(kill=kill)
        if self.current == entry.name:
            self.current = DEFAULT

    async def close_all(self) -> None:
        for entry in list(self.named.values()):
            if entry.session is not None:
                await entry.session.close(kill=False)
        self.named.clear()
