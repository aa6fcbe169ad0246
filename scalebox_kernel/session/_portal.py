"""Calling the async session code from sync code, on the client's background event loop (its portal)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Coroutine
from typing import Any, TypeVar

from ..client import portal

T = TypeVar("T")


def submit(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Schedule `coro` on the portal's loop; the future can be waited on, or cancelled, from any thread."""
    return asyncio.run_coroutine_threadsafe(coro, portal.loop())


def call(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on the portal's loop and wait; a KeyboardInterrupt while waiting cancels it."""
    return portal.run(coro)
