"""Input history kept by the kernel itself (the sandbox has no history RPC): tail, range and glob search."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Entry:
    session: int
    line: int
    source: str
    output: str | None


class LocalHistory:
    """The cells this kernel ran with `store_history`, numbered like IPython's (session, line)."""

    def __init__(self, session: int = 1) -> None:
        self.session = session
        self._entries: list[Entry] = []

    def add(self, line: int, source: str, output: str | None = None) -> None:
        self._entries.append(Entry(self.session, line, source, output))

    def __len__(self) -> int:
        return len(self._entries)

    def query(
        self,
        hist_access_type: str,
        *,
        output: bool = False,
        session: int | None = None,
        start: int | None = None,
        stop: int | None = None,
        n: int | None = None,
        pattern: str | None = None,
        unique: bool = False,
    ) -> list[list[Any]]:
        """Entries as the history_reply wants them: `[session, line, input]` or `[session, line, [input, output]]`."""
        if hist_access_type == "tail":
            entries = self._entries[-n:] if n else list(self._entries)
        elif hist_access_type == "range":
            wanted = self.session if not session or session <= 0 else session  # 0/negative: this session
            entries = [
                e
                for e in self._entries
                if e.session == wanted and e.line >= (start or 0) and (stop is None or e.line < stop)
            ]
        elif hist_access_type == "search":
            entries = [e for e in self._entries if fnmatch.fnmatchcase(e.source, pattern or "*")]
            if unique:
                seen: set[str] = set()
                kept: list[Entry] = []
                for e in reversed(entries):  # keep the latest of each input
                    if e.source not in seen:
                        seen.add(e.source)
                        kept.append(e)
                entries = kept[::-1]
            if n:
                entries = entries[-n:]
        else:
            entries = []
        return [[e.session, e.line, [e.source, e.output] if output else e.source] for e in entries]
