"""User callbacks (on_stdout, on_result, ...): plain functions or coroutines, both welcome."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

Callback = Callable[[Any], Any]


async def call_back(callback: Callback | None, value: Any) -> None:
    """Call a user callback, awaiting it if it returned an awaitable."""
    if callback is not None:
        outcome = callback(value)
        if inspect.isawaitable(outcome):
            await outcome
