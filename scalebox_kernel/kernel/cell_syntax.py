"""How the kernel reads a cell: the `%scalebox` lines at its top, a `%%scalebox` first line, and such lines
misplaced after code. Plain string work, imported at start (what carries the lines out lives in `commands`)."""

from __future__ import annotations

import re

_LINE = re.compile(r"^%scalebox(\s|$)")
_CELL = re.compile(r"^%%scalebox(\s|$)")


def split_cell(code: str) -> tuple[list[str], str]:
    """The `%scalebox` lines at the top of a cell, and the code after them."""
    lines = code.split("\n")
    commands: list[str] = []
    index = 0
    while index < len(lines) and (not lines[index].strip() or _LINE.match(lines[index])):
        if lines[index].strip():
            commands.append(lines[index])
        index += 1
    return commands, "\n".join(lines[index:]) if commands else code


def split_magic(code: str) -> tuple[str, str] | None:
    """`(options, body)` when the cell is a `%%scalebox` cell."""
    head, _, body = code.lstrip("\n").partition("\n")
    return (head[len("%%scalebox") :], body) if _CELL.match(head) else None


def misplaced(code: str) -> str | None:
    """A usage error when `%scalebox` lines come after code (they must come first, they do not run remotely)."""
    lines = code.split("\n")
    if any(_LINE.match(line) for line in lines):
        return "put %scalebox lines at the top of the cell, before any code: they run here, not in the sandbox."
    if any(_CELL.match(line) for line in lines):
        return "%%scalebox must be the first line of the cell."
    return None
