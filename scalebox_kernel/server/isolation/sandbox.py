"""What a sandbox's agent needs from isolation: a jail when this server confines sandboxes, else a plain host run.

The agent asks one `SandboxIsolation` to start and stop, to pause and resume (the freezer, when there is one),
to turn a command or kernel launch into a jailed one, and what to report in get_info; it never needs to know
which of these protections this machine actually has.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jupyter_client.manager import AsyncKernelManager

from ..settings import ServerSettings
from .cgroups import Limits, Usage
from .detect import Capabilities, capabilities
from .jail import Jail, JailOptions
from .layout import HOME

NONE_NOTE = (
    "kernels and commands run on the host as the server's user; only the file APIs are confined to the "
    "sandbox's directory"
)


def server_capabilities(settings: ServerSettings) -> Capabilities | None:
    """This machine's sandboxing capabilities, or None when isolation is turned off in the settings."""
    return None if settings.isolation == "none" else capabilities()


def describe(settings: ServerSettings) -> str:
    """One line for `jupyter scalebox serve`: the isolation sandboxes get here and what is missing."""
    caps = server_capabilities(settings)
    if caps is None:
        return "isolation: none (turned off with --no-isolation); " + NONE_NOTE
    return caps.summary()


def none_info(settings: ServerSettings) -> dict[str, Any]:
    """get_info's `isolation` for a sandbox that runs unconfined, with the reasons."""
    caps = server_capabilities(settings)
    reasons = ["turned off with --no-isolation"] if caps is None else list(caps.problems)
    missing = ["namespaces", "network", "uid", "memory-limit", "process-limit", "cpu-limit", "freezer", "disk-limit"]
    return {"mode": "none", "missing": missing, "reasons": reasons, "note": NONE_NOTE}


class SandboxIsolation:
    """The isolation of one sandbox: a `Jail` when the server confines sandboxes, otherwise nothing."""

    def __init__(
        self,
        settings: ServerSettings,
        *,
        sandbox_id: str,
        root: Path,
        private_dir: Path,
        memory_mb: int | None = None,
        cpu_count: float | None = None,
        internet: bool = True,
        runtime: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        caps = server_capabilities(settings)
        self.jail: Jail | None = None
        if caps is not None and caps.namespaces:
            limits = Limits(memory_mb=memory_mb, cpu_count=cpu_count, processes=settings.max_processes or None)
            options = JailOptions(
                limits=limits,
                internet=internet,
                uid_base=settings.sandbox_uid_base,
                runtime=tuple(runtime),
                seeds=((str(settings.cache_dir), f"{HOME}/.cache/scalebox"),),  # matplotlib's font cache
            )
            self.jail = Jail(caps, sandbox_id=sandbox_id, root=root, private_dir=private_dir, options=options)
        self._oom_seen = 0

    @property
    def active(self) -> bool:
        return self.jail is not None

    async def start(self) -> None:
        if self.jail is not None:
            await self.jail.start()
            self._oom_seen = self.jail.oom_kills()

    async def stop(self) -> None:
        if self.jail is not None:
            await self.jail.stop()

    def info(self) -> dict[str, Any]:
        return self.jail.info() if self.jail is not None else none_info(self.settings)

    # ------------------------------------------------------------------ pause

    async def freeze(self) -> None:
        """Freeze every process of the sandbox, where there is a freezer (the agent SIGSTOPs what it started too)."""
        if self.jail is not None and self.jail.can_freeze:
            await self.jail.freeze()

    async def thaw(self) -> None:
        if self.jail is not None and self.jail.can_freeze:
            await self.jail.thaw()

    # ------------------------------------------------------------------ launching

    async def ensure_running(self) -> None:
        """Restart the sandbox's namespaces if they died (their processes died with them)."""
        if self.jail is not None and not self.jail.running:
            await self.jail.start()

    async def command(
        self, argv: Sequence[str], env: Mapping[str, str], cwd: Path
    ) -> tuple[list[str], dict[str, str], Path]:
        """(argv, env, cwd) that run a command inside the sandbox (unchanged when it is not confined); a program
        the sandbox does not have is FileNotFoundError, as it would be for a plain exec."""
        if self.jail is None:
            return list(argv), dict(env), cwd
        await self.ensure_running()
        if not argv or not self.jail.has_program(argv[0], env.get("PATH", "")):
            program = argv[0] if argv else ""
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
        host_argv, host_env = self.jail.wrap(argv, env=env, cwd=self.jail.sandbox_path(cwd))
        return host_argv, host_env, self.jail.root

    def kernel_manager(self, *, relay: bool, cwd: Path, **kwargs: Any) -> AsyncKernelManager:
        """An AsyncKernelManager for one kernel (jailed and over IPC when the sandbox is confined)."""
        if self.jail is None:
            return AsyncKernelManager(transport="tcp", ip="127.0.0.1", **kwargs)
        from .kernels import JailedKernelManager

        return JailedKernelManager(jail=self.jail, relay=relay, sandbox_cwd=self.jail.sandbox_path(cwd), **kwargs)

    def own(self, path: Path | str) -> None:
        """Give what the server wrote into the sandbox (and the directories it made for it) to the sandbox's uid,
        so that its code may change it."""
        if self.jail is not None:
            self.jail.own_created(Path(path))

    def own_paths_in(self, env: Mapping[str, str]) -> None:
        """Hand the directories an environment names inside the sandbox (package targets that a runtime made on
        the host, say) to the sandbox's uid."""
        if self.jail is None:
            return
        for value in env.values():
            for part in value.split(os.pathsep):
                path = Path(part)
                if part.startswith("/") and path.is_relative_to(self.jail.root) and os.path.lexists(path):
                    self.jail.own_created(path)

    # ------------------------------------------------------------------ limits

    def usage(self) -> Usage | None:
        """The sandbox's cgroup counters (CPU time, memory), when it has cgroups."""
        return self.jail.usage() if self.jail is not None else None

    def out_of_memory(self) -> str | None:
        """A message when the OOM killer struck since the last call (the kernel or a command hit the limit)."""
        if self.jail is None:
            return None
        kills = self.jail.oom_kills()
        if kills <= self._oom_seen:
            return None
        self._oom_seen = kills
        limit = self.jail.options.limits.memory_mb
        return f"the sandbox ran out of memory (limit {limit} MiB)" if limit else "the sandbox ran out of memory"
