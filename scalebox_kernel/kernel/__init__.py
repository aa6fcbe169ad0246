"""The Scalebox kernel: a Jupyter kernel whose cells run in a Scalebox sandbox, and its kernelspecs."""

from __future__ import annotations

from .languages import LANGUAGES, KernelLanguage, get_language

__all__ = ["LANGUAGES", "KernelLanguage", "get_language"]
