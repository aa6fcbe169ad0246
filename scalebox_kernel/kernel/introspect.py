"""Completion, inspection and `name?` help for a Python context: the protocol has no RPC for them, so the kernel
runs a small silent helper cell in the sandbox's IPython and reads its answer from a display bundle."""

from __future__ import annotations

import builtins
import json
import keyword
import re
from collections.abc import Iterable
from typing import Any

#: The MIME type the helper cell answers in (travels as a Result's `extra`, like any unknown type).
INTROSPECT_MIME = "application/vnd.scalebox.introspect+json"

_HELPER = """\
def __scalebox_introspect(request):
    from IPython import get_ipython
    from IPython.display import display
    ip = get_ipython()
    answer = {}
    try:
        if request["op"] == "complete":
            from IPython.core.completer import provisionalcompleter, rectify_completions
            code, pos = request["code"], request["cursor_pos"]
            jedi, ip.Completer.use_jedi = ip.Completer.use_jedi, False  # jedi's first call takes seconds
            try:
                with provisionalcompleter():
                    found = list(rectify_completions(code, ip.Completer.completions(code, pos)))
            finally:
                ip.Completer.use_jedi = jedi
            answer = {
                "matches": [c.text for c in found],
                "cursor_start": found[0].start if found else pos,
                "cursor_end": found[0].end if found else pos,
                "types": [{"start": c.start, "end": c.end, "text": c.text, "type": c.type,
                           "signature": c.signature} for c in found],
            }
        else:
            try:
                data = ip.object_inspect_mime(request["name"], detail_level=request["detail_level"],
                                              omit_sections=request["omit_sections"])
                answer = {"found": True, "data": data}
            except KeyError:
                answer = {"found": False}
    except Exception as error:
        answer = {"error": f"{type(error).__name__}: {error}"}
    display({%(mime)r: answer}, raw=True)
__scalebox_introspect(%(request)s)
del __scalebox_introspect
"""

_HELP_RE = re.compile(r"^\s*(?:(\?{1,2})\s*([\w.]+)|([\w.]+)\s*(\?{1,2}))\s*$")


def help_target(code: str) -> tuple[str, int] | None:
    """`(name, detail_level)` when the cell is IPython help syntax (`zip?`, `?zip`, `zip??`), else None."""
    match = _HELP_RE.match(code)
    if not match:
        return None
    marks = match.group(1) or match.group(4)
    return match.group(2) or match.group(3), len(marks) - 1


def _helper(request: dict[str, Any]) -> str:
    return _HELPER % {"mime": INTROSPECT_MIME, "request": json.dumps(request)}


def complete_cell(code: str, cursor_pos: int) -> str:
    """The helper cell that completes `code` at `cursor_pos` in the sandbox."""
    return _helper({"op": "complete", "code": code, "cursor_pos": cursor_pos})


def inspect_cell(name: str, detail_level: int = 0, omit_sections: Iterable[str] = ()) -> str:
    """The helper cell that inspects `name` in the sandbox."""
    return _helper(
        {"op": "inspect", "name": name, "detail_level": detail_level, "omit_sections": sorted(omit_sections)}
    )


def inspect_name(code: str, cursor_pos: int) -> str:
    from IPython.utils.tokenutil import token_at_cursor  # IPython only once something is inspected

    return token_at_cursor(code, cursor_pos)


def parse_answer(bundles: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The helper's answer among the bundles a helper cell produced (None if it gave none)."""
    for bundle in bundles:
        answer = bundle.get(INTROSPECT_MIME)  # a +json type: already decoded by `Result.to_bundle`
        if isinstance(answer, dict) and "error" not in answer:
            return answer
    return None


_IDENT_TAIL = re.compile(r"[A-Za-z_]\w*$")


def local_completions(code: str, cursor_pos: int) -> dict[str, Any]:
    """Builtins and keywords for a bare name: what every Python sandbox has, used before a sandbox is open."""
    before = code[:cursor_pos]
    match = _IDENT_TAIL.search(before)
    if not match or (match.start() > 0 and before[match.start() - 1] == "."):
        return empty_completions(cursor_pos)
    prefix = match.group()
    names = sorted({n for n in (*dir(builtins), *keyword.kwlist) if n.startswith(prefix) and not n.startswith("_")})
    return {
        "matches": names,
        "cursor_start": match.start(),
        "cursor_end": cursor_pos,
        "metadata": {},
        "status": "ok",
    }


def empty_completions(cursor_pos: int) -> dict[str, Any]:
    return {"matches": [], "cursor_start": cursor_pos, "cursor_end": cursor_pos, "metadata": {}, "status": "ok"}
