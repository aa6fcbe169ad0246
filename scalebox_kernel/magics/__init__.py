"""The IPython extension: `%load_ext scalebox_kernel` gives `%%scalebox`, `%scalebox ...` and `%autoscalebox`."""

from __future__ import annotations

from typing import Any

from ._display import ScaleboxCellError, ScaleboxInterrupted
from ._magics import ScaleboxMagics

__all__ = ["ScaleboxCellError", "ScaleboxInterrupted", "ScaleboxMagics", "load_ipython_extension"]

_ATTR = "_scalebox_magics"


def load_ipython_extension(ipython: Any) -> None:
    if getattr(ipython, _ATTR, None) is not None:
        return
    magics = ScaleboxMagics(ipython)
    ipython.register_magics(magics)

    def route(lines: list[str]) -> list[str]:
        return magics.route_cell(lines)

    route.has_side_effects = True  # type: ignore[attr-defined]  # keeps it out of is_complete checks
    ipython.input_transformers_cleanup.append(route)
    setattr(ipython, _ATTR, (magics, route))


def unload_ipython_extension(ipython: Any) -> None:
    loaded = getattr(ipython, _ATTR, None)
    if loaded is None:
        return
    magics, route = loaded
    if route in ipython.input_transformers_cleanup:
        ipython.input_transformers_cleanup.remove(route)
    magics.auto_args = None
    setattr(ipython, _ATTR, None)
