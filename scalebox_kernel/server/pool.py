"""The warm pool: sandboxes started ahead of time (jail, home, kernels), handed to creates that any of them can honour.

A pooled sandbox is a sandbox like any other, made with the server's defaults and no record: nobody can list it,
reach it or know its id until a create takes it. The take gives it its record (a fresh token, the request's
metadata, timeout, env vars and limits) and it is never returned to the pool; the pool makes another in the
background. Until it is taken a pooled sandbox has the least CPU weight: it starts on what sandboxes in use leave
over. A create the pool cannot honour (a disk size, no internet, buckets) is made cold, as without a pool.

What the pool holds counts against `ServerSettings.pool_memory_mb`, measured in its sandboxes' cgroups: the pool
stops growing when one more sandbox (as big as the biggest it holds, or POOL_SANDBOX_ESTIMATE_MB before it has
measured one) would pass it. A server restart finds the pool's directories without records and removes them with
the other orphans: nothing of the pool outlives its server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..protocol.connect import ConnectError
from . import metrics
from .agent import SandboxAgent
from .settings import ServerSettings

log = logging.getLogger("scalebox_kernel.server")

#: MiB a pooled sandbox is assumed to take before one was measured.
POOL_SANDBOX_ESTIMATE_MB = 64
#: Seconds before the pool tries again after a sandbox failed to start, doubling up to RETRY_MAX.
RETRY_AFTER = 5.0
RETRY_MAX = 300.0
#: Seconds after a take before the pool starts a sandbox in its place: the create that took one, and its first
#: cell, run on a machine the next one's start does not share yet.
REFILL_AFTER_TAKE = 0.5


@dataclass
class PoolRequest:
    """What a create asks of a sandbox that the pool may or may not be able to give."""

    envs: dict[str, str]
    memory_mb: int
    cpu_count: int
    disk_mb: int | None
    allow_internet_access: bool
    object_storage: bool


class WarmPool:
    """Ready sandboxes of one server: `take()` one for a create, `close()` them all at the end."""

    def __init__(
        self,
        settings: ServerSettings,
        new_agent: Callable[[str], SandboxAgent],
        remove: Callable[[str, SandboxAgent], Awaitable[None]],
    ) -> None:
        self.settings = settings
        self._new_agent = new_agent
        self._remove = remove
        self._ready: list[SandboxAgent] = []
        self._starting = 0
        self._filler: asyncio.Task[None] | None = None
        self._closed = False
        self._measured_mb = 0.0  # the biggest pooled sandbox seen
        self._languages = list(settings.pool_languages)  # less those this server cannot run (said once)
        self._failures = 0  # fills failed in a row (the wait before the next one doubles)
        self.taken = 0
        self.made = 0
        self.problem = ""  # why the last fill failed, if it did

    @property
    def size(self) -> int:
        return max(0, self.settings.pool_size)

    # ---- filling ------------------------------------------------------------------------------------------------

    def refill(self, after: float = 0.0) -> None:
        """Fill the pool up to its size in the background (one filler at a time), starting `after` seconds from
        now."""
        if self._closed or self.size == 0 or (self._filler is not None and not self._filler.done()):
            return
        self._filler = asyncio.create_task(self._fill(after), name="scalebox-pool")

    def memory_mb(self) -> float:
        """What the pooled sandboxes use now, in MiB (their cgroups' count)."""
        total = 0.0
        for agent in self._ready:
            usage = agent.confinement.usage()
            if usage is not None and usage.memory_bytes is not None:
                used = usage.memory_bytes / (1024 * 1024)
                self._measured_mb = max(self._measured_mb, used)
                total += used
        return total

    def _fits(self) -> bool:
        """Whether one more pooled sandbox fits the pool's memory budget and the server's open-file limit; the
        pool leaves room for one more sandbox beside it, so that a create it cannot serve is never refused
        for descriptors the pool holds."""
        one = self._measured_mb or POOL_SANDBOX_ESTIMATE_MB
        fits_memory = self.memory_mb() + one * (self._starting + 1) <= self.settings.pool_memory_mb
        return fits_memory and metrics.descriptors_left_for(self._starting + 2)

    async def _fill(self, after: float = 0.0) -> None:
        if after:
            await asyncio.sleep(after)
        while not self._closed and len(self._ready) + self._starting < self.size and self._fits():
            self._starting += 1
            sandbox_id = "sbx-" + secrets.token_hex(8)
            agent = self._new_agent(sandbox_id)
            agent.confinement.set_background(True)  # it starts, and waits, on CPU no sandbox in use wants
            try:
                await agent.start()
                for language in list(self._languages):
                    try:
                        agent.contexts.registry.resolve(language)
                    except ConnectError as exc:  # not installed, or no such language: the pool goes on without it
                        log.warning("the warm pool starts no %s kernels: %s", language, exc.message)
                        self._languages.remove(language)
                        continue
                    await agent.contexts.warm(language)
            except asyncio.CancelledError:  # the server is stopping: nothing half-made stays
                await asyncio.shield(self.discard(agent))
                raise
            except Exception as exc:
                self.problem = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("the warm pool could not start a sandbox: %s", self.problem)
                await self.discard(agent)
                self._failures += 1
                await asyncio.sleep(min(RETRY_AFTER * 2 ** (self._failures - 1), RETRY_MAX))
                continue
            finally:
                self._starting -= 1
            if self._closed:
                await self.discard(agent)
                return
            self.problem = ""
            self._failures = 0
            self.made += 1
            self._ready.append(agent)

    async def discard(self, agent: SandboxAgent) -> None:
        """Stop and remove a pooled sandbox (one its create could not use after all, say)."""
        with contextlib.suppress(Exception):
            await agent.shutdown(f"sandbox {agent.sandbox_id} was not needed")
        try:
            await self._remove(agent.sandbox_id, agent)
        except Exception:
            log.exception("could not remove the pooled sandbox %s", agent.sandbox_id)

    # ---- taking -------------------------------------------------------------------------------------------------

    def can_honour(self, request: PoolRequest) -> bool:
        """Whether a pooled sandbox can be what this create asks for (else it is made cold)."""
        default_disk = self.settings.disk_mb or None
        return (
            request.allow_internet_access
            and not request.object_storage
            and (request.disk_mb is None or request.disk_mb == default_disk)
        )

    async def take(self, request: PoolRequest) -> SandboxAgent | None:
        """A ready sandbox made into what `request` asks for, or None (the create is then made cold)."""
        if self._closed or not self.can_honour(request):
            return None
        while self._ready:
            agent = self._ready.pop(0)
            self.refill(after=REFILL_AFTER_TAKE)
            if not agent.confinement.running:  # its jail died while it waited
                await self.discard(agent)
                continue
            agent.confinement.set_background(False)
            try:
                await agent.become(envs=request.envs, memory_mb=request.memory_mb, cpu_count=request.cpu_count)
            except asyncio.CancelledError:  # the create was given up: the sandbox is nobody's
                await asyncio.shield(self.discard(agent))
                raise
            except Exception as exc:  # a memory limit below what it uses already, say: made cold instead
                log.info("a pooled sandbox could not be given what a create asked (%s); making one cold", exc)
                await self.discard(agent)
                return None
            self.taken += 1
            return agent
        self.refill()
        return None

    # ---- the end ------------------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop filling, and stop and remove every pooled sandbox."""
        self._closed = True
        if self._filler is not None:
            self._filler.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._filler
        ready, self._ready = self._ready, []
        await asyncio.gather(*(self.discard(agent) for agent in ready))

    def status(self) -> dict[str, Any]:
        """What the pool holds now (GET /v1/pool)."""
        return {
            "size": self.size,
            "ready": len(self._ready),
            "starting": self._starting,
            "languages": list(self._languages),
            "memory_mb": round(self.memory_mb(), 1),
            "budget_mb": self.settings.pool_memory_mb,
            "made": self.made,
            "taken": self.taken,
            "problem": self.problem or None,
            "at": time.time(),
        }
