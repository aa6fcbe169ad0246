"""Sandbox languages: the names clients send (PROTOCOL.md 5.2) -> the runtime that runs them in a Jupyter kernel.

A `Runtime` says how to launch its kernel and how to smooth over what that kernel does differently (results as
display_data, colour codes, errors without an error message, ...). The kernels come from the runtimes directory
that `jupyter scalebox runtimes install` fills (see `server/runtimes_store.py`); Python falls back to the server's
own interpreter when that is not installed. The five other languages live in `languages.py`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...protocol.connect import ConnectError
from ...protocol.mime import CHART_MIME
from ..isolation.kernels import relay_python
from ..runtimes_store import LANGUAGES, RuntimeStore
from ..settings import ServerSettings
from .iopub import SEQUENCE_KEY

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

#: Runs inside Python kernels (IOPUB_LAUNCHER carries it there): the chart of each matplotlib figure shown.
CHART_SOURCE = Path(__file__).with_name("chart_extractor.py")

# Run in place of `python -m <module>` for kernels built on ipykernel (python, bash). Their iopub socket gets no
# high-water mark, so it never drops a message when the server is briefly behind (it queues in the kernel, inside
# the sandbox's memory limit), and every iopub message they really send carries a per-process number in its
# metadata, from which the server tells a lost message (server/agent/iopub.py, SEQUENCE_KEY).
# The cyclic garbage collector is off until the kernel serves: its passes over the objects that the imports make
# (none of which are garbage) were about a sixth of the kernel's start. Those objects are then frozen, so that no
# later pass looks at them again (the few cycles the start left are kept).
IOPUB_LAUNCHER = """\
import gc
gc.disable()
import itertools, os, runpy, sys
import zmq
SEQUENCE_KEY = "@KEY@"
from ipykernel.iostream import BackgroundSocket, IOPubThread
from jupyter_client.session import Session

_socket = zmq.Context.socket
def _lossless_socket(self, socket_type, *args, **kwargs):
    sock = _socket(self, socket_type, *args, **kwargs)
    if socket_type in (zmq.PUB, zmq.XPUB):
        sock.sndhwm = 0
    return sock
zmq.Context.socket = _lossless_socket

_send = Session.send
_counters = {}
def _numbered_send(self, stream, msg_or_type, content=None, parent=None, ident=None, buffers=None, track=False,
                   header=None, metadata=None):
    iopub = isinstance(stream, (BackgroundSocket, IOPubThread)) or (
        isinstance(stream, zmq.Socket) and stream.type in (zmq.PUB, zmq.XPUB))
    if iopub and not (self.check_pid and os.getpid() != self.pid):
        if not isinstance(msg_or_type, dict):
            msg_or_type = self.msg(msg_or_type, content=content, parent=parent, header=header, metadata=metadata)
        pid = os.getpid()
        counter = _counters.get(pid) or _counters.setdefault(pid, itertools.count())
        msg_or_type["metadata"] = {**(msg_or_type.get("metadata") or {}), SEQUENCE_KEY: [pid, next(counter)]}
    return _send(self, stream, msg_or_type, content, parent, ident, buffers, track, header, metadata)
Session.send = _numbered_send

if sys.argv[1] == "ipykernel_launcher":
    # No debugger (no frontend of a sandbox can reach it): ipykernel's would import debugpy, about 90 ms of the
    # kernel's start. ipykernel then says so in kernel_info; a cell can still import debugpy itself.
    sys.modules["debugpy"] = None
    try:
        import ipykernel.debugger
    finally:
        del sys.modules["debugpy"]

    # A history_reply names the current session 0 for a range and by its number for a tail; clients (and
    # jupyter_kernel_test) ask for a range by the number a tail gave them and expect it back.
    from ipykernel.ipkernel import IPythonKernel
    _history = IPythonKernel.do_history
    def _numbered_history(self, *args, **kwargs):
        reply = _history(self, *args, **kwargs)
        number = self.shell.history_manager.session_number
        reply["history"] = [(row[0] or number, *row[1:]) for row in reply.get("history", [])]
        return reply
    IPythonKernel.do_history = _numbered_history

    # Each matplotlib figure a cell shows carries its chart beside its PNG: a formatter for the chart MIME type
    # that knows figures by their type's name (nothing imports matplotlib for it), and whose code
    # (chart_extractor.py) is compiled when the first figure is shown. Not a printer registered with
    # for_type_by_name: matplotlib_inline pops `Figure` from every formatter whenever it sets the figure formats.
    # A figure the code cannot read gets no chart, silently.
    from IPython.core.formatters import BaseFormatter
    from traitlets import ObjectName, Unicode
    CHART_SOURCE = @CHART_SOURCE@
    _chart = []
    def _figure_chart(figure):
        if not _chart:
            namespace = {"__name__": "scalebox_chart_extractor"}
            try:
                exec(compile(CHART_SOURCE, "scalebox_chart_extractor.py", "exec"), namespace)
                _chart.append(namespace["chart_or_none"])
            except Exception:
                _chart.append(lambda figure: None)
        return _chart[0](figure)
    class _ChartFormatter(BaseFormatter):
        format_type = Unicode("@CHART_MIME@")
        print_method = ObjectName("_repr_scalebox_chart_")
        _return_type = (dict,)
        def __call__(self, obj):
            for cls in type(obj).__mro__:
                if cls.__name__ == "Figure" and cls.__module__ == "matplotlib.figure":
                    return _figure_chart(obj) if self.enabled else None
            return None
    _kernel_init = IPythonKernel.__init__
    def _init_with_charts(self, *args, **kwargs):
        _kernel_init(self, *args, **kwargs)
        try:
            formatter = _ChartFormatter(parent=self.shell.display_formatter)
            self.shell.display_formatter.formatters[formatter.format_type] = formatter
        except Exception:
            pass
    IPythonKernel.__init__ = _init_with_charts

from ipykernel.kernelapp import IPKernelApp
_app_start = IPKernelApp.start
def _start_collecting(self, *args, **kwargs):
    gc.freeze()
    gc.enable()
    return _app_start(self, *args, **kwargs)
IPKernelApp.start = _start_collecting

try:
    runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)
finally:
    gc.enable()
"""
IOPUB_LAUNCHER = (
    IOPUB_LAUNCHER.replace("@KEY@", SEQUENCE_KEY)
    .replace("@CHART_MIME@", CHART_MIME)
    .replace("@CHART_SOURCE@", repr(CHART_SOURCE.read_text()))
)


def lossless_iopub_argv(argv: list[str]) -> list[str]:
    """`[python, -m, module, *args]` as `[python, -c, IOPUB_LAUNCHER, module, *args]`; other argv unchanged."""
    if len(argv) >= 3 and argv[1] == "-m":
        return [argv[0], "-c", IOPUB_LAUNCHER, argv[2], *argv[3:]]
    return argv


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
    #: Whether the kernel speaks Jupyter's IPC transport (isolated sandboxes reach the others through a relay).
    ipc_transport = True
    #: After idle, wait for a kernel_info round trip so output the kernel sends late still reaches the cell.
    flush_barrier = False
    #: Built on ipykernel and started with `python -m module`: launched through IOPUB_LAUNCHER.
    ipykernel_based = False

    def __init__(self, store: RuntimeStore | None = None) -> None:
        self.store = store or RuntimeStore()

    @property
    def aliases(self) -> tuple[str, ...]:
        return LANGUAGES[self.name]

    def available(self) -> bool:
        return self.store.spec(self.name) is not None

    def unavailable_reason(self) -> str:
        """Why this language cannot run here, and what to do about it."""
        return self.store.status(self.name).reason

    def installed_spec(self) -> dict[str, Any]:
        """Our kernelspec for this language from the runtimes directory (the installer wrote it)."""
        spec = self.store.spec(self.name)
        if spec is None:
            raise ConnectError("failed_precondition", f"{self.name} is not available: {self.unavailable_reason()}")
        return spec

    def kernel_launch(self, context: LaunchContext) -> KernelLaunch:
        """The installed kernelspec, with the sandbox's environment and the runtime's own additions."""
        spec = self.installed_spec()
        env = {**dict(context.env), **{str(k): str(v) for k, v in spec.get("env", {}).items()}}
        env["HOME"] = str(context.home)
        env.update(self.kernel_env(context, env))
        argv = [str(arg) for arg in spec["argv"]]
        return KernelLaunch(
            argv=lossless_iopub_argv(argv) if self.ipykernel_based else argv,
            env=env,
            interrupt_mode=str(spec.get("interrupt_mode", "signal")),
        )

    def kernel_env(self, context: LaunchContext, env: Mapping[str, str]) -> dict[str, str]:
        """Variables this runtime's kernel needs on top of the sandbox's environment."""
        return {}

    def startup_code(self) -> str | None:
        """Code run silently once after the kernel starts (hooks that make its output regular)."""
        return None

    def env_code(self, env_vars: Mapping[str, str]) -> tuple[str, str] | None:
        """Code run silently before and after one cell to apply `ExecuteRequest.env_vars`; None: unsupported."""
        return None

    def chdir_code(self, path: str) -> str | None:
        """Code run silently to move a started kernel to `path` (a spare kernel taken over); None: it cannot."""
        return None

    def cell_output(self, code: str = "") -> CellOutput:
        """A fresh normaliser for one cell's output (kernels that misreport results or errors override it)."""
        return CellOutput()


class PythonRuntime(Runtime):
    """Python in ipykernel: the runtimes venv (numpy, pandas, matplotlib) when installed, else the interpreter
    that runs scalebox-local, with whatever it has."""

    name = "python"
    display_name = "Python"
    ipykernel_based = True

    def available(self) -> bool:
        return self.store.spec(self.name) is not None or importlib.util.find_spec("ipykernel") is not None

    def kernel_launch(self, context: LaunchContext) -> KernelLaunch:
        spec = self.store.spec(self.name)
        argv = [str(a) for a in spec["argv"]] if spec else [sys.executable, "-m", "ipykernel_launcher"]
        argv = argv if spec else [*argv, "-f", "{connection_file}"]
        env = dict(context.env)
        env["HOME"] = str(context.home)
        # One font cache for every sandbox: building it makes the first plot take seconds.
        env["MPLCONFIGDIR"] = str(context.settings.cache_dir / "matplotlib")
        env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # silences debugpy's frozen-modules warning on stderr
        # No MPLBACKEND from the server: ipykernel then picks its inline backend, so plots become image/png.
        env.pop("MPLBACKEND", None)
        return KernelLaunch(argv=lossless_iopub_argv(argv), env=env)

    def chdir_code(self, path: str) -> str:
        return f"__import__('os').chdir({json.dumps(path)})"

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


def sandbox_python_version(store: RuntimeStore | None = None) -> str:
    """`3.11`: the version of the Python that sandbox cells run on (the runtimes venv's, else the server's)."""
    store = store or RuntimeStore()
    marker = store.marker("python") if store.spec("python") is not None else None
    version = str((marker or {}).get("versions", {}).get("python", ""))
    if version.count(".") >= 1:
        return ".".join(version.split(".")[:2])
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def sandbox_host_dirs(store: RuntimeStore | None = None) -> list[str]:
    """The host directories a sandbox's kernels need (bound read-only): the runtimes, the prefix of the
    interpreter the runtimes venv was made from when that is not a system one, and, only where python falls back
    to scalebox-local's own interpreter (no runtimes venv, or no /usr/bin/python3 for the socket relay), that
    interpreter's prefix. The server's environment is otherwise nowhere inside."""
    store = store or RuntimeStore()
    dirs = [str(store.root)]
    if store.spec("python") is not None:
        dirs += _venv_base_prefix(store.venv)
    else:
        dirs += [sys.prefix, sys.base_prefix]
    if relay_python() == sys.executable:
        dirs.append(sys.base_prefix)
    return dirs


def _venv_base_prefix(venv: Path) -> list[str]:
    """The prefix of the interpreter a venv was made from (`home` in its pyvenv.cfg is that prefix's bin)."""
    try:
        lines = (venv / "pyvenv.cfg").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        key, _, value = line.partition("=")
        if key.strip() == "home" and value.strip():
            return [str(Path(os.path.realpath(value.strip())).parent)]
    return []


def sandbox_bin_dirs(store: RuntimeStore | None = None) -> list[str]:
    """Directories put first on a sandbox's PATH: the runtimes venv (python, pip, deno), else the server's."""
    store = store or RuntimeStore()
    if store.spec("python") is not None:
        return [str(store.venv / "bin")]
    return [os.path.dirname(sys.executable)]


def sandbox_language_env(home: Path, store: RuntimeStore | None = None) -> dict[str, str]:
    """Where each language's package tools put packages: below the sandbox's home, so that `pip install`,
    `npm install -g` or R's install.packages in one sandbox are seen by that sandbox only (kernels and commands).
    The Python and R directories are the ones the Session layer installs into."""
    python_lib = home / ".local" / "lib" / "scalebox" / f"python{sandbox_python_version(store)}"
    return {
        "PIP_TARGET": str(python_lib),
        "PYTHONPATH": str(python_lib),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "R_LIBS_USER": str(home / ".local" / "lib" / "scalebox" / "R"),
        "NPM_CONFIG_PREFIX": str(home / ".local"),
        "NODE_PATH": os.pathsep.join([str(home / "node_modules"), str(home / ".local" / "lib" / "node_modules")]),
        "DENO_DIR": str(home / ".cache" / "deno"),
    }


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
        runtime = self._runtimes.get(name) if name else None
        if runtime is not None and runtime.available():
            return runtime
        available = ", ".join(self.available()) or "none"
        if name is None:
            raise ConnectError("invalid_argument", f"unknown language {wanted!r}; available: {available}")
        why = f" ({runtime.unavailable_reason()})" if runtime is not None else ""
        message = f"language {wanted!r} is not available on this scalebox-local{why}; available: {available}"
        raise ConnectError("invalid_argument", message)


def default_registry(store: RuntimeStore | None = None) -> RuntimeRegistry:
    """Every language; each is available once the runtime installer has put it in place."""
    from .languages import BashRuntime, DenoRuntime, JavaRuntime, NodeRuntime, RRuntime

    store = store or RuntimeStore()
    registry = RuntimeRegistry()
    for runtime_class in (PythonRuntime, RRuntime, NodeRuntime, DenoRuntime, JavaRuntime, BashRuntime):
        registry.register(runtime_class(store))
    return registry
