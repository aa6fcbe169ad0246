"""Language names and their aliases: one table, read by the session layer, the kernel and the magics. It imports
nothing, so that a kernel process can know its language before anything heavy is loaded."""

from __future__ import annotations

_ALIASES = {
    "python": "python",
    "python3": "python",
    "py": "python",
    "r": "r",
    "nodejs": "nodejs",
    "javascript": "nodejs",
    "node": "nodejs",
    "js": "nodejs",
    "typescript": "typescript",
    "deno": "typescript",
    "ts": "typescript",
    "java": "java",
    "ijava": "java",
    "bash": "bash",
    "sh": "bash",
}


def canonical(language: str | None) -> str:
    """One name per runtime (`python3` -> `python`, `js` -> `nodejs`, ...); unknown names pass through lowercased,
    so that the server can say which languages it has."""
    name = (language or "python").strip().lower()
    return _ALIASES.get(name, name)
