"""The sandbox manager: create, pause, resume, kill, timeouts and restarts, one SandboxAgent per live sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import metrics
from .agent import SandboxAgent
from .isolation.buckets import Bucket, BucketError, Credentials, unmount_all
from .isolation.disk import DiskImage
from .isolation.jail import clean_stale_links
from .isolation.sandbox import SandboxIsolation, object_storage_problem
from .isolation.tree import remove_path
from .isolation.uids import RECORD, release
from .pool import PoolRequest, WarmPool
from .settings import ServerSettings
from .store import PAUSED, RUNNING, TERMINATED, SandboxRecord, SandboxStore, iso
from .validation import MAX_ENV_BYTES, env_problem, map_problem, name_problem, range_problem

log = logging.getLogger("scalebox_kernel.server")

RESTART_REASON = "scalebox-local restarted"
#: Free space (MiB) on the data dir's filesystem that no sandbox's disk may be promised.
DISK_RESERVE_MB = 1024
#: Smallest memory and disk (MiB) a create request may ask for: a kernel does not start in less.
MIN_MEMORY_MB = 64
MIN_DISK_MB = 16
MAX_TEMPLATE_CHARS = 128
MAX_METADATA_ITEMS = 256
MAX_METADATA_KEY_CHARS = 256
MAX_METADATA_CHARS = 8192
MAX_ENV_ITEMS = 1024
#: Seconds before the reaper retries an expiry or kill that failed, doubling up to the cap.
RETRY_FIRST = 0.5
RETRY_MAX = 60.0


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


class TooManyOpenFiles(SandboxError):
    """The server's process is too near its open-file limit to hold another sandbox."""

    status = 503
    code: str | int = 503
    connect_code = "resource_exhausted"


def check_descriptors(starting: int) -> None:
    """Refuse a new sandbox, clearly, before the server runs out of file descriptors (running out halfway would
    fail somewhere in a library, with its own words); `starting`: the other sandboxes being made right now."""
    if not metrics.descriptors_left_for(starting + 1):
        used, limit = metrics.descriptors() or (0, 0)
        raise TooManyOpenFiles(
            f"scalebox-local has {used} of its {limit} file descriptors open, too few for another sandbox (one "
            f"takes up to {metrics.SANDBOX_FDS}): kill sandboxes that are no longer needed, or start the server "
            "with a higher limit (ulimit -n)"
        )


class StartFailed(SandboxError):
    status = 500
    code: str | int = 500
    connect_code = "internal"


class CleanupFailed(StartFailed):
    """A kill that could not finish; the reaper keeps retrying it."""


class NotEnoughDisk(SandboxError):
    """The host cannot hold the disk a sandbox asks for."""

    status = 507
    code: str | int = 507
    connect_code = "resource_exhausted"


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
    disk_mb: int | None = None
    #: Buckets to mount, each with its keys (never kept in the record).
    object_storage: list[tuple[Bucket, Credentials]] = field(default_factory=list, repr=False)

    def validate(self, settings: ServerSettings) -> None:
        """Every field in its range (BadRequest naming the first that is not), before anything is created."""
        problem = (
            range_problem("timeout", self.timeout, 1, settings.max_timeout, "seconds")
            or range_problem("cpu_count", self.cpu_count, 1, settings.max_cpu_count, "CPUs")
            or range_problem("memory_mb", self.memory_mb, MIN_MEMORY_MB, settings.max_memory_mb, "MiB")
            or range_problem("disk_mb", self.disk_mb, MIN_DISK_MB, settings.max_disk_mb, "MiB")
            or name_problem("template", self.template, MAX_TEMPLATE_CHARS)
            or map_problem("metadata", self.metadata, MAX_METADATA_ITEMS, MAX_METADATA_KEY_CHARS, MAX_METADATA_CHARS)
            or map_problem("env_vars", self.envs, MAX_ENV_ITEMS, MAX_ENV_BYTES, MAX_ENV_BYTES)
            or env_problem("env_vars", self.envs)
        )
        if problem:
            raise BadRequest(problem)
        if self.object_storage:
            problem = object_storage_problem(settings)
            if problem:
                raise BadRequest(f"object_storage cannot be mounted here: {problem}")


@dataclass
class _Retry:
    """A reaper step that failed for one sandbox: how often, and when to try it again."""

    attempts: int = 0
    at: float = 0.0


_STEP_VERBS = {"end": "terminate", "expire": "expire", "stop": "stop the processes of"}


def _describe(exc: BaseException) -> str:
    """An exception in a few words, without the host paths an OSError carries."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}"[:300]


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
        self._cold_starts = 0  # sandboxes being made from nothing right now (their descriptors are not open yet)
        self._reaper: asyncio.Task[None] | None = None
        self._ending: dict[str, str] = {}  # sandbox id -> "expired"/"killed", from the start of its termination
        self._retries: dict[str, _Retry] = {}  # sandbox id -> its failed expiry, kill or stop, to try again
        self.pool = WarmPool(settings, self._pool_agent, self._remove_files)

    # ---- lifetime of the manager -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the store; expire what ran out while we were down; rebuild agents of running sandboxes."""
        now = time.time()
        for record in self.store.load_all():
            self._records[record.sandbox_id] = record
            if record.state == TERMINATED:
                continue
            self._lost[record.sandbox_id] = RESTART_REASON
            if record.state == PAUSED:  # it starts when resumed; what the last server left mounted goes now
                try:
                    await unmount_all(self._tree(record.sandbox_id))
                except OSError as exc:
                    log.warning("sandbox %s: could not unmount its buckets: %s", record.sandbox_id, exc)
            if record.state == RUNNING and record.end_at <= now:
                await self._settle(record, "expire", self._expire(record))
            elif record.state == RUNNING:
                try:
                    await self._start_agent(record)
                except Exception:
                    log.exception("could not restart sandbox %s; marking it terminated", record.sandbox_id)
                    self._ending[record.sandbox_id] = "failed to restart"
                    await self._settle(record, "end", self._end(record))
        await self._sweep_orphans()
        live = {sid for sid, record in self._records.items() if record.state == RUNNING}
        await asyncio.to_thread(clean_stale_links, self.settings.data_path, live)
        self._reaper = asyncio.create_task(self._reap_forever(), name="scalebox-reaper")
        self.pool.refill()

    async def _sweep_orphans(self) -> None:
        """Remove sandbox directories that no record knows (a create cut short by a crash): their disk images,
        their uids, their files."""
        sandboxes = self.settings.data_path / "sandboxes"
        known = {sid for sid, record in self._records.items() if record.state != TERMINATED}
        with contextlib.suppress(FileNotFoundError):
            for entry in sorted(os.listdir(sandboxes)):
                if entry.startswith("sbx-") and entry not in known:
                    try:
                        await self._remove_files(entry, None)
                        log.info("removed the files of sandbox %s, which no record knew", entry)
                    except Exception as exc:
                        log.warning("could not remove the orphaned sandbox directory %s: %s", entry, exc)

    async def close(self) -> None:
        """Stop every agent (kernels, commands); records stay as they are for the next start. The pool's sandboxes
        go (they have no records)."""
        await self.pool.close()
        if self._reaper:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        agents = list(self._agents.items())
        self._agents.clear()
        reason = "scalebox-local stopped"
        await asyncio.gather(*(self._shutdown_agent(sid, agent, reason=reason) for sid, agent in agents))
        self.store.close()

    def isolation(self) -> dict[str, Any]:
        """What protections sandboxes get on this server (asked of an isolation that is never started)."""
        root = self.settings.sandbox_root("probe")
        return SandboxIsolation(self.settings, sandbox_id="probe", root=root, private_dir=root.parent).info()

    # ---- lookups ------------------------------------------------------------------------------------------------

    def domain(self, sandbox_id: str) -> str:
        return f"{self.public_host}/sbx/{sandbox_id}"

    def state(self, record: SandboxRecord, now: float | None = None) -> str:
        """The state a sandbox is in right now. One whose time ran out reads as expired (or, with auto_pause,
        paused) at once, and one being terminated as terminated, before the reaper's work is done."""
        if record.state != RUNNING:
            return record.state
        if record.sandbox_id in self._ending:
            return TERMINATED
        if record.end_at <= (now or time.time()):
            return PAUSED if record.auto_pause else TERMINATED
        return RUNNING

    def get(self, sandbox_id: str) -> SandboxRecord:
        """The record of a live (running or paused) sandbox; SandboxNotFound/SandboxExpired otherwise."""
        record = self._records.get(sandbox_id)
        if record is None:
            raise SandboxNotFound(f"sandbox {sandbox_id} not found")
        if self.state(record) == TERMINATED:
            raise self._gone(record)
        return record

    def inspect(self, sandbox_id: str) -> SandboxRecord:
        """Like `get`, for get-info: a sandbox whose expiry or kill keeps failing is still shown (terminated, with
        its `problem`) until its clean-up succeeds."""
        record = self._records.get(sandbox_id)
        if record is not None and record.problem and record.state != TERMINATED:
            return record
        return self.get(sandbox_id)

    def _gone(self, record: SandboxRecord) -> SandboxNotFound:
        sandbox_id = record.sandbox_id
        reason = record.reason if record.state == TERMINATED else self._ending.get(sandbox_id, "expired")
        when = record.ended_at if record.state == TERMINATED else min(record.end_at, time.time())
        if reason == "expired":
            return SandboxExpired(f"sandbox {sandbox_id} expired at {iso(when)}; its state is gone")
        return SandboxNotFound(f"sandbox {sandbox_id} not found (it was {reason or 'killed'} at {iso(when)})")

    def agent(self, sandbox_id: str) -> SandboxAgent:
        """The agent of a running sandbox; paused, expired and unknown sandboxes raise."""
        record = self.get(sandbox_id)
        if self.state(record) == PAUSED:
            raise SandboxPaused(f"sandbox {sandbox_id} is paused; connect to resume it")
        agent = self._agents.get(sandbox_id)
        if agent is None:  # running on paper while its processes are being stopped
            raise self._gone(record)
        return agent

    def token_of(self, sandbox_id: str) -> str | None:
        record = self._records.get(sandbox_id)
        return record.token if record else None

    def list(self, states: set[str], metadata: dict[str, str]) -> list[SandboxRecord]:
        now = time.time()
        return [
            r
            for r in self._records.values()
            if self.state(r, now) in states and all(r.metadata.get(k) == v for k, v in metadata.items())
        ]

    # ---- lifecycle ----------------------------------------------------------------------------------------------

    async def create(self, spec: CreateSpec) -> SandboxRecord:
        spec.validate(self.settings)
        warm = await self.pool.take(
            PoolRequest(
                envs=spec.envs,
                memory_mb=spec.memory_mb or self.settings.memory_mb,
                cpu_count=spec.cpu_count or self.settings.cpu_count,
                disk_mb=spec.disk_mb,
                allow_internet_access=spec.allow_internet_access,
                object_storage=bool(spec.object_storage),
            )
        )
        record = self._record(spec, warm.sandbox_id if warm is not None else "sbx-" + secrets.token_hex(8))
        if warm is not None:
            record.warm = True
            try:
                self._check_disk(warm)  # the host's disk may have filled since the pool made it
                async with self._lock(record.sandbox_id):
                    self.store.save(record)
                    self._agents[record.sandbox_id] = warm
                    self._records[record.sandbox_id] = record
            except BaseException:
                await asyncio.shield(self.pool.discard(warm))
                raise
            self._wake.set()
            return record
        return await self._create_cold(spec, record)

    def _record(self, spec: CreateSpec, sandbox_id: str) -> SandboxRecord:
        now = time.time()
        return SandboxRecord(
            sandbox_id=sandbox_id,
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
            disk_mb=spec.disk_mb,
            object_storage=[bucket.to_json() for bucket, _ in spec.object_storage],
        )

    async def _create_cold(self, spec: CreateSpec, record: SandboxRecord) -> SandboxRecord:
        """Make a sandbox from nothing (what the pool could not give)."""
        check_descriptors(self._cold_starts)  # a pooled one holds its descriptors already
        self._cold_starts += 1
        try:
            return await self._start_cold(spec, record)
        finally:
            self._cold_starts -= 1

    async def _start_cold(self, spec: CreateSpec, record: SandboxRecord) -> SandboxRecord:
        agent = self._new_agent(record, [credentials for _, credentials in spec.object_storage])
        if not spec.allow_internet_access and "network" in agent.isolation().get("missing", []):
            raise BadRequest(
                "allow_internet_access=false needs network isolation, which this scalebox-local cannot provide "
                f"(isolation: {agent.isolation().get('mode', 'none')})"
            )
        self._check_disk(agent)
        async with self._lock(record.sandbox_id):
            try:
                await agent.start()
                self.store.save(record)
            except Exception as exc:
                await self._shutdown_agent(record.sandbox_id, agent)
                await self._remove_files(record.sandbox_id, agent)
                if isinstance(exc, BucketError):  # the request's to fix: nothing of the sandbox is left
                    log.info("sandbox %s not created: object_storage %s", record.sandbox_id, exc.strerror)
                    raise BadRequest(f"object_storage {exc.strerror}") from None
                log.exception("sandbox %s failed to start", record.sandbox_id)
                raise StartFailed(f"sandbox failed to start: {exc}") from exc
            self._agents[record.sandbox_id] = agent
            self._records[record.sandbox_id] = record
        self._wake.set()
        return record

    def _check_disk(self, agent: SandboxAgent) -> None:
        """Refuse a disk limit the host's filesystem cannot hold now (the images are sparse: each takes what it
        is filled with, so no single sandbox may be promised more than there is)."""
        wanted = agent.confinement.disk_limit_mb()
        if not wanted:
            return
        free = shutil.disk_usage(self.settings.data_path).free // (1024 * 1024)
        if wanted + DISK_RESERVE_MB > free:
            raise NotEnoughDisk(
                f"a sandbox with disk_mb={wanted} does not fit: the server's disk has {free} MiB free and keeps "
                f"{DISK_RESERVE_MB} MiB for itself; ask for less disk_mb (or free space on the server)"
            )

    async def kill(self, sandbox_id: str) -> None:
        """Terminate a sandbox (again, at once, when an earlier kill of it failed); CleanupFailed if it cannot."""
        record = self._records.get(sandbox_id)
        if record is None or sandbox_id not in self._ending:
            record = self.get(sandbox_id)
        async with self._lock(sandbox_id):
            if record.state == TERMINATED:
                return
            self._ending[sandbox_id] = "killed"
            try:
                await self._end(record)
            except Exception as exc:
                self._failed(record, "end", exc)
                raise CleanupFailed(
                    f"sandbox {sandbox_id} could not be killed ({_describe(exc)}); scalebox-local keeps trying"
                ) from None
            self._succeeded(record)

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
        self.get(sandbox_id)
        if timeout is not None:
            self._check_timeout(timeout)
        async with self._lock(sandbox_id):
            record = self.get(sandbox_id)  # it may have ended while we waited
            now = time.time()
            if record.state == PAUSED:
                await self._resume(record)
                record.timeout = timeout or record.timeout
                record.end_at = now + record.timeout
            elif self.state(record, now) == PAUSED:  # ran out with auto_pause, not paused yet: it simply goes on
                record.timeout = timeout or record.timeout
                record.end_at = now + record.timeout
                self._retries.pop(sandbox_id, None)
                record.problem = ""
            elif timeout is not None and now + timeout > record.end_at:
                record.timeout = timeout
                record.end_at = now + timeout
            self.store.save(record)
        self._wake.set()
        return record

    async def pause(self, sandbox_id: str) -> SandboxRecord:
        self.get(sandbox_id)
        async with self._lock(sandbox_id):
            record = self.get(sandbox_id)  # it may have ended while we waited
            if record.state == PAUSED:
                raise Conflict(f"sandbox {sandbox_id} is already paused")
            await self._pause(record, "paused")
        return record

    async def measure(self, sandbox_id: str) -> dict[str, Any]:
        record = self.get(sandbox_id)
        agent = self._agents.get(sandbox_id)
        usage = agent.confinement.usage if agent is not None and agent.confinement.active else None
        disk = agent.confinement.disk_usage() if agent is not None else None
        return await metrics.measure(record, self.settings.sandbox_root(sandbox_id), usage=usage, disk=disk)

    # ---- internals ----------------------------------------------------------------------------------------------

    def _check_timeout(self, seconds: int) -> None:
        if seconds < 1 or seconds > self.settings.max_timeout:
            raise BadRequest(f"timeout must be between 1 and {self.settings.max_timeout} seconds, not {seconds}")

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    def _tree(self, sandbox_id: str) -> Path:
        """The sandbox's directory: its root tree and, beside it, its private files."""
        return self.settings.sandbox_root(sandbox_id).parent

    def _pool_agent(self, sandbox_id: str) -> SandboxAgent:
        """A sandbox of the warm pool: the server's defaults, no record yet."""
        return SandboxAgent(
            sandbox_id=sandbox_id,
            root=self.settings.sandbox_root(sandbox_id),
            envs={},
            settings=self.settings,
            memory_mb=self.settings.memory_mb,
            cpu_count=self.settings.cpu_count,
            disk_mb=None,
            allow_internet_access=True,
        )

    def _new_agent(self, record: SandboxRecord, credentials: Sequence[Credentials] = ()) -> SandboxAgent:
        return SandboxAgent(
            sandbox_id=record.sandbox_id,
            root=self.settings.sandbox_root(record.sandbox_id),
            envs=dict(record.envs),
            settings=self.settings,
            memory_mb=record.memory_mb,
            cpu_count=record.cpu_count,
            disk_mb=record.disk_mb,
            allow_internet_access=record.allow_internet_access,
            buckets=[Bucket.from_json(item) for item in record.object_storage],
            credentials=credentials,
        )

    async def _start_agent(self, record: SandboxRecord) -> None:
        agent = self._new_agent(record)
        try:
            await agent.start()
        except BaseException:
            await self._shutdown_agent(record.sandbox_id, agent)  # its jail, network and disk, half made
            raise
        reason = self._lost.pop(record.sandbox_id, None)
        if reason:
            agent.mark_state_lost(reason)
        self._agents[record.sandbox_id] = agent

    async def _shutdown_agent(
        self, sandbox_id: str, agent: SandboxAgent, *, paused: bool = False, reason: str = "stopped"
    ) -> None:
        if paused:
            with contextlib.suppress(Exception):
                await agent.resume()  # stopped processes cannot shut down cleanly
        try:
            await agent.shutdown(f"sandbox {sandbox_id} {reason}")
        except Exception:
            log.exception("error while shutting down sandbox %s", sandbox_id)

    async def _remove_files(self, sandbox_id: str, agent: SandboxAgent | None) -> None:
        """Delete a dead sandbox's directory (tree, disk image, private files) and give back its uid. Without an
        agent (a server restart, a long pause) its disk image may still be mounted: that goes first."""
        private = self._tree(sandbox_id)
        await unmount_all(private)  # before anything is removed: never a bucket's objects
        if agent is not None:
            agent.release()
        else:
            await DiskImage(private, self.settings.sandbox_root(sandbox_id), 0).unmount()
            await asyncio.to_thread(release, private / RECORD)
        await asyncio.to_thread(remove_path, private)

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
            await self._shutdown_agent(record.sandbox_id, agent, paused=record.state == PAUSED, reason=reason)
        await self._remove_files(record.sandbox_id, agent)
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
            self._ending[record.sandbox_id] = "expired"
            await self._end(record)

    async def _end(self, record: SandboxRecord) -> None:
        """Terminate a sandbox for the reason in `_ending` (kept there, and so retried, if this fails)."""
        await self._terminate(record, self._ending[record.sandbox_id])
        del self._ending[record.sandbox_id]

    # ---- the reaper ---------------------------------------------------------------------------------------------

    async def _reap_forever(self) -> None:
        """Expire sandboxes when their time is up, stop long-paused ones; a step that fails is retried with an
        exponential back-off, logged once and shown as the sandbox's `problem`."""
        while True:
            for record in list(self._records.values()):
                step = self._reap_step(record, time.time())
                if step is not None:
                    async with self._lock(record.sandbox_id):
                        if self._reap_step(record, time.time()) == step:  # nobody got there first
                            await self._settle(record, step, self._reap(record, step))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.05, self._next_reap() - time.time()))

    def _reap_step(self, record: SandboxRecord, now: float) -> str | None:
        """What the reaper has to do for a sandbox now: "end" (finish a termination that failed), "expire",
        "stop" (a long-paused one's processes), or nothing."""
        retry = self._retries.get(record.sandbox_id)
        if record.state == TERMINATED or (retry is not None and retry.at > now):
            return None
        if record.sandbox_id in self._ending:
            return "end"
        if self._due(record, now):
            return "expire"
        if self._should_stop_paused(record, now):
            return "stop"
        return None

    async def _reap(self, record: SandboxRecord, step: str) -> None:
        if step == "end":
            await self._end(record)
        elif step == "expire":
            await self._expire(record)
        else:
            await self._stop_paused(record)

    def _next_reap(self) -> float:
        """When the reaper has something to do next (at most 5 s from now, for long-paused sandboxes)."""
        times = [time.time() + 5.0, *(retry.at for retry in self._retries.values())]
        times += [r.end_at for r in self._records.values() if r.state == RUNNING and r.sandbox_id not in self._retries]
        return min(times)

    async def _settle(self, record: SandboxRecord, step: str, work: Awaitable[None]) -> None:
        """Run one reaper step, noting its failure (for a retry) or its success."""
        try:
            await work
        except Exception as exc:
            self._failed(record, step, exc)
        else:
            self._succeeded(record)

    def _failed(self, record: SandboxRecord, step: str, exc: Exception) -> None:
        """Schedule the step again (0.5 s, doubling, at most a minute); log it the first time only."""
        sandbox_id = record.sandbox_id
        retry = self._retries.setdefault(sandbox_id, _Retry())
        retry.attempts += 1
        delay = min(RETRY_FIRST * 2 ** (retry.attempts - 1), RETRY_MAX)
        retry.at = time.time() + delay
        verb = _STEP_VERBS[step]
        if retry.attempts == 1:
            # A file system still busy, a disk full: one line says it; anything unexpected gets its traceback.
            detail = None if isinstance(exc, OSError) else exc
            log.warning(
                "could not %s sandbox %s (%s); retrying with back-off",
                verb,
                sandbox_id,
                _describe(exc),
                exc_info=detail,
            )
        else:
            log.debug("could not %s sandbox %s (attempt %d)", verb, sandbox_id, retry.attempts)
        times = "once" if retry.attempts == 1 else f"{retry.attempts} times"
        record.problem = f"could not {verb} it: {_describe(exc)}; tried {times}, next in {delay:g} s"
        with contextlib.suppress(Exception):
            self.store.save(record)

    def _succeeded(self, record: SandboxRecord) -> None:
        retry = self._retries.pop(record.sandbox_id, None)
        if retry is not None:
            log.info("sandbox %s: done after %d failed attempts", record.sandbox_id, retry.attempts)
        if record.problem:
            record.problem = ""
            with contextlib.suppress(Exception):
                self.store.save(record)

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
        reason = "was paused too long, so its processes were stopped"
        await self._shutdown_agent(record.sandbox_id, self._agents.pop(record.sandbox_id), paused=True, reason=reason)
        self._lost[record.sandbox_id] = (
            f"the sandbox was paused for more than {self.settings.pause_stop_after:.0f} s, so its processes were "
            "stopped to free memory"
        )
