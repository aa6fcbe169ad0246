"""SandboxSession: one sandbox and what we know about it, created lazily, re-attached by id, resumed when paused."""

from __future__ import annotations

import asyncio
import contextlib
import posixpath
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from ..client import AsyncSandbox, Context, Execution, SandboxInfo
from ..config import ScaleboxConfig
from ..errors import (
    CommandExitError,
    ExecutionTimeout,
    InvalidArgument,
    NotFound,
    SandboxExpired,
    SandboxNotFound,
    ScaleboxError,
    ServerUnavailable,
)
from ..language_names import canonical
from ._packages import PYTHON_PROBE, R_PROBE, install_command, parse_probe, run_install
from ._progress import ProgressCallback, Tracker
from ._state import SessionState, content_hash, load_state, save_state

#: Metadata key put on every sandbox a session creates, so that `Session.list()` finds them from any process.
SESSION_METADATA_KEY = "scalebox_session"
WORKSPACE = "/workspace"
#: A file of at least PROGRESS_BYTES reports its upload every PROGRESS_EVERY seconds.
PROGRESS_BYTES = 4 * 1024 * 1024
PROGRESS_EVERY = 0.5
#: A session's sandbox is renewed when less than this many seconds remain (the seed SDK's 120 s).
RENEW_BELOW_S = 120
INSTALL_TIMEOUT_S = 900


class Attach(str, Enum):  # noqa: UP042 (the contract names a str Enum)
    """How `SandboxSession.open` came by its sandbox."""

    CREATED = "created"  # a new sandbox (no id given)
    ATTACHED = "attached"  # the sandbox with that id was running
    RESUMED = "resumed"  # it was paused and has been resumed (state kept)
    REPLACED = "replaced"  # the id was unknown/expired/killed: a NEW sandbox was created; state was lost


class SandboxSession:
    """One sandbox and what we know about it: its code contexts per language, packages, uploaded files."""

    def __init__(
        self,
        sandbox: AsyncSandbox,
        attach: Attach,
        state: SessionState,
        config: ScaleboxConfig,
        *,
        timeout: int,
        notice: str | None = None,
    ) -> None:
        self.sandbox = sandbox
        self.session_id: str = sandbox.sandbox_id
        self.attach = attach
        self.notice = notice
        self.state = state
        self.config = config
        self.timeout = timeout
        self.pinned = False  # keep_alive() set the end explicitly
        self.install_summary = ""  # the installer's own words on what the last install installed
        self._contexts: dict[str, Context] = {}
        self._probes: dict[str, dict[str, Any]] = {}
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SandboxSession({self.session_id!r}, attach={self.attach.value})"

    # ------------------------------------------------------------------------------------------ opening

    @classmethod
    async def open(
        cls,
        session_id: str | None = None,
        *,
        config: ScaleboxConfig | None = None,
        timeout: int | None = None,
        metadata: dict[str, str] | None = None,
        envs: dict[str, str] | None = None,
        replace_missing: bool = True,
        on_progress: ProgressCallback | None = None,
        create: dict[str, Any] | None = None,
    ) -> SandboxSession:
        """A new sandbox (no id), or the one with `session_id` (resumed if paused; replaced by a new one when it
        is gone, unless `replace_missing=False`, which raises SandboxNotFound/SandboxExpired instead). `create`
        holds more keywords of `AsyncSandbox.create` for a new sandbox (template, cpu_count, memory_mb,
        allow_internet_access)."""
        tracker = Tracker(on_progress)
        await tracker.start("connecting")
        session = await cls._open(
            session_id,
            config=config or ScaleboxConfig.load(),
            timeout=timeout,
            metadata=metadata,
            envs=envs,
            replace_missing=replace_missing,
            tracker=tracker,
            create=create or {},
        )
        await tracker.finish({"session_id": session.session_id, "attach": session.attach.value})
        return session

    @classmethod
    async def _open(
        cls,
        session_id: str | None,
        *,
        config: ScaleboxConfig,
        timeout: int | None,
        metadata: dict[str, str] | None,
        envs: dict[str, str] | None,
        replace_missing: bool,
        tracker: Tracker,
        create: dict[str, Any],
    ) -> SandboxSession:
        lifetime = int(timeout or config.sandbox_timeout)
        if session_id:
            try:
                return await cls._attach(session_id, config=config, timeout=timeout, tracker=tracker)
            except SandboxNotFound as exc:
                if not replace_missing:
                    raise
                session = await cls._create(
                    config=config, timeout=lifetime, metadata=metadata, envs=envs, tracker=tracker, create=create
                )
                session.attach = Attach.REPLACED
                gone = expired_at(exc) if isinstance(exc, SandboxExpired) else "no longer exists"
                session.notice = (
                    f"Sandbox {session_id} {gone}; created sandbox {session.session_id}. "
                    "Variables, files and packages from before are gone."
                )
                return session
        return await cls._create(
            config=config, timeout=lifetime, metadata=metadata, envs=envs, tracker=tracker, create=create
        )

    @classmethod
    async def _create(
        cls,
        *,
        config: ScaleboxConfig,
        timeout: int,
        metadata: dict[str, str] | None,
        envs: dict[str, str] | None,
        tracker: Tracker,
        create: dict[str, Any],
    ) -> SandboxSession:
        await tracker.update(20, "Creating sandbox")
        options = dict(create)
        sandbox = await AsyncSandbox.create(
            options.pop("template", None) or config.template,
            timeout=timeout,
            metadata={**(metadata or {}), SESSION_METADATA_KEY: "1"},
            envs=envs,
            config=config,
            **options,
        )
        await tracker.update(60, f"Created sandbox {sandbox.sandbox_id}", {"session_id": sandbox.sandbox_id})
        state = SessionState()
        try:
            await save_state(sandbox, state)  # an upload makes the folders above its file (PROTOCOL.md §4)
        except BaseException:
            await sandbox.kill()
            raise
        await tracker.update(80, "Sandbox ready")
        return cls(sandbox, Attach.CREATED, state, config, timeout=timeout)

    @classmethod
    async def _attach(
        cls, session_id: str, *, config: ScaleboxConfig, timeout: int | None, tracker: Tracker
    ) -> SandboxSession:
        await tracker.update(30, f"Looking up session {session_id}")
        before = "paused" if await find_sandbox(session_id, config, ["paused"]) else "running"
        await tracker.update(60, "Resuming paused sandbox" if before == "paused" else "Connecting")
        sandbox = await AsyncSandbox.connect(session_id, timeout=timeout, config=config)
        attach = Attach.RESUMED if before == "paused" else Attach.ATTACHED
        await tracker.update(80, "Reading session state")
        state = await load_state(sandbox) or SessionState()
        session = cls(sandbox, attach, state, config, timeout=int(timeout or config.sandbox_timeout))
        await session._renew_if_ending()
        return session

    async def _renew_if_ending(self, info: SandboxInfo | None = None) -> None:
        """Give the sandbox its full lifetime again when it is about to run out (as the seed SDK does)."""
        info = info or await self.sandbox.get_info()
        if info.end_at is None:
            return
        remaining = (info.end_at - datetime.now(UTC)).total_seconds()
        if 0 < remaining < RENEW_BELOW_S:
            await self.sandbox.set_timeout(self.timeout)

    # ------------------------------------------------------------------------------------------ contexts

    async def context(self, language: str = "python", *, cwd: str = WORKSPACE) -> Context:
        """The code context for `language` (one kernel), created on first use (in `cwd`) and remembered in the
        sandbox, so that every process attached to this session shares its variables."""
        lang = canonical(language)
        context = self._contexts.get(lang)
        if context is not None:
            return context
        async with self._lock:
            if lang in self._contexts:
                return self._contexts[lang]
            known = self.state.contexts.get(lang)
            if known:
                context = Context(id=known, language=lang, cwd=cwd)
            else:
                context = await self._call(lambda: self.sandbox.create_code_context(lang, cwd=cwd))
                new_id = context.id
                await self._update_state(lambda s: s.contexts.__setitem__(lang, new_id))
            self._contexts[lang] = context
            if self.state.packages.get(lang) and lang in ("python", "r"):
                await self._probe(lang, context)
            return context

    def has_context(self, language: str = "python") -> bool:
        """Whether this process already holds the context of `language` (so using it starts nothing)."""
        return canonical(language) in self._contexts

    async def restart(self, language: str = "python") -> None:
        """Destroy the context of `language`: its state is gone, and the next run gets a fresh one."""
        lang = canonical(language)
        held = self._contexts.pop(lang, None)
        context_id = held.id if held is not None else self.state.contexts.get(lang)
        self._probes.pop(lang, None)
        if context_id:
            with contextlib.suppress(NotFound):
                await self.sandbox.destroy_context(context_id)
        await self._update_state(lambda s: s.contexts.pop(lang, None))

    # ------------------------------------------------------------------------------------------ running code

    async def run_code(
        self,
        code: str,
        *,
        language: str = "python",
        envs: dict[str, str] | None = None,
        on_stdout: Callable[..., Any] | None = None,
        on_stderr: Callable[..., Any] | None = None,
        on_result: Callable[..., Any] | None = None,
        on_error: Callable[..., Any] | None = None,
        timeout: float | None = None,
    ) -> Execution:
        """Run `code` in this session's context for `language`, streaming output to the callbacks. A paused
        sandbox is resumed (and the run retried once); a vanished one raises SandboxExpired."""
        lang = canonical(language)
        for attempt in range(2):
            context = await self.context(lang)
            try:
                return await self._call(
                    lambda context=context: self.sandbox.run_code(  # type: ignore[misc]
                        code,
                        context=context,
                        envs=envs,
                        on_stdout=on_stdout,
                        on_stderr=on_stderr,
                        on_result=on_result,
                        on_error=on_error,
                        timeout=timeout,
                    )
                )
            except NotFound as exc:
                if isinstance(exc, SandboxNotFound) or attempt:
                    raise
                # The context was destroyed elsewhere (another process restarted it): start a fresh one.
                self._contexts.pop(lang, None)
                await self._update_state(lambda s: s.contexts.pop(lang, None))
        raise AssertionError("unreachable")

    async def _call(self, make: Callable[[], Awaitable[Any]]) -> Any:
        """Await `make()`; when the sandbox turns out paused, resume it and try once more; when it is gone, raise
        SandboxExpired with a sentence the user can act on."""
        try:
            return await make()
        except (ExecutionTimeout, InvalidArgument, CommandExitError):
            raise
        except SandboxNotFound as exc:
            raise self._gone(exc) from None
        except ScaleboxError as exc:
            if isinstance(exc, NotFound):
                raise
            if isinstance(exc, ServerUnavailable) and exc.silent_for is not None:
                raise  # the server went silent: asking it about the sandbox would only wait as long again
            try:
                info = await self.sandbox.get_info()
            except SandboxNotFound as gone:
                raise self._gone(gone) from None
            if info.state == "paused":
                await self.sandbox.resume(self.timeout)
                return await make()
            if info.state == "terminated":
                raise self._gone(exc) from None
            raise

    def _gone(self, exc: ScaleboxError) -> SandboxExpired:
        how = expired_at(exc) if isinstance(exc, SandboxExpired) else "is gone (killed or expired)"
        return SandboxExpired(
            f"Sandbox {self.session_id} {how}; its variables and files are lost. Open a new session to go on."
        )

    # ------------------------------------------------------------------------------------------ packages and files

    async def install(
        self,
        packages: list[str],
        language: str = "python",
        on_output: Callable[[str], Any] | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> list[str]:
        """Install the packages this session does not have yet, with the language's own tool, into this sandbox
        only; returns what was installed."""
        lang = canonical(language)
        done = set(self.state.packages.get(lang, []))
        wanted = list(dict.fromkeys(p.strip() for p in packages if p.strip() and p.strip() not in done))
        if not wanted:
            return []
        tracker = Tracker(on_progress)
        await tracker.start("installing", f"Installing {', '.join(wanted)}", {"totalPackages": len(wanted)})
        await self._install(lang, wanted, on_output, tracker)
        await tracker.finish({"packagesInstalled": len(wanted), "totalPackages": len(wanted)})
        return wanted

    async def _install(
        self, lang: str, wanted: list[str], on_output: Callable[[str], Any] | None, tracker: Tracker
    ) -> None:
        probe = await self._probe(lang, await self.context(lang)) if lang in ("python", "r") else {}
        self.install_summary = await run_install(
            lambda command, on_out: self._call(
                lambda: self.sandbox.commands.run(
                    command, cwd=WORKSPACE, on_stdout=on_out, on_stderr=on_out, timeout=INSTALL_TIMEOUT_S
                )
            ),
            install_command(lang, wanted, probe),
            wanted,
            on_output,
            tracker,
        )
        if lang in ("python", "r"):
            await self._probe(lang, await self.context(lang), force=True)  # new modules become importable

        def record(state: SessionState) -> None:
            have = state.packages.setdefault(lang, [])
            have.extend(p for p in wanted if p not in have)

        await self._update_state(record)

    async def _probe(self, lang: str, context: Context, *, force: bool = False) -> dict[str, Any]:
        """Make the sandbox's own package directory importable in the context and say where it is."""
        if lang in self._probes and not force:
            return self._probes[lang]
        code = PYTHON_PROBE if lang == "python" else R_PROBE
        self._probes[lang] = parse_probe(await self._call(lambda: self.sandbox.run_code(code, context=context)))
        return self._probes[lang]

    async def upload(
        self, files: Mapping[str, str | bytes], cwd: str = WORKSPACE, on_progress: ProgressCallback | None = None
    ) -> list[str]:
        """Write files into the sandbox (relative paths against `cwd`), skipping those already there with the same
        content; returns the paths written."""
        tracker = Tracker(on_progress)
        await tracker.start("uploading", details={"totalFiles": len(files)})
        uploaded = await self._upload(files, cwd, tracker)
        await tracker.finish({"filesUploaded": len(uploaded), "totalFiles": len(files)})
        return uploaded

    async def _upload(self, files: Mapping[str, str | bytes], cwd: str, tracker: Tracker) -> list[str]:
        uploaded: list[str] = []
        written: dict[str, dict[str, Any]] = {}
        sent = 0
        for index, (path, data) in enumerate(files.items(), 1):
            full = resolve(path, cwd)
            digest = content_hash(data)
            if self.state.files.get(full, {}).get("sha256") != digest:
                size = len(data.encode() if isinstance(data, str) else data)
                await self._send_file(full, data, size, (index - 1) * 100 / len(files), sent, tracker)
                sent += size
                written[full] = {"sha256": digest, "size": size}
                uploaded.append(full)
            await tracker.update(
                index * 100 / len(files),
                f"Checked {index}/{len(files)} files, uploaded {len(uploaded)} ({sent} bytes)",
                {"filesUploaded": len(uploaded), "totalFiles": len(files), "bytesTransferred": sent},
            )
        if written:
            await self._update_state(lambda s: s.files.update(written))
        return uploaded

    async def _send_file(
        self, full: str, data: str | bytes, size: int, percent: float, before: int, tracker: Tracker
    ) -> None:
        """Write one file, its bytes and rate reported as it goes (a big file is not one frozen line)."""
        with _Rate(tracker, f"Uploading {full}", percent, before, size) as rate:
            await self._call(lambda: self.sandbox.files.write(full, data, on_bytes=rate.seen))

    async def _read(self, full: str, on_bytes: Callable[[int], None] | None) -> str | bytes:
        return await self._call(lambda: self.sandbox.files.read(full, "bytes", on_bytes=on_bytes))

    async def download(
        self, paths: list[str], cwd: str = WORKSPACE, on_progress: ProgressCallback | None = None
    ) -> dict[str, bytes]:
        """The contents of files in the sandbox, keyed by the paths as given (relative ones against `cwd`); with
        `on_progress`, the bytes and rate of each as it comes."""
        tracker = Tracker(on_progress)
        if on_progress is not None:
            await tracker.start("downloading", details={"totalFiles": len(paths)})
        out = await self._download(paths, cwd, tracker)
        if on_progress is not None:
            await tracker.finish({"filesDownloaded": len(out), "bytesTransferred": sum(map(len, out.values()))})
        return out

    async def _download(self, paths: list[str], cwd: str, tracker: Tracker) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        received = 0
        for index, path in enumerate(paths):
            full = resolve(path, cwd)
            with _Rate(tracker, f"Downloading {full}", (index * 100) / max(len(paths), 1), received) as rate:
                counted = rate.seen if tracker.on_progress is not None else None  # else a plain GET, retried
                data = await self._read(full, counted)
            out[path] = data if isinstance(data, bytes) else str(data).encode()
            received += len(out[path])
            await tracker.update(
                (index + 1) * 100 / len(paths),
                f"Downloaded {index + 1}/{len(paths)} files ({received} bytes)",
                {"filesDownloaded": index + 1, "totalFiles": len(paths), "bytesTransferred": received},
            )
        return out

    async def _update_state(self, change: Callable[[SessionState], Any]) -> None:
        """Apply `change` to the freshest stored state (another process may have written since) and store it."""
        fresh = await self._call(lambda: load_state(self.sandbox)) or self.state
        change(fresh)
        await self._call(lambda: save_state(self.sandbox, fresh))
        self.state = fresh

    # ------------------------------------------------------------------------------------------ lifetime

    async def pause(self) -> None:
        await self.sandbox.pause()

    async def resume(self) -> None:
        await self.sandbox.resume(self.timeout)

    async def keep_alive(self, timeout: int) -> SandboxInfo:
        """Let the sandbox live `timeout` seconds from now; returns the updated info."""
        await self._call(lambda: self.sandbox.set_timeout(int(timeout)))
        self.timeout = int(timeout)
        self.pinned = True  # an end someone chose: nothing extends it on its own any more
        return await self.sandbox.get_info()

    async def info(self) -> SandboxInfo:
        return await self.sandbox.get_info()

    async def close(self, kill: bool = True) -> None:
        """Kill the sandbox (its contexts die with it); with kill=False only let go of it, leaving its contexts
        alive so that a later `open(session_id)` finds its state."""
        try:
            if kill:
                with contextlib.suppress(SandboxNotFound):
                    await self.sandbox.kill()
        finally:
            self._contexts.clear()
            await self.sandbox.close()


def expired_at(exc: ScaleboxError) -> str:
    """`expired at 12:03:04` (local time) when the server's message says when, else `expired`."""
    found = re.search(r"expired at (\d{4}-\d\d-\d\dT[\d:.]+(?:Z|[+-]\d\d:?\d\d)?)", str(exc))
    if not found:
        return "expired"
    try:
        moment = datetime.fromisoformat(found.group(1).replace("Z", "+00:00"))
    except ValueError:
        return "expired"
    local = moment.astimezone() if moment.tzinfo else moment
    today = datetime.now(local.tzinfo).date() == local.date()
    return f"expired at {local.strftime('%H:%M:%S' if today else '%Y-%m-%d %H:%M:%S')}"


def resolve(path: str, cwd: str = WORKSPACE) -> str:
    return posixpath.normpath(path if path.startswith("/") else posixpath.join(cwd, path))


async def find_sandbox(session_id: str, config: ScaleboxConfig | None, states: list[str]) -> SandboxInfo | None:
    """The control plane's view of a sandbox in one of `states`, without connecting to (or resuming) it."""
    for info in await AsyncSandbox.list(state=states, config=config):
        if info.sandbox_id == session_id:
            return info
    return None


def _mib(count: float) -> str:
    return f"{count / (1024 * 1024):.1f} MiB"


class _Rate:
    """While a transfer runs: every PROGRESS_EVERY s, a progress report of its bytes so far and their rate."""

    def __init__(self, tracker: Tracker, what: str, percent: float, before: int, size: int | None = None) -> None:
        self.tracker, self.what, self.percent, self.before, self.size = tracker, what, percent, before, size
        self.done = 0
        self._started = time.monotonic()
        self._ticker: asyncio.Future[None] | None = None

    def seen(self, count: int) -> None:
        self.done = count

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY)
            if not self.done:
                continue
            rate = self.done / max(time.monotonic() - self._started, 1e-6)
            of = f" of {_mib(self.size)}" if self.size is not None else ""
            await self.tracker.update(
                self.percent,
                f"{self.what}: {_mib(self.done)}{of} ({_mib(rate)}/s)",
                {"bytesTransferred": self.before + self.done, "file": self.what.split(" ", 1)[1]},
            )

    def __enter__(self) -> _Rate:
        if self.tracker.on_progress is not None and (self.size is None or self.size >= PROGRESS_BYTES):
            self._ticker = asyncio.ensure_future(self._report())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
