"""The Scalebox kernel: a Jupyter kernel whose cells run in a Scalebox sandbox, and its kernelspecs.

Nothing is imported here: `python -m scalebox_kernel.kernel` first asks the zygote for a kernel (`launch.py`), and
that must cost no more than the interpreter's start.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LANGUAGES", "KernelLanguage", "get_language"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import languages

        return getattr(languages, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
