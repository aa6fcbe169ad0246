"""SandboxAgent: everything that runs inside one sandbox (code contexts, commands, files, watchers).

Kernels and commands get an environment built from scratch, so nothing of the server's own environment (its API
key, say) reaches sandbox code. Where the machine allows, they run confined (`..isolation`: bubblewrap namespaces
with the sandbox's tree as `/`, a uid of its own, cgroup limits, the freezer for pause); otherwise on the host,
with their cwd, HOME and TMPDIR inside the sandbox's tree.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ..isolation.buckets import Bucket, Credentials
from ..isolation.layout import HOME, USER_DIRS
from ..isolation.sandbox import SandboxIsolation
from ..runtimes_store import RuntimeStore
from ..settings import ServerSettings
from . import transfer
from .execution import Contexts
from .filesystem import Filesystem
from .paths import SandboxPaths
from .process import ProcessManager
from .runtimes import (
    RuntimeRegistry,
    default_registry,
    sandbox_bin_dirs,
    sandbox_host_dirs,
    sandbox_language_env,
)
from .watch import Watchers

log = logging.getLogger("scalebox_kernel.server")

#: Variables of the server's environment that sandbox code gets (nothing that could carry a secret).
PASSTHROUGH_ENV = (
    "PATH",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "LC_MESSAGES",
    "TZ",
    "USER",
    "LOGNAME",
    "JAVA_HOME",
)

# /etc/profile resets PATH in login shells (the SDKs run commands with `bash -l -c`); this keeps the
# interpreter that runs the kernels (python, pip) first, as in a real sandbox image.
_PROFILE = """\
# Written by scalebox-local: login shells keep the sandbox's Python first on PATH.
export PATH="{bin_dir}:$PATH"
if [ -n "$BASH_VERSION" ] && [ -f "$HOME/.bashrc" ]; then . "$HOME/.bashrc"; fi
"""


def base_environment(root: Path) -> dict[str, str]:
    """What every process of a sandboxed tree at `root` gets: the server's harmless variables, the runtimes first
    on PATH, its home and TMPDIR, the languages' own variables."""
    env = {name: os.environ[name] for name in PASSTHROUGH_ENV if name in os.environ}
    bin_dirs = sandbox_bin_dirs()
    path = env.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    if path.split(os.pathsep)[: len(bin_dirs)] != bin_dirs:
        path = os.pathsep.join([*bin_dirs, path])
    env["PATH"] = path
    env.setdefault("LANG", "C.UTF-8")
    env["HOME"] = str(root / HOME.lstrip("/"))
    env["TMPDIR"] = str(root / "tmp")
    env["SHELL"] = "/bin/bash"
    env.update(sandbox_language_env(root / HOME.lstrip("/")))
    return env


#: Runtimes that size themselves (heap, threads) from the cgroup limits they find when they start.
SIZED_AT_START = frozenset({"java", "nodejs", "typescript"})


class SandboxAgent:
    """Everything that runs inside one sandbox: code contexts (kernels), processes, file watchers."""

    def __init__(
        self,
        *,
        sandbox_id: str,
        root: Path,
        envs: dict[str, str],
        settings: ServerSettings,
        registry: RuntimeRegistry | None = None,
        memory_mb: int | None = None,
        cpu_count: float | None = None,
        disk_mb: int | None = None,
        allow_internet_access: bool = True,
        buckets: Sequence[Bucket] = (),
        credentials: Sequence[Credentials] = (),
    ) -> None:
        self.sandbox_id = sandbox_id
        self.root = Path(root)
        self.envs = dict(envs)
        self.settings = settings
        # Beside the root, never inside it: kernel connection files (their keys) and upload staging.
        self.private_dir = self.root.parent
        self.confinement = SandboxIsolation(
            settings,
            sandbox_id=sandbox_id,
            root=self.root,
            private_dir=self.private_dir,
            memory_mb=memory_mb,
            cpu_count=cpu_count,
            disk_mb=disk_mb,
            internet=allow_internet_access,
            runtime=sandbox_host_dirs(),
            buckets=buckets,
            credentials=credentials,
        )
        self.tree = self.confinement.tree
        self.paths = SandboxPaths(self.root, self.tree)
        self.files = Filesystem(self.paths, self.tree)
        self.watchers = Watchers(self.paths, self.tree)
        self.processes = ProcessManager(
            self._command_cwd,
            self.sandbox_env,
            launcher=self.confinement.command,
            buffer_bytes=settings.stream_buffer_bytes,
        )
        self.contexts = Contexts(
            registry=registry or default_registry(),
            paths=self.paths,
            settings=settings,
            runtime_dir=self.confinement.kernel_dir,
            env=self.sandbox_env,
            isolation=self.confinement,
        )

    # ------------------------------------------------------------------ lifetime

    async def start(self) -> None:
        """Make the sandbox's tree (its jail, when confined) and home, and start the default Python kernel in the
        background. The network starts while that kernel does (a kernel's start needs none), and is up before
        this returns, so before anything the create's caller runs."""
        if not self.confinement.active:
            self.root.mkdir(parents=True, exist_ok=True)
        await self.confinement.start(with_network=False)
        await self.tree.run(self._set_up_home)
        self.contexts.warm_default("python")
        await self.confinement.start_network()
        # Jedi reads its cache at the first completion, not at the kernel's start: copied while the kernel starts.
        await self.tree.run(self._seed_completion_cache)

    def _set_up_home(self) -> None:
        """The sandbox's own directories and login profile, made as the sandbox (on the tree's threads): a link
        or anything else the sandbox left at those names is never followed or overwritten."""
        try:
            for directory in USER_DIRS:
                self.tree.makedirs(directory)
            profile = _PROFILE.format(bin_dir=os.pathsep.join(sandbox_bin_dirs())).encode()
            self.tree.write_new(f"{HOME}/.profile", profile)
        except OSError as exc:  # the sandbox filled its disk or broke its home: it starts anyway, without them
            log.warning("sandbox %s: could not set up its home: %s", self.sandbox_id, exc.strerror)

    def _seed_completion_cache(self) -> None:
        """A copy of the runtime's jedi cache (runtimes_install), so the first Tab in the sandbox is quick. The
        source is the server's own directory; what is written goes through the tree, as the sandbox (a file the
        sandbox made first at a name is left as it is)."""
        source = RuntimeStore().completion_cache
        try:
            paths = sorted(source.rglob("*")) if source.is_dir() else []
        except OSError as exc:  # a runtimes directory this server may not read: no cache, completion still works
            log.debug("sandbox %s: no completion cache to seed: %s", self.sandbox_id, exc.strerror)
            return
        for path in paths:
            relative = path.relative_to(source).as_posix()
            target = f"{HOME}/.cache/jedi/{relative}"
            try:
                if path.is_dir() and not path.is_symlink():
                    self.tree.makedirs(target)
                elif path.is_file() and not path.is_symlink():
                    self.tree.makedirs(target.rpartition("/")[0])
                    self.tree.write_new(target, path.read_bytes())
            except OSError as exc:  # a full disk, or jedi (or the sandbox) was there first
                log.debug("sandbox %s: completion cache %s not seeded: %s", self.sandbox_id, relative, exc.strerror)

    async def become(self, *, envs: dict[str, str], memory_mb: int, cpu_count: int) -> None:
        """Make a pooled sandbox the one a create asked for: its limits, and its env vars (the kernels started
        before them start again with them, before any cell). ValueError when it cannot be (it already uses more
        memory than asked for)."""
        usage = self.confinement.usage()
        if usage is not None and usage.memory_bytes is not None and usage.memory_bytes > memory_mb * 1024 * 1024 * 0.8:
            raise ValueError(f"it uses {usage.memory_bytes >> 20} MiB already, near the {memory_mb} MiB asked for")
        changed = (memory_mb, cpu_count) != (self.confinement.memory_mb, self.confinement.cpu_count)
        self.confinement.set_limits(memory_mb=memory_mb, cpu_count=cpu_count)
        languages = [context.runtime.name for context in self.contexts.all()]
        # A JVM and V8 size their heaps from the limits they find at start: they start again under the new ones.
        if envs or (changed and SIZED_AT_START.intersection(languages)):
            self.envs = dict(envs)
            await self.contexts.shutdown("the sandbox was given its environment")
            for language in languages:
                self.contexts.warm_default(language)

    async def pause(self) -> None:
        """Freeze every process of the sandbox (the cgroup freezer, where there is one: it also stops what left
        its process group, like bash_kernel's shell) and SIGSTOP each kernel's and command's group; memory and
        state stay."""
        await self.confinement.freeze()
        self.contexts.pause()
        self.processes.pause()

    async def resume(self) -> None:
        self.contexts.resume()
        self.processes.resume()
        await self.confinement.thaw()

    async def shutdown(self, reason: str = "the sandbox stopped") -> None:
        """Kill kernels, commands and watchers; the files stay (the server deletes the tree on kill). Jupyter
        endpoint clients hear `reason`."""
        await self.watchers.close()
        await asyncio.gather(self.contexts.shutdown(reason), self.processes.shutdown())
        await self.confinement.stop()

    def release(self) -> None:
        """After `shutdown`, for a sandbox that is gone for good: give back what it held on this machine."""
        self.confinement.release()

    def mark_state_lost(self, reason: str) -> None:
        self.contexts.mark_state_lost(reason)

    def isolation(self) -> dict[str, Any]:
        """What protections are in effect for this sandbox (get_info's `isolation`)."""
        return self.confinement.info()

    # ------------------------------------------------------------------ environment

    def sandbox_env(self) -> dict[str, str]:
        """The environment of the sandbox's kernels and commands (before per-call additions)."""
        return {**base_environment(self.root), **self.envs}

    def _command_cwd(self, cwd: str) -> Path:
        return self.paths.cwd(cwd)[1]

    # ------------------------------------------------------------------ plain HTTP

    async def upload(self, request: Request) -> Response:
        """POST /upload: multipart `file` + `path`."""
        return await transfer.upload(request, self.paths, self.tree, self.settings.max_upload_bytes)

    async def download(self, request: Request, path: str) -> Response:
        """GET /download/<path>: the raw bytes."""
        return await transfer.download(request, path, self.paths, self.tree)
