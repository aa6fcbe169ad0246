"""Keep the server's own paths out of what clients read: every error text leaves through `scrub`.

Messages are written with sandbox paths, but an unexpected exception (from the OS, a library, a kernel launch)
may still carry a host path. A path inside a sandbox's tree becomes the path the sandbox knows; anything else below
the server's data directory becomes `<scalebox-local data>`; nothing about the host's layout gets out.
"""

from __future__ import annotations

import os
import re

_roots: list[str] = []
_pattern: re.Pattern[str] | None = None


def register_data_dir(path: str | os.PathLike[str]) -> None:
    """Scrub this data directory (as given and resolved) from every message from now on."""
    global _pattern
    for form in {os.path.abspath(path), os.path.realpath(path)}:
        if form not in _roots:
            _roots.append(form)
    alternatives = "|".join(re.escape(root) for root in sorted(_roots, key=len, reverse=True))
    # <data>/sandboxes/<id>/root/<rest>: the sandbox's own path; <data>/<anything else>: a placeholder.
    _pattern = re.compile(
        rf"(?:{alternatives})(?=$|[/\s'\"])(?:(?P<tree>/sandboxes/[^/\s'\"]+/root)(?=$|[/\s'\"])(?P<inside>/[^\s'\"]*)?|[^\s'\"]*)"
    )


def scrub(text: str) -> str:
    """`text` with every host path of this server replaced (see the module docstring)."""
    if _pattern is None or not text:
        return text

    def replace(match: re.Match[str]) -> str:
        if match.group("tree"):
            return match.group("inside") or "/"
        return "<scalebox-local data>"

    return _pattern.sub(replace, text)
