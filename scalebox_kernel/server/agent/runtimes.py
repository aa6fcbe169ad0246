"""Sandbox languages: the names clients send (PROTOCOL.md 5.2) -> the runtime that runs them in a Jupyter kernel.

A `Runtime` says how to launch its kernel and how to smooth over what that kernel does differently (results as
display_data, colour codes, errors without an error message, ...). Only Python is installed here for now; the
other five languages are known by name, so asking for them gives a clear "not available" instead of "unknown".
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...protocol.connect import ConnectError
from ..settings import ServerSettings

#: Canonical language name -> every name accepted on the wire for it (lower case).
LANGUAGES: dict[str, tuple[str, ...]] = {
    "python": ("python", "python3"),
    "r": ("r",),
    "nodejs": ("nodejs", "javascript", "node", "js"),
    "typescript": ("typescript", "deno", "ts"),
    "java": ("java", "ijava"),
    "bash": ("bash",),
}
_CANONICAL = {alias: name for name, aliases in LANGUAGES.items() for alias in aliases}


@dataclass(frozen=True)
class LaunchContext:
    """What a runtime gets to build its kernel's command line and environment."""

    settings: ServerSettings
    home: Path  # host directory that is the sandbox's /home/user
    env: Mapping[str, str]  # the sandbox's environment (server basics + the sandbox's envs)


@dataclass(frozen=True)
class KernelLaunch:
    """A kernelspec for one kernel of one sandbox (argv may hold `{connection_file}`)."""

    argv: list[str]
    env: dict[str, str]
    interrupt_mode: str = "signal"  # or "message" (interrupt_request on the control channel)
    metadata: dict[str, Any] = field(default_factory=dict)


Message = tuple[str, dict[str, Any]]  # (Jupyter msg_type, content)


class CellOutput:
    """Turns one cell's kernel messages into the messages that become protocol output.

    The default passes iopub messages through and adds pager payloads of the reply as displays. A runtime
    subclasses it to fix what its kernel does differently (R's results as display_data, tslab's errors without
    an `error` message, ...); it lives for one cell, so it may hold state between messages.
    """

    def message(self, msg_type: str, content: dict[str, Any]) -> list[Message]:
        """One iopub message of the cell (stream, display_data, execute_result, error, ...)."""
        return [(msg_type, content)]

    def reply(self, content: dict[str, Any]) -> list[Message]:
        """The cell's execute_reply, after every iopub message: what it adds to the output."""
        return [
            ("display_data", {"data": page["data"], "metadata": {}})
            for page in content.get("payload", [])
            if page.get("source") == "page" and page.get("data")
        ]


class Runtime:
    """A language runtime; subclasses launch their kernel and may normalise its output."""

    name = ""  # canonical language name (a key of LANGUAGES)
    display_name = ""
    #: Restart instead of interrupting (a kernel that dies or wedges on interrupt, like Deno's).
    interrupt_restarts = False
    #: Seconds to wait after an error before the next cell (tslab answers `abort` for 200 ms after one).
    settle_after_error = 0.0

    @property
    def aliases(self) -> tuple[str, ...]:
        return LANGUAGES[self.name]

    def available(self) -> bool:
        return True

    def kernel_launch(self, context: LaunchContext) -> KernelLaunch:
        raise NotImplementedError

    def env_code(self, env_vars: Mapping[str, str]) -> tuple[str, str] | None:
        """Code run silently before and after one cell to apply `ExecuteRequest.env_vars`; None: unsupported."""
        return None

    def cell_output(self) -> CellOutput:
        """A fresh normaliser for one cell's output (kernels that misreport results or errors override it)."""
        return CellOutput()


class PythonRuntime(Runtime):
    """Python in ipykernel, on the interpreter that runs scalebox-local (numpy/pandas/matplotlib if installed)."""

    name = "python"
    display_name = "Python"

    def available(self) -> bool:
        return importlib.util.find_spec("ipykernel") is not None

    def kernel_launch(self, context: LaunchContext) -> KernelLaunch:
        env = dict(context.env)
        env["HOME"] = str(context.home)
        # One font cache for every sandbox: building it makes the first plot take seconds.
        env["MPLCONFIGDIR"] = str(context.settings.cache_dir / "matplotlib")
        env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # silences debugpy's frozen-modules warning on stderr
        # No MPLBACKEND from the server: ipykernel then picks its inline backend, so plots become image/png.
        return KernelLaunch(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"], env=env)

    def env_code(self, env_vars: Mapping[str, str]) -> tuple[str, str]:
        values = json.dumps(dict(env_vars))
        setup = (
            "(lambda os, new: (setattr(os, '_scalebox_saved_env', {k: os.environ.get(k) for k in new}),"
            f" os.environ.update(new)))(__import__('os'), {values})"
        )
        restore = (
            "(lambda os: [os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)"
            " for k, v in os.__dict__.pop('_scalebox_saved_env', {}).items()])(__import__('os'))"
        )
        return setup, restore


class RuntimeRegistry:
    """The runtimes this scalebox-local can run, looked up by any accepted language name."""

    def __init__(self) -> None:
        self._runtimes: dict[str, Runtime] = {}

    def register(self, runtime: Runtime) -> None:
        if runtime.name not in LANGUAGES:
            raise ValueError(f"unknown language {runtime.name!r}; add it to LANGUAGES first")
        self._runtimes[runtime.name] = runtime

    def available(self) -> list[str]:
        """Canonical names of the languages that can run here, in LANGUAGES order."""
        return [name for name in LANGUAGES if name in self._runtimes and self._runtimes[name].available()]

    def resolve(self, language: str) -> Runtime:
        """The runtime for a wire language name (empty means python), or the error a client can act on."""
        wanted = (language or "python").strip().lower()
        name = _CANONICAL.get(wanted)
        available = ", ".join(self.available()) or "none"
        if name is None:
            raise ConnectError("invalid_argument", f"unknown language {wanted!r}; available: {available}")
        runtime = self._runtimes.get(name)
        if runtime is None or not runtime.available():
            message = f"language {wanted!r} is not available on this scalebox-local; available: {available}"
            raise ConnectError("invalid_argument", message)
        return runtime


def default_registry() -> RuntimeRegistry:
    registry = RuntimeRegistry()
    registry.register(PythonRuntime())
    return registry
