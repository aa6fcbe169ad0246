"""ContextService and ExecutionService: code contexts of one sandbox, each one real Jupyter kernel.

An empty `context_id` means the default context of the request's language (empty language: python); a given
`context_id` wins and brings its own language. After a server restart the kernels are gone: the first cell of
each language (or of a context id from before) says so on stderr before it runs in a fresh kernel.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from ...protocol import pb
from ...protocol.connect import ConnectError
from ..isolation.layout import HOME
from ..isolation.sandbox import SandboxIsolation
from ..settings import ServerSettings
from .kernels import Kernel, restarted_notice
from .paths import SandboxPaths
from .runtimes import LANGUAGES, KernelLaunch, LaunchContext, Runtime, RuntimeRegistry

#: Contexts (kernels) one sandbox may have at once.
MAX_CONTEXTS = 32
#: `<language>-` and 80 random bits in four dash-separated groups: five dash-separated words, the shape
#: jupyter_server and JupyterLab route kernel ids by. (Ids of the older 16-hex-digit shape still come back after
#: a restart.)
_CONTEXT_ID = re.compile(r"^(?P<language>[a-z]+)-([0-9a-f]{16}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4})$")

log = logging.getLogger("scalebox_kernel.server")


def _new_context_id(language: str) -> str:
    bits = secrets.token_hex(10)
    return f"{language}-{bits[:8]}-{bits[8:12]}-{bits[12:16]}-{bits[16:]}"


@dataclass
class CodeContext:
    """One context: an id, a language, a working directory and the kernel behind them."""

    id: str
    runtime: Runtime
    cwd: str
    created_at: Timestamp
    kernel: Kernel

    def message(self) -> pb.Context:
        return pb.Context(id=self.id, language=self.runtime.name, cwd=self.cwd, created_at=self.created_at)


class Contexts:
    """The contexts of one sandbox and the two services that use them."""

    def __init__(
        self,
        *,
        registry: RuntimeRegistry,
        paths: SandboxPaths,
        settings: ServerSettings,
        runtime_dir: Path,
        env: Callable[[], dict[str, str]],
        isolation: SandboxIsolation,
    ) -> None:
        self.registry = registry
        self._isolation = isolation
        self._paths = paths
        self._settings = settings
        self._runtime_dir = runtime_dir
        self._env = env
        self._contexts: dict[str, CodeContext] = {}
        self._created: set[str] = set()  # every context id this server made (destroyed ones stay destroyed)
        self._defaults: dict[str, str] = {}  # language -> id of its default context
        self._resolved: dict[str, str] = {}  # a wire language name ("", "Python", "js") -> its runtime's name
        self._lost_reason: str | None = None
        self._lost_languages: set[str] = set()  # languages whose next default context must announce the loss
        self._paused = False
        #: Default contexts started ahead of time (warm_default) that nobody used yet: the first CreateContext of
        #: their language takes one over instead of starting another kernel.
        self._spares: set[str] = set()

    # ------------------------------------------------------------------ lookup and lifetime

    def create(self, language: str, cwd: str = "", *, context_id: str | None = None) -> CodeContext:
        """A new context (its kernel starts in the background at once)."""
        runtime = self.registry.resolve(language)
        if len(self._contexts) >= MAX_CONTEXTS:
            raise ConnectError(
                "resource_exhausted",
                f"this sandbox already has {MAX_CONTEXTS} contexts (each one a kernel); destroy one first",
            )
        sandbox_cwd, host_cwd = self._paths.cwd(cwd)
        context_id = context_id or _new_context_id(runtime.name)
        home = self._paths.to_host(HOME)

        def launch() -> KernelLaunch:
            return runtime.kernel_launch(LaunchContext(settings=self._settings, home=home, env=self._env()))

        kernel = Kernel(
            runtime,
            launch,
            cwd=host_cwd,
            runtime_dir=self._runtime_dir,
            name=context_id,
            start_timeout=self._settings.kernel_start_timeout,
            isolation=self._isolation,
            buffer_bytes=self._settings.stream_buffer_bytes,
        )
        if self._paused:
            kernel.pause()
        created = Timestamp()
        created.GetCurrentTime()
        context = CodeContext(id=context_id, runtime=runtime, cwd=sandbox_cwd, created_at=created, kernel=kernel)
        self._contexts[context_id] = context
        self._created.add(context_id)
        kernel.warm()
        return context

    def default(self, language: str) -> CodeContext:
        """The default context of a language, created on first use."""
        context = self._default(language)
        self._spares.discard(context.id)
        return context

    def _default(self, language: str) -> CodeContext:
        """The default context of a language, created on first use. A name seen before finds it without resolving
        the runtime again (which reads the runtime's spec from disk: a cost on every cell)."""
        context = self._contexts.get(self._defaults.get(self._resolved.get(language, ""), ""))
        if context is not None:
            return context
        runtime = self.registry.resolve(language)
        if len(self._resolved) >= 64:  # the names clients spell, not every spelling one might send
            self._resolved.clear()
        self._resolved[language] = runtime.name
        context = self._contexts.get(self._defaults.get(runtime.name, ""))
        if context is None:
            context = self.create(runtime.name)
            self._defaults[runtime.name] = context.id
            if runtime.name in self._lost_languages:
                self._lost_languages.discard(runtime.name)
                context.kernel.notice = self._lost_notice(runtime)
        return context

    def find(self, context_id: str) -> CodeContext:
        context = self._contexts.get(context_id)
        if context is not None:
            self._spares.discard(context_id)
            return context
        match = _CONTEXT_ID.match(context_id)
        if self._lost_reason and match and match["language"] in LANGUAGES and context_id not in self._created:
            # A context from before the restart: it comes back empty, and says so.
            context = self.create(match["language"], context_id=context_id)
            context.kernel.notice = self._lost_notice(context.runtime)
            return context
        raise ConnectError("not_found", f"context {context_id} not found")

    async def destroy(self, context_id: str) -> None:
        self._spares.discard(context_id)
        context = self._contexts.pop(context_id, None)
        if context is None:
            raise ConnectError("not_found", f"context {context_id} not found")
        for language, default_id in list(self._defaults.items()):
            if default_id == context_id:
                del self._defaults[language]
        await context.kernel.shutdown()

    def warm_default(self, language: str = "python") -> None:
        """Create the default context of a language now, so its kernel is ready before the first cell (or for the
        first CreateContext of that language to take over)."""
        before = set(self._contexts)
        with contextlib.suppress(ConnectError):
            context = self._default(language)
            if context.id not in before:
                self._spares.add(context.id)

    async def warm(self, language: str) -> None:
        """Start the default context of a language now and wait until its kernel is up (a pooled sandbox's), still
        free for the first CreateContext to take over."""
        self.warm_default(language)
        await self._default(language).kernel.ready()

    def _adopt(self, language: str, cwd: str) -> CodeContext | None:
        """A new context made of a spare default one of `language` (its kernel started ahead, never used), to work
        in `cwd` (the kernel moves there before anything else runs in it); None when there is none, or it cannot
        move there (then a new kernel is started as before)."""
        if not self._isolation.active:  # unconfined kernels work in host paths: no moving them about
            return None
        runtime = self.registry.resolve(language)
        spares = [self._contexts[i] for i in sorted(self._spares)]
        spare = next((context for context in spares if context.runtime.name == runtime.name), None)
        if spare is None or spare.kernel.notice:  # one that must tell of a restart stays the default, and tells
            return None
        sandbox_cwd, host_cwd = self._paths.cwd(cwd)
        if sandbox_cwd != spare.cwd:
            move = runtime.chdir_code(sandbox_cwd)
            if move is None:
                return None
            spare.kernel.move_to(host_cwd, move)
        self._spares.discard(spare.id)
        del self._contexts[spare.id]
        if self._defaults.get(runtime.name) == spare.id:
            del self._defaults[runtime.name]  # the default context, when used, gets a kernel of its own
        created = Timestamp()
        created.GetCurrentTime()
        context_id = _new_context_id(runtime.name)
        context = CodeContext(id=context_id, runtime=runtime, cwd=sandbox_cwd, created_at=created, kernel=spare.kernel)
        self._contexts[context_id] = context
        self._created.add(context_id)
        return context

    def listed(self) -> list[CodeContext]:
        """The contexts a client may know of (the Jupyter endpoint's kernel list): not the spare ones."""
        return [context for context in self._contexts.values() if context.id not in self._spares]

    def mark_state_lost(self, reason: str) -> None:
        self._lost_reason = reason
        self._lost_languages = set(LANGUAGES)
        for context in self._contexts.values():
            context.kernel.notice = self._lost_notice(context.runtime)
            self._lost_languages.discard(context.runtime.name)

    def _lost_notice(self, runtime: Runtime) -> str:
        return restarted_notice(runtime, f"of this sandbox was restarted ({self._lost_reason})")

    def pause(self) -> None:
        self._paused = True
        for context in self._contexts.values():
            context.kernel.pause()

    def resume(self) -> None:
        self._paused = False
        for context in self._contexts.values():
            context.kernel.resume()

    async def shutdown(self, reason: str) -> None:
        contexts = list(self._contexts.values())
        self._spares.clear()
        self._contexts.clear()
        self._defaults.clear()
        for context in contexts:
            await context.kernel.shutdown(reason)

    def all(self) -> list[CodeContext]:
        return list(self._contexts.values())

    # ------------------------------------------------------------------ RPCs

    async def create_context(self, request: pb.CreateContextRequest) -> pb.Context:
        adopted = self._adopt(request.language, request.cwd)
        if adopted is not None:
            return adopted.message()
        return self.create(request.language, request.cwd).message()

    async def destroy_context(self, request: pb.DestroyContextRequest) -> pb.DestroyContextResponse:
        await self.destroy(request.context_id)
        return pb.DestroyContextResponse(success=True)

    async def execute(
        self, request: pb.ExecuteRequest, *, json_in_extra: bool, keepalive: float
    ) -> AsyncIterator[pb.ExecuteResponse]:
        context = self.find(request.context_id) if request.context_id else self.default(request.language)
        events = context.kernel.execute(
            request.code, dict(request.env_vars), json_in_extra=json_in_extra, keepalive=keepalive
        )
        async with contextlib.aclosing(events):
            async for event in events:
                yield event
