"""Run notebook cells inside Scalebox sandboxes: a Jupyter kernel, an IPython extension, a client and
scalebox-local, the embedded sandbox server that speaks the same wire protocol."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext scalebox_kernel`: the %scalebox and %%scalebox magics."""
    from .magics import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from .magics import unload_ipython_extension as _unload

    _unload(ipython)
