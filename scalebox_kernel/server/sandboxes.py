"""The sandbox manager: create, pause, resume, kill, timeouts and restarts, one SandboxAgent per live sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import metrics
from .agent import SandboxAgent
from .isolation.sandbox import SandboxIsolation
from .settings import ServerSettings
from .store import PAUSED, RUNNING, TERMINATED, SandboxRecord, SandboxStore, iso

log = logging.getLogger("scalebox_kernel.server")

RESTART_REASON = "scalebox-local restarted"


class SandboxError(Exception):
    """A control-plane error: HTTP status, the `code` of the REST error body, and the Connect code for RPCs."""

    status = 400
    code: str | int = 400
    connect_code = "invalid_argument"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(SandboxError):
    pass


class StartFailed(SandboxError):
    status = 500
    code: str | int = 500
    connect_code = "internal"


class SandboxNotFound(SandboxError):
    status = 404
    code: str | int = 404
    connect_code = "not_found"


class SandboxExpired(SandboxNotFound):
    code = "sandbox_expired"


class Conflict(SandboxError):
    status = 409
    code: str | int = 409
    connect_code = "failed_precondition"


class SandboxPaused(Conflict):
    pass


@dataclass
class CreateSpec:
    """A validated create request (PROTOCOL.md 1.5)."""

    template: str = "base"
    timeout: int = 300
    metadata: dict[str, str] = field(default_factory=dict)
    envs: dict[str, str] = field(default_factory=dict)
    auto_pause: bool = False
    allow_internet_access: bool = True
    secure: bool = False
    cpu_count: int | None = None
    memory_mb: int | None = None


class SandboxManager:
    """Owns every sandbox record and agent of this server, and the task that expires sandboxes."""

    def __init__(self, settings: ServerSettings, *, public_host: str = "127.0.0.1") -> None:
        self.settings = settings
        self.public_host = public_host
        self.store = SandboxStore(settings.data_path / "scalebox-local.db")
        self._records: dict[str, SandboxRecord] = {}
        self._agents: dict[str, SandboxAgent] = {}
        self._lost: dict[str, str] = {}  # sandbox id -> why its kernels' state is gone (told on next Execute)
        self._locks: dict[str, asyncio.Lock] = {}
        self._wake = asyncio.Event()
        self._reaper: asyncio.Task[None] | None = None

    # ---- lifetime of the manager -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the store; expire what ran out while we were down; rebuild agents of running sandboxes."""
        now = time.time()
        for record in self.store.load_all():
            self._records[record.sandbox_id] = record
            if record.state == TERMINATED:
                continue
            self._lost[record.sandbox_id] = RESTART_REASON
            if record.state == RUNNING and record.end_at <= now:
                await self._expire(record)
            elif record.state == RUNNING:
                try:
                    await self._start_agent(record)
                except Exception:
                    log.exception("could not restart sandbox %s; marking it terminated", record.sandbox_id)
                    await self._terminate(record, "failed to restart")
        self._reaper = asyncio.create_task(self._reap_forever(), name="scalebox-reaper")

    async def close(self) -> None:
        """Stop every agent (kernels, commands); records stay as they are for the next start."""
        if self._reaper:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        agents = list(self._agents.items())
        self._agents.clear()
        await asyncio.gather(*(self._shutdown_agent(sid, agent) for sid, agent in agents))
        self.store.close()

    def isolation(self) -> dict[str, Any]:
        """What protections sandboxes get on this server (asked of an isolation that is never started)."""
        root = self.settings.sandbox_root("probe")
        return SandboxIsolation(self.settings, sandbox_id="probe", root=root, private_dir=root.parent).info()

    # ---- lookups ------------------------------------------------------------------------------------------------

    def domain(self, sandbox_id: str) -> str:
        return f"{self.public_host}/sbx/{sandbox_id}"

    def get(self, sandbox_id: str) -> SandboxRecord:
        """The record of a live (running or paused) sandbox; SandboxNotFound/SandboxExpired otherwise."""
        record = self._records.get(sandbox_id)
        if record is None:
            raise SandboxNotFound(f"sandbox {sandbox_id} not found")
        if record.state == TERMINATED:
            if record.expired:
                raise SandboxExpired(f"sandbox {sandbox_id} expired at {iso(record.ended_at)}; its state is gone")
            raise SandboxNotFound(
                f"sandbox {sandbox_id} not found (it was {record.reason or 'killed'} at {iso(record.ended_at)})"
            )
        return record

    def agent(self, sandbox_id: str) -> SandboxAgent:
        """The agent of a running sandbox; paused, expired and unknown sandboxes raise."""
        record = self.get(sandbox_id)
        agent = self._agents.get(sandbox_id)
        if record.state == PAUSED or agent is None:
            raise SandboxPaused(f"sandbox {sandbox_id} is paused; connect to resume it")
        return agent

    def token_of(self, sandbox_id: str) -> str | None:
        record = self._records.get(sandbox_id)
        return record.token if record else None

    def list(self, states: set[str], metadata: dict[str, str]) -> list[SandboxRecord]:
        return [
            r
            for r in self._records.values()
            if r.state in states and all(r.metadata.get(k) == v for k, v in metadata.items())
        ]

    # ---- lifecycle ----------------------------------------------------------------------------------------------

    async def create(self, spec: CreateSpec) -> SandboxRecord:
        self._check_timeout(spec.timeout)
        now = time.time()
        record = SandboxRecord(
            sandbox_id="sbx-" + secrets.token_hex(8),
            template=spec.template,
            token=secrets.token_urlsafe(32),
            created_at=now,
            timeout=spec.timeout,
            end_at=now + spec.timeout,
            metadata=spec.metadata,
            envs=spec.envs,
            auto_pause=spec.auto_pause,
            allow_internet_access=spec.allow_internet_access,
            secure=spec.secure,
            cpu_count=spec.cpu_count or self.settings.cpu_count,
            memory_mb=spec.memory_mb or self.settings.memory_mb,
        )
        agent = self._new_agent(record)
        if not spec.allow_internet_access and "network" in agent.isolation().get("missing", []):
            raise BadRequest(
                "allow_internet_access=false needs network isolation, which this scalebox-local cannot provide "
                f"(isolation: {agent.isolation().get('mode', 'none')})"
            )
        async with self._lock(record.sandbox_id):
            try:
                await agent.start()
            except Exception as exc:
                await self._shutdown_agent(record.sandbox_id, agent)
                shutil.rmtree(self._tree(record.sandbox_id), ignore_errors=True)
                log.exception("sandbox %s failed to start", record.sandbox_id)
                raise StartFailed(f"sandbox failed to start: {exc}") from exc
            self._agents[record.sandbox_id] = agent
            self._records[record.sandbox_id] = record
            self.store.save(record)
        self._wake.set()
        return record

    async def kill(self, sandbox_id: str) -> None:
        record = self.get(sandbox_id)
        async with self._lock(sandbox_id):
            if record.state != TERMINATED:
                await self._terminate(record, "killed")

    def set_timeout(self, sandbox_id: str, seconds: int) -> SandboxRecord:
        """Extend or shorten the sandbox's life to `seconds` from now."""
        record = self.get(sandbox_id)
        self._check_timeout(seconds)
        record.timeout = seconds
        record.end_at = time.time() + seconds
        self.store.save(record)
        self._wake.set()
        return record

    async def connect(self, sandbox_id: str, timeout: int | None) -> SandboxRecord:
        """Resume a paused sandbox (new timeout); for a running one only a longer timeout changes anything."""
        record = self.get(sandbox_id)
        if timeout is not None:
            self._check_timeout(timeout)
        async with self._lock(sandbox_id):
            now = time.time()
            if record.state == PAUSED:
                await self._resume(record)
                record.timeout = timeout or record.timeout
                record.end_at = now + record.timeout
            elif timeout is not None and now + timeout > record.end_at:
                record.timeout = timeout
                record.end_at = now + timeout
            self.store.save(record)
        self._wake.set()
        return record

    async def pause(self, sandbox_id: str) -> SandboxRecord:
        record = self.get(sandbox_id)
        async with self._lock(sandbox_id):
            if record.state == PAUSED:
                raise Conflict(f"sandbox {sandbox_id} is already paused")
            await self._pause(record, "paused")
        return record

    async def measure(self, sandbox_id: str) -> dict[str, Any]:
        record = self.get(sandbox_id)
        agent = self._agents.get(sandbox_id)
        usage = agent.confinement.usage if agent is not None and agent.confinement.active else None
        return await metrics.measure(record, self.settings.sandbox_root(sandbox_id), usage=usage)

    # ---- internals ----------------------------------------------------------------------------------------------

    def _check_timeout(self, seconds: int) -> None:
        if seconds < 1 or seconds > self.settings.max_timeout:
            raise BadRequest(f"timeout must be between 1 and {self.settings.max_timeout} seconds, not {seconds}")

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    def _tree(self, sandbox_id: str) -> Path:
        """The sandbox's directory: its root tree and, beside it, its private files."""
        return self.settings.sandbox_root(sandbox_id).parent

    def _new_agent(self, record: SandboxRecord) -> SandboxAgent:
        return SandboxAgent(
            sandbox_id=record.sandbox_id,
            root=self.settings.sandbox_root(record.sandbox_id),
            envs=dict(record.envs),
            settings=self.settings,
            memory_mb=record.memory_mb,
            cpu_count=record.cpu_count,
            allow_internet_access=record.allow_internet_access,
        )

    async def _start_agent(self, record: SandboxRecord) -> None:
        agent = self._new_agent(record)
        await agent.start()
        reason = self._lost.pop(record.sandbox_id, None)
        if reason:
            agent.mark_state_lost(reason)
        self._agents[record.sandbox_id] = agent

    async def _shutdown_agent(self, sandbox_id: str, agent: SandboxAgent, *, paused: bool = False) -> None:
        if paused:
            with contextlib.suppress(Exception):
                await agent.resume()  # stopped processes cannot shut down cleanly
        try:
            await agent.shutdown()
        except Exception:
            log.exception("error while shutting down sandbox %s", sandbox_id)

    async def _pause(self, record: SandboxRecord, reason: str) -> None:
        agent = self._agents.get(record.sandbox_id)
        if agent is not None:
            await agent.pause()
        record.state = PAUSED
        record.paused_at = time.time()
        record.reason = reason
        self.store.save(record)

    async def _resume(self, record: SandboxRecord) -> None:
        agent = self._agents.get(record.sandbox_id)
        if agent is None:  # its processes are gone (server restart, or stopped to free memory)
            await self._start_agent(record)
        else:
            await agent.resume()
        record.state = RUNNING
        record.paused_at = None
        record.reason = ""

    async def _terminate(self, record: SandboxRecord, reason: str) -> None:
        agent = self._agents.pop(record.sandbox_id, None)
        if agent is not None:
            await self._shutdown_agent(record.sandbox_id, agent, paused=record.state == PAUSED)
        await asyncio.to_thread(shutil.rmtree, self._tree(record.sandbox_id), True)
        record.state = TERMINATED
        record.reason = reason
        record.ended_at = time.time()
        self._lost.pop(record.sandbox_id, None)
        self.store.save(record)
        log.info("sandbox %s %s", record.sandbox_id, reason)

    async def _expire(self, record: SandboxRecord) -> None:
        if record.auto_pause:
            await self._pause(record, "timeout")
        else:
            await self._terminate(record, "expired")

    async def _reap_forever(self) -> None:
        while True:
            now = time.time()
            for record in list(self._records.values()):
                if not (self._due(record, now) or self._should_stop_paused(record, now)):
                    continue
                try:
                    async with self._lock(record.sandbox_id):
                        if self._due(record, time.time()):
                            await self._expire(record)
                        elif self._should_stop_paused(record, time.time()):
                            await self._stop_paused(record)
                except Exception:
                    log.exception("could not expire sandbox %s", record.sandbox_id)
            running = [r.end_at for r in self._records.values() if r.state == RUNNING]
            wait = min([*running, now + 5.0]) - time.time()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.05, wait))

    @staticmethod
    def _due(record: SandboxRecord, now: float) -> bool:
        return record.state == RUNNING and record.end_at <= now

    def _should_stop_paused(self, record: SandboxRecord, now: float) -> bool:
        limit = self.settings.pause_stop_after
        return bool(
            limit
            and record.state == PAUSED
            and record.sandbox_id in self._agents
            and record.paused_at is not None
            and now - record.paused_at > limit
        )

    async def _stop_paused(self, record: SandboxRecord) -> None:
        """Free the memory of a long-paused sandbox: stop its processes, keep its files."""
        await self._shutdown_agent(record.sandbox_id, self._agents.pop(record.sandbox_id), paused=True)
        self._lost[record.sandbox_id] = (
            f"the sandbox was paused for more than {self.settings.pause_stop_after:.0f} s, so its processes were "
            "stopped to free memory"
        )
