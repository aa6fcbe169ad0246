"""`Session`: the seed SDK's Session API (PROTOCOL.md §6) on top of SandboxSession, async with sync twins."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..client import AsyncSandbox, Execution, ExecutionError, OutputMessage, Result, SandboxInfo, portal
from ..client.callbacks import call_back
from ..client.sandbox import StorageOption
from ..config import ScaleboxConfig
from ..errors import SandboxNotFound
from ..language_names import canonical
from ._progress import ProgressCallback, Tracker
from ._sandbox import SESSION_METADATA_KEY, WORKSPACE, Attach, SandboxSession, find_sandbox
from ._state import load_state

#: Lifetime in seconds of a session's sandbox unless told otherwise (the seed SDK's 600 000 ms).
DEFAULT_SESSION_TIMEOUT = 600

# Sessions this process has open, per event loop (an AsyncSandbox belongs to the loop that made it).
_open_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, SandboxSession]] = (
    weakref.WeakKeyDictionary()
)


@dataclass
class SessionResult:
    """What `Session.run` returns: output, outcome, downloaded files, timing and insights."""

    text: str
    stdout: str
    stderr: str
    success: bool  # no error was raised by the code
    exit_code: int  # 1 when the code raised, else 0
    error: ExecutionError | None
    results: list[Result]
    execution: Execution
    files: dict[str, bytes] | None = None
    session_id: str | None = None  # only with keep_alive (or a given session_id): the sandbox id
    timing: dict[str, Any] = field(default_factory=dict)
    insights: dict[str, Any] = field(default_factory=dict)


@dataclass
class SessionInfo:
    """A session as `Session.get`/`Session.list` describe it."""

    session_id: str
    status: str  # "running" | "paused" | "stopped"
    template_id: str = ""
    installed_packages: dict[str, list[str]] = field(default_factory=dict)
    uploaded_files: list[str] = field(default_factory=list)
    created_at: datetime | None = None
    started_at: datetime | None = None
    expires_at: datetime | None = None
    remaining_time: float | None = None  # seconds
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class KeepAliveResult:
    session_id: str
    new_timeout: int
    expires_at: datetime | None


def _here() -> dict[str, SandboxSession]:
    """The sessions open on the running event loop."""
    return _open_sessions.setdefault(asyncio.get_running_loop(), {})


def _remember(session: SandboxSession) -> None:
    _here()[session.session_id] = session


def _forget(session_id: str) -> SandboxSession | None:
    return _here().pop(session_id, None)


class Session:
    """Run code in a sandbox in one call, optionally keeping the sandbox for the next call (`keep_alive`)."""

    @staticmethod
    async def arun(
        code: str,
        *,
        language: str = "python",
        packages: list[str] | None = None,
        files: dict[str, str | bytes] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        session_id: str | None = None,
        keep_alive: bool = False,
        timeout: int | None = None,
        download_files: list[str] | None = None,
        object_storage: StorageOption | list[StorageOption] | None = None,
        on_progress: ProgressCallback | None = None,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
        config: ScaleboxConfig | None = None,
    ) -> SessionResult:
        """Connect (creating or reusing a sandbox), upload, install, execute, download; see `Session.run`.

        `timeout` is the sandbox's lifetime in seconds (default 600), `files` maps paths (relative to `cwd`,
        default /workspace) to contents, `packages` are installed with the language's tool, `download_files` are
        read back into `result.files`; `on_progress` gets a ProgressInfo per step of every stage.
        `object_storage` mounts buckets into a new session's sandbox (see `AsyncSandbox.create`); a session that
        exists already keeps the mounts it was created with.
        """
        tracker = Tracker(on_progress)
        lang = canonical(language)
        workdir = cwd or WORKSPACE
        session: SandboxSession | None = None
        created = False
        try:
            await tracker.start("initializing")
            await tracker.finish()
            await tracker.start("connecting")
            create = {"object_storage": object_storage} if object_storage else {}
            session = await _session_for_run(session_id, config, timeout, tracker, create)
            created = session.attach is Attach.CREATED
            await session.context(lang, cwd=workdir)
            await tracker.finish({"session_id": session.session_id})
            if files:
                await tracker.start("uploading", details={"totalFiles": len(files)})
                uploaded = await session._upload(files, workdir, tracker)
                await tracker.finish({"filesUploaded": len(uploaded), "totalFiles": len(files)})
            if packages:
                wanted = [p for p in dict.fromkeys(packages) if p not in session.state.packages.get(lang, [])]
                await tracker.start("installing", details={"totalPackages": len(packages)})
                if wanted:
                    await session._install(lang, wanted, None, tracker)
                await tracker.finish({"packagesInstalled": len(wanted), "totalPackages": len(packages)})
            await tracker.start("executing")
            execution = await session.run_code(
                code,
                language=lang,
                envs=env,
                on_stdout=_relay(on_stdout, tracker),
                on_stderr=_relay(on_stderr, None),
            )
            await tracker.finish()
            downloaded = None
            if download_files:
                await tracker.start("downloading", details={"totalFiles": len(download_files)})
                downloaded = await session._download(download_files, workdir, tracker)
                received = sum(map(len, downloaded.values()))
                await tracker.finish({"filesDownloaded": len(downloaded), "bytesTransferred": received})
            await tracker.start("completed")
            await tracker.finish()
        except BaseException as exc:
            await _report_failure(tracker, exc)
            if session is not None and created and not keep_alive:
                await _discard(session)
            raise
        keep = keep_alive or session_id is not None
        result = _result(execution, downloaded, session.session_id if keep else None, tracker)
        if keep:
            _remember(session)
        else:
            await _discard(session)
        return result

    @staticmethod
    async def apause(session_id: str, *, config: ScaleboxConfig | None = None) -> bool:
        """Pause a session's sandbox (the next `run` with its id resumes it); False if it is gone."""
        session = _here().get(session_id)
        if session is not None:
            await session.pause()
            return True
        info = await find_sandbox(session_id, config, ["running", "paused"])
        if info is None:
            return False
        if info.state != "paused":
            sandbox = await AsyncSandbox.connect(session_id, config=config)
            try:
                await sandbox.pause()
            finally:
                await sandbox.close()
        return True

    @staticmethod
    async def aclose(session_id: str, *, config: ScaleboxConfig | None = None) -> None:
        """Kill a session's sandbox; an unknown id is ignored."""
        session = _forget(session_id)
        if session is not None:
            await session.close(kill=True)
            return
        await AsyncSandbox.kill_by_id(session_id, config=config)

    @staticmethod
    async def akeep_alive(
        session_id: str, timeout: int = DEFAULT_SESSION_TIMEOUT, *, config: ScaleboxConfig | None = None
    ) -> KeepAliveResult:
        """Let the session live `timeout` seconds from now (a paused one is resumed)."""
        session = _here().get(session_id)
        opened = session is None
        if session is None:
            session = await SandboxSession.open(session_id, config=config, replace_missing=False)
        try:
            info = await session.keep_alive(timeout)
        finally:
            if opened:
                await session.close(kill=False)
        return KeepAliveResult(session_id, int(timeout), info.end_at)

    @staticmethod
    async def aget(session_id: str, *, config: ScaleboxConfig | None = None) -> SessionInfo:
        """What the session is and knows; raises SandboxNotFound for an unknown or ended one."""
        info = await find_sandbox(session_id, config, ["running", "paused"])
        if info is None:
            _forget(session_id)
            raise SandboxNotFound(f"Session {session_id} not found or expired.")
        described = _describe(info)
        if info.state == "running":
            sandbox = await AsyncSandbox.connect(session_id, config=config)
            try:
                state = await load_state(sandbox)
            finally:
                await sandbox.close()
            if state is not None:
                described.installed_packages = state.packages
                described.uploaded_files = sorted(state.files)
                described.created_at = datetime.fromtimestamp(state.created_at, UTC)
        return described

    @staticmethod
    async def alist(*, config: ScaleboxConfig | None = None) -> list[SessionInfo]:
        """Every session on the server (any process's), running or paused."""
        found = await AsyncSandbox.list(
            state=["running", "paused"], metadata={SESSION_METADATA_KEY: "1"}, config=config
        )
        return [_describe(info) for info in found]

    # ---------------------------------------------------------------------------- sync twins

    @staticmethod
    def run(
        code: str,
        *,
        language: str = "python",
        packages: list[str] | None = None,
        files: dict[str, str | bytes] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        session_id: str | None = None,
        keep_alive: bool = False,
        timeout: int | None = None,
        download_files: list[str] | None = None,
        object_storage: StorageOption | list[StorageOption] | None = None,
        on_progress: ProgressCallback | None = None,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
        config: ScaleboxConfig | None = None,
    ) -> SessionResult:
        """Run `code` in a sandbox: a new one, or the session `session_id` (resumed if paused). Packages and
        files the session already has are not installed or uploaded again. Without `keep_alive` (and without a
        `session_id`), the sandbox is killed afterwards; with it, `result.session_id` names it for later runs,
        from this process or any other. The parameters are `arun`'s."""
        return portal.run(
            Session.arun(
                code,
                language=language,
                packages=packages,
                files=files,
                env=env,
                cwd=cwd,
                session_id=session_id,
                keep_alive=keep_alive,
                timeout=timeout,
                download_files=download_files,
                object_storage=object_storage,
                on_progress=on_progress,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
                config=config,
            )
        )

    @staticmethod
    def pause(session_id: str, *, config: ScaleboxConfig | None = None) -> bool:
        return portal.run(Session.apause(session_id, config=config))

    @staticmethod
    def close(session_id: str, *, config: ScaleboxConfig | None = None) -> None:
        portal.run(Session.aclose(session_id, config=config))

    @staticmethod
    def keep_alive(
        session_id: str, timeout: int = DEFAULT_SESSION_TIMEOUT, *, config: ScaleboxConfig | None = None
    ) -> KeepAliveResult:
        return portal.run(Session.akeep_alive(session_id, timeout, config=config))

    @staticmethod
    def get(session_id: str, *, config: ScaleboxConfig | None = None) -> SessionInfo:
        return portal.run(Session.aget(session_id, config=config))

    @staticmethod
    def list(*, config: ScaleboxConfig | None = None) -> list[SessionInfo]:
        return portal.run(Session.alist(config=config))


async def _session_for_run(
    session_id: str | None,
    config: ScaleboxConfig | None,
    timeout: int | None,
    tracker: Tracker,
    create: dict[str, Any] | None = None,
) -> SandboxSession:
    """A new session, or the one named (reused from this process when open here, else attached by id)."""
    config = config or ScaleboxConfig.load()
    # The seed's 600 s, unless a sandbox_timeout was configured (the one configuration every door reads).
    lifetime = int(timeout or (config.sandbox_timeout if config.is_set("sandbox_timeout") else DEFAULT_SESSION_TIMEOUT))

    async def opened() -> SandboxSession:
        return await SandboxSession._open(
            session_id,
            config=config,
            timeout=lifetime,
            metadata=None,
            envs=None,
            replace_missing=False,
            tracker=tracker,
            create=create or {},
        )

    if session_id is None:
        return await opened()
    session = _here().get(session_id)
    if session is None:
        try:
            return await opened()
        except SandboxNotFound:
            raise SandboxNotFound(f"Session {session_id} not found or expired.") from None
    await tracker.update(30, f"Reusing session {session_id}")
    try:
        info = await session.info()
    except SandboxNotFound:
        _forget(session_id)
        raise SandboxNotFound(f"Session {session_id} not found or expired.") from None
    await tracker.update(60)
    session.timeout = lifetime
    if info.state == "paused":
        await tracker.update(70, "Resuming paused sandbox")
        await session.resume()
        session.attach = Attach.RESUMED
        await tracker.update(80)
        await session._renew_if_ending()
    else:
        session.attach = Attach.ATTACHED
        await session._renew_if_ending(info)
    return session


def _relay(callback: Callable[[str], Any] | None, tracker: Tracker | None) -> Callable[[OutputMessage], Any]:
    async def relay(message: OutputMessage) -> None:
        await call_back(callback, message.line)
        if tracker is not None:
            await tracker.update(50, "Executing code", {"output": message.line[:100]})

    return relay


async def _report_failure(tracker: Tracker, exc: BaseException) -> None:
    try:
        tracker.stage = None  # the failed stage did not finish
        await tracker.start("failed", f"Execution failed: {type(exc).__name__}: {exc}"[:300])
        await tracker.finish()
    except Exception:  # a failing progress callback must not hide the real error
        pass


async def _discard(session: SandboxSession) -> None:
    _forget(session.session_id)
    with contextlib.suppress(Exception):
        await asyncio.shield(session.close(kill=True))


def _result(
    execution: Execution, files: dict[str, bytes] | None, session_id: str | None, tracker: Tracker
) -> SessionResult:
    stdout = "".join(execution.logs.stdout)
    main = execution.text
    return SessionResult(
        text=main if main is not None else stdout,
        stdout=stdout,
        stderr="".join(execution.logs.stderr),
        success=execution.error is None,
        exit_code=1 if execution.error is not None else 0,
        error=execution.error,
        results=execution.results,
        execution=execution,
        files=files,
        session_id=session_id,
        timing=tracker.timing(),
        insights=tracker.insights(),
    )


def _describe(info: SandboxInfo) -> SessionInfo:
    remaining = None
    if info.end_at is not None:
        remaining = max(0.0, (info.end_at - datetime.now(UTC)).total_seconds())
    status = {"running": "running", "paused": "paused"}.get(info.state, "stopped")
    return SessionInfo(
        session_id=info.sandbox_id,
        status=status,
        template_id=info.template_id,
        started_at=info.started_at,
        expires_at=info.end_at,
        remaining_time=remaining,
        metadata=info.metadata,
    )
