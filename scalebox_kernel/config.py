"""Settings shared by every door (kernel, magics, client, Session, CLI): one traitlets object, each trait mirrored
by an environment variable named in its help.

`ScaleboxConfig.load()` is how every door makes one. Each setting comes from, the later winning:
`jupyter_scalebox_config.py` (or `.json`) on the Jupyter config path, `.env` in the working directory, the
environment, then the door's arguments (command-line options, a traitlets config given, keywords). A bad value
is one InvalidArgument line naming where it came from and what it accepts.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from dotenv import dotenv_values
from jupyter_core.paths import jupyter_config_path, jupyter_data_dir
from traitlets import Bool, Enum, Float, Int, TraitError, Unicode, default
from traitlets.config import Config, Configurable
from traitlets.config.loader import ConfigFileNotFound, JSONFileConfigLoader, PyFileConfigLoader

from .errors import InvalidArgument

DEFAULT_CLOUD_URL = "https://api.scalebox.dev"
#: The configuration file every door reads, on the Jupyter config path (`jupyter --paths`).
CONFIG_FILE = "jupyter_scalebox_config"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

T = TypeVar("T")


def _parsed(name: str, parse: Callable[[str], T], fallback: T, accepts: str) -> T:
    """The environment variable `name` (or `.env`'s) parsed, `fallback` when unset; InvalidArgument, naming the
    variable and what it accepts, when it does not parse."""
    raw = _env(name)
    if raw is None:
        return fallback
    try:
        return parse(raw.strip())
    except ValueError:
        raise InvalidArgument(f"{name}={raw[:60]!r} is not valid: it takes {accepts}") from None


def _number(kind: Callable[[str], T], low: float = 0) -> Callable[[str], T]:
    def parse(text: str) -> T:
        value = kind(text)
        if not math.isfinite(value) or value < low:  # type: ignore[arg-type,operator]
            raise ValueError(text)
        return value

    return parse


def _flag(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ValueError(text)


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in choices:
            raise ValueError(text)
        return text.lower()

    return parse


def file_config(paths: list[str] | None = None) -> Config:
    """The `jupyter_scalebox_config.py` / `.json` files on the Jupyter config path, merged as every Jupyter
    application merges them: a directory earlier on the path wins, and in one directory `.json` beats `.py`.
    Read again only when one of them changed."""
    directories = list(paths if paths is not None else jupyter_config_path())
    files = [os.path.join(d, CONFIG_FILE + suffix) for d in reversed(directories) for suffix in (".py", ".json")]
    stamp = tuple(_stamp(path) for path in files)
    cached = _FILE_CONFIGS.get(tuple(files))
    if cached is not None and cached[0] == stamp:
        return copy.deepcopy(cached[1])
    merged = Config()
    for path, seen in zip(files, stamp, strict=True):
        if seen is None:
            continue
        directory, name = os.path.split(path)
        loader = (JSONFileConfigLoader if name.endswith(".json") else PyFileConfigLoader)(name, directory)
        try:
            merged.merge(loader.load_config())
        except ConfigFileNotFound:
            continue
        except Exception as exc:  # a config file is user code: any error in it
            raise InvalidArgument(f"{path}: {type(exc).__name__}: {exc}") from None
    _FILE_CONFIGS[tuple(files)] = (stamp, copy.deepcopy(merged))
    return merged


#: file_config's last answer per list of files, with the files' (mtime, size, inode) when it was read.
_FILE_CONFIGS: dict[tuple[str, ...], tuple[tuple[tuple[int, int, int] | None, ...], Config]] = {}


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        seen = os.stat(path)
    except OSError:
        return None
    return (seen.st_mtime_ns, seen.st_size, seen.st_ino)


def _env(*names: str) -> str | None:
    """The first of `names` set in the environment, else in `./.env`."""
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    dotenv = _dotenv()
    for name in names:
        value = dotenv.get(name)
        if value:
            return value
    return None


def _dotenv() -> dict[str, str | None]:
    path = Path.cwd() / ".env"
    return dotenv_values(path) if path.is_file() else {}


class ScaleboxConfig(Configurable):
    """Where sandboxes live and how long things may take."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # The traits given (keywords, a config file or command line), as opposed to left at their defaults.
        self._given = (set(kwargs) - {"config", "parent"}) | set(self.config.get(type(self).__name__, {}))

    def is_set(self, name: str) -> bool:
        """Whether the trait `name` was set (config file, .env, environment, arguments) rather than defaulted."""
        return name in self._given or _env(*self.ENV.get(name, ())) is not None

    api_key = Unicode(
        None,
        allow_none=True,
        config=True,
        help="Scalebox API key. With one, sandboxes run in the Scalebox cloud (or at api_url); without one, on "
        "scalebox-local. Env: SCALEBOX_API_KEY (or SBX_API_KEY).",
    )

    @default("api_key")
    def _default_api_key(self) -> str | None:
        return _env("SCALEBOX_API_KEY", "SBX_API_KEY")

    api_url = Unicode(
        None,
        allow_none=True,
        config=True,
        help="Base URL of the control plane, without /v1 (e.g. https://api.scalebox.dev). "
        "Env: SCALEBOX_API_URL, or SBX_DOMAIN as the Python SDK spells it (host[:port]/v1).",
    )

    @default("api_url")
    def _default_api_url(self) -> str | None:
        url = _env("SCALEBOX_API_URL")
        if url:
            return url.rstrip("/")
        domain = _env("SBX_DOMAIN")
        if domain:
            domain = domain.strip("/")
            if domain.endswith("/v1"):
                domain = domain[: -len("/v1")]
            return domain if "://" in domain else f"https://{domain}"
        return None

    ca_file = Unicode(
        None,
        allow_none=True,
        config=True,
        help="PEM file of certificates to trust for HTTPS (scalebox-local's own certificate, say). "
        "Env: SCALEBOX_CA_FILE; SSL_CERT_FILE is honoured as usual.",
    )

    @default("ca_file")
    def _default_ca_file(self) -> str | None:
        return _env("SCALEBOX_CA_FILE")

    request_timeout = Float(
        30.0,
        min=0.001,
        config=True,
        help="Seconds one HTTP request may take (not a cell: cells have execution_timeout). "
        "Env: SCALEBOX_REQUEST_TIMEOUT.",
    )

    @default("request_timeout")
    def _default_request_timeout(self) -> float:
        return _parsed("SCALEBOX_REQUEST_TIMEOUT", _number(float, 0.001), 30.0, "seconds, a number above 0")

    stream_idle_timeout = Float(
        60.0,
        min=0.0,
        config=True,
        help="Seconds a stream (a running cell, a command's output, a directory watch) may carry nothing, not even "
        "a keepalive, before the server counts as gone and the call fails with ServerUnavailable; 0 means wait "
        "forever. Keep it well above the server's keepalive interval (the client asks for one every quarter of "
        "it). Env: SCALEBOX_STREAM_IDLE_TIMEOUT.",
    )

    @default("stream_idle_timeout")
    def _default_stream_idle_timeout(self) -> float:
        return _parsed("SCALEBOX_STREAM_IDLE_TIMEOUT", _number(float), 60.0, "seconds, 0 or more (0: no limit)")

    execution_timeout = Float(
        0.0,
        min=0.0,
        config=True,
        help="Seconds a cell may run before it is interrupted; 0 means no limit. Env: SCALEBOX_EXECUTION_TIMEOUT.",
    )

    @default("execution_timeout")
    def _default_execution_timeout(self) -> float:
        return _parsed("SCALEBOX_EXECUTION_TIMEOUT", _number(float), 0.0, "seconds, 0 or more (0: no limit)")

    channel = Enum(
        ["auto", "jupyter", "execute"],
        "auto",
        config=True,
        help="How the Scalebox kernel reaches the sandbox's kernel: `jupyter`, the sandbox's Jupyter endpoint (every "
        "message: widgets, input(), clear_output, completion); `execute`, the ExecutionService path (stdout, stderr, "
        "results and errors only); `auto`, the endpoint where the back end has one. Env: SCALEBOX_CHANNEL.",
    )

    @default("channel")
    def _default_channel(self) -> str:
        return _parsed("SCALEBOX_CHANNEL", _choice("auto", "jupyter", "execute"), "auto", "auto, jupyter or execute")

    reconnect_timeout = Float(
        60.0,
        min=0.0,
        config=True,
        help="Seconds the Scalebox kernel keeps trying to re-open a dropped connection to the sandbox's kernel "
        "before the running cell fails. Env: SCALEBOX_RECONNECT_TIMEOUT.",
    )

    @default("reconnect_timeout")
    def _default_reconnect_timeout(self) -> float:
        return _parsed("SCALEBOX_RECONNECT_TIMEOUT", _number(float), 60.0, "seconds, 0 or more")

    sandbox_timeout = Int(
        300,
        min=1,
        config=True,
        help="Seconds a new sandbox lives before it is killed, unless extended. Env: SCALEBOX_SANDBOX_TIMEOUT.",
    )

    @default("sandbox_timeout")
    def _default_sandbox_timeout(self) -> int:
        return _parsed("SCALEBOX_SANDBOX_TIMEOUT", _number(int, 1), 300, "a whole number of seconds, 1 or more")

    idle_pause = Float(
        900.0,
        min=0.0,
        config=True,
        help="Seconds a notebook's sandbox may sit idle (no cell running) before the Scalebox kernel pauses it, "
        "memory and files kept; the next cell resumes it. While the kernel lives and the notebook is in use, "
        "the sandbox is extended before it ends. 0 means never pause. Env: SCALEBOX_IDLE_PAUSE.",
    )

    @default("idle_pause")
    def _default_idle_pause(self) -> float:
        return _parsed("SCALEBOX_IDLE_PAUSE", _number(float), 900.0, "seconds, 0 or more (0: never pause)")

    template = Unicode(
        "code-interpreter",
        config=True,
        help="Template of new sandboxes. Env: SCALEBOX_TEMPLATE.",
    )

    @default("template")
    def _default_template(self) -> str:
        return _env("SCALEBOX_TEMPLATE") or "code-interpreter"

    data_dir = Unicode(
        config=True,
        help="Where scalebox-local keeps its database, certificates and sandbox files. Env: SCALEBOX_DATA_DIR.",
    )

    @default("data_dir")
    def _default_data_dir(self) -> str:
        return _env("SCALEBOX_DATA_DIR") or os.path.join(jupyter_data_dir(), "scalebox")

    local_autostart = Bool(
        True,
        config=True,
        help="Start scalebox-local in the background when no API key is set and it is not running. "
        "Env: SCALEBOX_LOCAL_AUTOSTART (0 to disable).",
    )

    @default("local_autostart")
    def _default_local_autostart(self) -> bool:
        return _parsed("SCALEBOX_LOCAL_AUTOSTART", _flag, True, "1 or 0 (true/false, yes/no, on/off)")

    #: The environment variables of each trait: set (there or in `.env`), they beat the config file.
    ENV: dict[str, tuple[str, ...]] = {
        "api_key": ("SCALEBOX_API_KEY", "SBX_API_KEY"),
        "api_url": ("SCALEBOX_API_URL", "SBX_DOMAIN"),
        "ca_file": ("SCALEBOX_CA_FILE",),
        "request_timeout": ("SCALEBOX_REQUEST_TIMEOUT",),
        "stream_idle_timeout": ("SCALEBOX_STREAM_IDLE_TIMEOUT",),
        "execution_timeout": ("SCALEBOX_EXECUTION_TIMEOUT",),
        "channel": ("SCALEBOX_CHANNEL",),
        "reconnect_timeout": ("SCALEBOX_RECONNECT_TIMEOUT",),
        "sandbox_timeout": ("SCALEBOX_SANDBOX_TIMEOUT",),
        "idle_pause": ("SCALEBOX_IDLE_PAUSE",),
        "template": ("SCALEBOX_TEMPLATE",),
        "data_dir": ("SCALEBOX_DATA_DIR",),
        "local_autostart": ("SCALEBOX_LOCAL_AUTOSTART",),
    }

    @classmethod
    def load(cls, config: Config | None = None, **overrides: Any) -> ScaleboxConfig:
        """The configuration every door uses: the config file, then `.env`, then the environment, then `config`
        (a door's command line or traitlets config), then `overrides`, the later winning. Every value is checked
        here: a bad one is an InvalidArgument naming it."""
        section = dict(file_config().get(cls.__name__, {}))
        for name in list(section):
            if _env(*cls.ENV.get(name, ())) is not None:  # the environment (or .env) beats the file
                del section[name]
        merged = Config({cls.__name__: section})
        if config is not None:
            merged.merge(config)
        try:
            loaded = cls(config=merged, **overrides)
            for name in cls.class_trait_names(config=True):
                getattr(loaded, name)  # defaults read the environment: a bad variable fails now, not mid-cell
        except TraitError as exc:
            raise InvalidArgument(f"ScaleboxConfig: {exc}") from None
        return loaded

    @classmethod
    def defaults(cls) -> ScaleboxConfig:
        """The built-in defaults only, reading neither files nor the environment (for a door whose configuration
        is broken, so that it can still say so)."""
        values = {
            name: trait.default_value
            for name, trait in cls.class_traits(config=True).items()
            if name in cls.ENV and name != "data_dir"
        }
        return cls(**values)

    @property
    def uses_cloud(self) -> bool:
        return bool(self.api_key)

    def secrets(self) -> list[str]:
        """Values that must never appear in output or logs."""
        return [s for s in (self.api_key,) if s]
