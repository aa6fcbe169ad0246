"""Where scalebox-local's language runtimes live, and what is installed there.

The runtime installer (`jupyter scalebox runtimes install`) fills one directory of its own, never the user's
environment:

    <runtimes dir>/venv/              Python venv from Debian's /usr/bin/python3: ipykernel, numpy, pandas,
                                      matplotlib, bash_kernel, jjava, deno
    <runtimes dir>/npm/               npm prefix holding tslab (the `jslab` Node.js kernel)
    <runtimes dir>/kernels/<lang>/    our own kernelspec per language (absolute paths)
    <runtimes dir>/markers/<lang>.json  what was installed, with versions (re-runs skip what is there)

R comes from Debian (`r-base-core`, `r-cran-irkernel`); only its kernelspec lives here. The directory is
`$SCALEBOX_RUNTIMES_DIR`, else `/opt/scalebox/runtimes` for root (outside root's home, so that a sandbox's
unprivileged uid can run it), else `$XDG_DATA_HOME/scalebox/runtimes` (`~/.local/share/...`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_VAR = "SCALEBOX_RUNTIMES_DIR"
ROOT_DEFAULT = Path("/opt/scalebox/runtimes")
#: Canonical language name -> every name accepted for it (lower case), in the order languages are listed and installed.
LANGUAGES: dict[str, tuple[str, ...]] = {
    "python": ("python", "python3"),
    "r": ("r",),
    "nodejs": ("nodejs", "javascript", "node", "js"),
    "typescript": ("typescript", "deno", "ts"),
    "java": ("java", "ijava"),
    "bash": ("bash",),
}
ORDER = tuple(LANGUAGES)
#: Bumped when what a marker promises changes, so that re-runs redo older installs.
MARKER_FORMAT = 1


def runtimes_dir() -> Path:
    """The runtimes directory in effect (see the module docstring)."""
    configured = os.environ.get(ENV_VAR)
    if configured:
        return Path(configured).expanduser().absolute()
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return ROOT_DEFAULT
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data_home) / "scalebox" / "runtimes"


@dataclass(frozen=True)
class RuntimeStatus:
    """One language as `runtimes list` shows it."""

    language: str
    state: str  # "installed", "fallback" (python on the server's interpreter) or "missing"
    versions: dict[str, str] = field(default_factory=dict)
    path: str = ""
    reason: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "language": self.language,
            "state": self.state,
            "versions": self.versions,
            "path": self.path,
            "reason": self.reason,
        }


class RuntimeStore:
    """Paths inside one runtimes directory, and the kernelspecs and markers found there."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else runtimes_dir()

    @property
    def venv(self) -> Path:
        return self.root / "venv"

    @property
    def completion_cache(self) -> Path:
        """jedi's cache of the modules completed most, copied into each sandbox's ~/.cache/jedi."""
        return self.root / "completion-cache" / "jedi"

    @property
    def venv_python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def npm_prefix(self) -> Path:
        return self.root / "npm"

    def spec_dir(self, language: str) -> Path:
        return self.root / "kernels" / language

    def marker_path(self, language: str) -> Path:
        return self.root / "markers" / f"{language}.json"

    def marker(self, language: str) -> dict[str, Any] | None:
        """The install marker of a language, if it is current."""
        try:
            data = json.loads(self.marker_path(language).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("format") == MARKER_FORMAT else None

    def spec(self, language: str) -> dict[str, Any] | None:
        """Our kernelspec of a language, if it is installed and its program is still there."""
        try:
            spec = json.loads((self.spec_dir(language) / "kernel.json").read_text())
        except (OSError, ValueError):
            return None
        argv = spec.get("argv") if isinstance(spec, dict) else None
        if not argv or not isinstance(argv, list) or not _runnable(str(argv[0])):
            return None
        return spec

    def installed(self, language: str) -> bool:
        return self.marker(language) is not None and self.spec(language) is not None

    def status(self, language: str) -> RuntimeStatus:
        """Installed (with versions), python's fallback, or missing and why."""
        marker = self.marker(language)
        if marker is not None and self.spec(language) is not None:
            return RuntimeStatus(language, "installed", dict(marker.get("versions", {})), str(marker.get("path", "")))
        if language == "python" and _server_has_ipykernel():
            reason = (
                "the runtimes venv is not installed; python runs on scalebox-local's own interpreter, with only the "
                "packages it has (run 'jupyter scalebox runtimes install --language python' for numpy, pandas and "
                "matplotlib)"
            )
            return RuntimeStatus(language, "fallback", {}, os.path.realpath(_sys_executable()), reason)
        return RuntimeStatus(language, "missing", reason=missing_reason(language, self))


def missing_reason(language: str, store: RuntimeStore) -> str:
    """Why a language is not installed, and what to run."""
    install = f"run 'jupyter scalebox runtimes install --language {language}'"
    if language == "r":
        if not shutil.which("R"):
            return (
                "R is not installed: run 'jupyter scalebox runtimes install --language r' as root, or install "
                "Debian's r-base-core and r-cran-irkernel (apt-get install r-base-core r-cran-irkernel)"
            )
        return f"R is present but its kernel is not set up: {install} (needs the IRkernel R package)"
    if language == "java" and not shutil.which("java"):
        return f"no JDK found (java on PATH): install one (apt-get install default-jdk-headless), then {install}"
    if language == "nodejs" and not (shutil.which("node") and shutil.which("npm")):
        return f"Node.js and npm are not installed (apt-get install nodejs npm), then {install}"
    if store.marker_path(language).exists():
        return f"the install at {store.root} is incomplete or out of date: {install}"
    return f"not installed in {store.root}: {install}"


def _runnable(program: str) -> bool:
    path = Path(program)
    return path.is_absolute() and path.is_file() and os.access(path, os.X_OK)


def _sys_executable() -> str:
    return sys.executable


def _server_has_ipykernel() -> bool:
    return importlib.util.find_spec("ipykernel") is not None
