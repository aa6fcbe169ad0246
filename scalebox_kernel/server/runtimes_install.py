"""The installer behind `jupyter scalebox runtimes install`: the language kernels scalebox-local runs, in a
directory of their own.

Idempotent: a language whose marker, kernelspec and program are in place (and whose recipe has not changed) is
skipped, so a re-run takes a second. Subprocess output goes to `<runtimes dir>/install.log`.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .. import __version__
from .isolation.tools import which
from .runtimes_store import LANGUAGES, MARKER_FORMAT, ORDER, RuntimeStore, missing_reason

BASE_PYTHON = "/usr/bin/python3"  # Debian's: usable by an unprivileged uid, unlike a python under root's home
JAVA_OPTS = "-Xmx512m -XX:+UseSerialGC -XX:TieredStopAtLevel=1"  # a small, quick-starting JVM per sandbox


@dataclass(frozen=True)
class Recipe:
    """What one language needs: packages from PyPI (into the venv), npm (into the prefix) and Debian."""

    pip: tuple[str, ...] = ()
    npm: tuple[str, ...] = ()
    apt: tuple[str, ...] = ()
    spec_version: int = 1  # bumped when the kernelspec we write for it changes

    @property
    def ident(self) -> str:
        text = json.dumps([self.pip, self.npm, self.apt, self.spec_version])
        return hashlib.sha256(text.encode()).hexdigest()[:12]


RECIPES: dict[str, Recipe] = {
    # orjson: jupyter_client packs messages with it when it is there (a 20 MB plot in 13 ms instead of 300)
    "python": Recipe(pip=("ipykernel", "orjson", "numpy", "pandas", "matplotlib", "ipywidgets", "tqdm")),
    "r": Recipe(apt=("r-base-core", "r-cran-irkernel")),
    "nodejs": Recipe(npm=("tslab",)),
    "typescript": Recipe(pip=("deno",)),
    "java": Recipe(pip=("jjava",)),
    "bash": Recipe(pip=("ipykernel", "orjson", "bash_kernel")),
}


#: Run by the runtime's Python to fill jedi's cache (XDG_CACHE_HOME/jedi) with the modules completed most.
_WARM_COMPLETION = """\
import jedi
for code in ("import os; os.pa", "import json; json.lo", "import re; re.co", "import sys; sys.pa",
             "import pathlib; pathlib.Pa", "import collections; collections.Co", "import math; math.sq"):
    jedi.Interpreter(code, [{}]).complete()
"""


class InstallError(Exception):
    """A step failed; the message says what and where the log is."""


def canonical_language(name: str) -> str:
    key = name.strip().lower()
    for language, aliases in LANGUAGES.items():
        if key in aliases:
            return language
    raise ValueError(f"unknown language {name!r}; choose from {', '.join(ORDER)}")


#: Tools that confine sandboxes -> the Debian package that has them.
ISOLATION_TOOLS = {
    "bwrap": "bubblewrap",
    "slirp4netns": "slirp4netns",  # a sandbox's internet (without it: no network at all)
    "ip": "iproute2",  # the routes that keep that internet off the host
    "mkfs.ext4": "e2fsprogs",  # per-sandbox disk images (the disk limit)
    "s3fs": "s3fs",  # object storage mounts (object_storage on create)
}


class Installer:
    """Installs languages into a RuntimeStore; `install()` returns each language's outcome."""

    def __init__(self, store: RuntimeStore, *, force: bool = False, quiet: bool = False) -> None:
        self.store = store
        self.force = force
        self.quiet = quiet
        self._tty = sys.stdout.isatty()
        self.is_root = os.geteuid() == 0
        self._apt_updated = False

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    # ------------------------------------------------------------------ driver

    def install(self, languages: list[str]) -> dict[str, str]:
        """Install `languages`; -> language -> "installed" / "present" / "failed: <why>"."""
        os.umask(0o022)
        self.store.root.mkdir(parents=True, exist_ok=True)
        outcomes: dict[str, str] = {}
        with self._lock():
            self._isolation_tools()
            todo = [lang for lang in languages if self.force or not self._current(lang)]
            for lang in languages:
                if lang not in todo:
                    outcomes[lang] = "present"
                    self.say(f"{lang}: already installed ({versions_text(self._versions(lang))})")
            if not todo:
                return outcomes
            todo = self._system_packages(todo, outcomes)
            todo = self._fetch(todo, outcomes)
            for lang in [lang for lang in ORDER if lang in todo]:
                try:
                    self._install_one(lang)
                except InstallError as exc:
                    outcomes[lang] = f"failed: {exc}"
                    self.say(f"{lang}: FAILED: {exc}")
                    continue
                outcomes[lang] = "installed"
                self.say(f"{lang}: ready ({versions_text(self._versions(lang))})")
        return outcomes

    def _versions(self, lang: str) -> dict[str, str]:
        return dict((self.store.marker(lang) or {}).get("versions", {}))

    def _current(self, lang: str) -> bool:
        marker = self.store.marker(lang)
        if lang == "python" and not self.store.completion_cache.is_dir():
            return False
        return bool(marker and marker.get("recipe") == RECIPES[lang].ident and self.store.spec(lang) is not None)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """One installer at a time per runtimes directory (tests and CI may race)."""
        with open(self.store.root / ".install.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ system prerequisites (Debian)

    def _system_packages(self, todo: list[str], outcomes: dict[str, str]) -> list[str]:
        """Install the Debian packages the languages need when root; drop (as failed) those that cannot run."""
        needs: dict[str, tuple[str, ...]] = {}
        if "r" in todo and not self._r_ready():
            needs["r"] = RECIPES["r"].apt
        if "java" in todo and not shutil.which("java"):
            needs["java"] = ("default-jdk-headless",)
        if "nodejs" in todo and not (shutil.which("node") and shutil.which("npm")):
            needs["nodejs"] = ("nodejs", "npm")
        venv_langs = [lang for lang in todo if RECIPES[lang].pip]
        if venv_langs and not self.store.venv_python.exists() and not _has_ensurepip():
            for lang in venv_langs:
                needs[lang] = (*needs.get(lang, ()), "python3-venv")
        if not needs:
            return todo
        packages = sorted({pkg for pkgs in needs.values() for pkg in pkgs})
        if self.is_root and shutil.which("apt-get"):
            self.say(f"system: apt-get install {' '.join(packages)}")
            try:
                self._apt(packages)
                return todo
            except InstallError as exc:
                reason = str(exc)
        else:
            reason = "not root, so system packages cannot be installed here"
        for lang, pkgs in needs.items():
            why = missing_reason(lang, self.store) if lang != "python" else "python3-venv is missing"
            outcomes[lang] = f"failed: {why} ({reason}; needs: apt-get install {' '.join(pkgs)})"
            self.say(f"{lang}: MISSING: {outcomes[lang][len('failed: ') :]}")
        return [lang for lang in todo if lang not in needs]

    def _isolation_tools(self) -> None:
        """The tools scalebox-local confines sandboxes with; best effort: the server still runs without them and
        says which protections are missing."""
        missing = [pkg for tool, pkg in ISOLATION_TOOLS.items() if not which(tool)]
        if not missing or sys.platform != "linux":
            return
        if not (self.is_root and shutil.which("apt-get")):
            self.say(f"isolation: not root, so not installing {' '.join(missing)}; sandboxes will run unconfined")
            return
        self.say(f"isolation: apt-get install {' '.join(missing)}")
        try:
            self._apt(missing)
        except InstallError as exc:
            self.say(f"isolation: could not install {' '.join(missing)} ({exc}); sandboxes will run unconfined")

    def _apt(self, packages: list[str]) -> None:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if not self._apt_updated:
            self._run(["apt-get", "update", "-q"], env=env)
            self._apt_updated = True
        self._run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages], env=env)

    def _r_ready(self) -> bool:
        rscript = shutil.which("Rscript")
        if not rscript:
            return False
        probe = subprocess.run(
            [rscript, "-e", "cat(requireNamespace('IRkernel', quietly = TRUE))"],
            capture_output=True,
            text=True,
            check=False,
        )
        return probe.stdout.strip().endswith("TRUE")

    # ------------------------------------------------------------------ one language

    def _fetch(self, todo: list[str], outcomes: dict[str, str]) -> list[str]:
        """One pip run into the venv and one npm run into the prefix for every language that needs them."""
        steps = [("pip", self._pip_install), ("npm", self._npm_install)]
        for kind, step in steps:
            langs = [lang for lang in todo if getattr(RECIPES[lang], kind)]
            if not langs:
                continue
            packages = list(dict.fromkeys(pkg for lang in langs for pkg in getattr(RECIPES[lang], kind)))
            self.say(f"{', '.join(langs)}: {kind} install {' '.join(packages)}")
            started = time.monotonic()
            try:
                step(packages)
                self.say(f"  ({kind} took {time.monotonic() - started:.1f} s)")
            except InstallError as exc:
                for lang in langs:
                    outcomes[lang] = f"failed: {exc}"
                self.say(f"{', '.join(langs)}: FAILED: {exc}")
                todo = [lang for lang in todo if lang not in langs]
        return todo

    def _pip_install(self, packages: list[str]) -> None:
        self._venv()
        pip = [str(self.store.venv_python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
        self._run([*pip, "--progress-bar", "off", *packages])  # its lines are the progress

    def _npm_install(self, packages: list[str]) -> None:
        npm = shutil.which("npm") or "npm"
        prefix = str(self.store.npm_prefix)
        # The zeromq addon ships prebuilt for linux-x64; its install script only checks that it loads.
        self._run(
            [npm, "install", "-g", "--prefix", prefix, "--allow-scripts=zeromq", "--no-audit", "--no-fund", *packages]
        )

    def _install_one(self, lang: str) -> None:
        if lang == "r" and not self._r_ready():
            raise InstallError("R's IRkernel package is not available (apt-get install r-cran-irkernel)")
        spec, versions, path = self._spec_and_versions(lang)
        if lang == "python":
            self._completion_cache()
        spec_dir = self.store.spec_dir(lang)
        spec_dir.mkdir(parents=True, exist_ok=True)
        (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1) + "\n")
        marker = {
            "format": MARKER_FORMAT,
            "language": lang,
            "recipe": RECIPES[lang].ident,
            "versions": versions,
            "path": path,
            "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "installer": __version__,
        }
        self.store.marker_path(lang).parent.mkdir(parents=True, exist_ok=True)
        self.store.marker_path(lang).write_text(json.dumps(marker, indent=1) + "\n")

    def _completion_cache(self) -> None:
        """Parse the modules people complete first (os, json, ...) with jedi once, here: every new sandbox gets a
        copy of that cache in its home, so its first Tab answers in a fraction of a second, not two."""
        cache = self.store.completion_cache
        build = cache.parent / f".{cache.name}.building"
        shutil.rmtree(build, ignore_errors=True)
        env = {**os.environ, "XDG_CACHE_HOME": str(build)}
        self._run([str(self.store.venv_python), "-c", _WARM_COMPLETION], env=env)
        shutil.rmtree(cache, ignore_errors=True)
        (build / "jedi").rename(cache)
        shutil.rmtree(build, ignore_errors=True)

    def _venv(self) -> None:
        python = self.store.venv_python
        if python.exists() and subprocess.run([str(python), "-c", ""], check=False).returncode == 0:
            return
        if self.store.venv.exists():
            shutil.rmtree(self.store.venv)  # its base interpreter is gone
        base = _base_python()
        self.say(f"venv: {base} -m venv {self.store.venv}")
        self._run([base, "-m", "venv", str(self.store.venv)])

    def _spec_and_versions(self, lang: str) -> tuple[dict[str, Any], dict[str, str], str]:
        """Our kernelspec (absolute paths), the versions that matter, and where the runtime lives."""
        python = str(self.store.venv_python)
        conn = "{connection_file}"
        if lang == "python":
            argv = [python, "-m", "ipykernel_launcher", "-f", conn]
            versions = self._pip_versions("ipykernel", "numpy", "pandas", "matplotlib", "ipywidgets")
            return _spec(argv, "Python", "python"), versions, str(self.store.venv)
        if lang == "bash":
            argv = [python, "-m", "bash_kernel", "-f", conn]
            versions = {"bash": _output(["bash", "-c", "echo $BASH_VERSION"]), **self._pip_versions("bash_kernel")}
            return _spec(argv, "Bash", "bash", env={"PS1": "$"}), versions, str(self.store.venv)
        if lang == "java":
            java = shutil.which("java")
            if not java:
                raise InstallError("no java on PATH (install a JDK, e.g. apt-get install default-jdk-headless)")
            resources = self.store.venv / "share" / "jupyter" / "kernels" / "java"
            jars = [resources / "jjava-launcher.jar", resources / "jjava.jar"]
            if not all(jar.is_file() for jar in jars):
                raise InstallError(f"jjava's jars are not in {resources}")
            argv = [java, "-jar", str(jars[0]), str(jars[1]), conn]
            env = {"JJAVA_JVM_OPTS": JAVA_OPTS}
            banner = _first_line([java, "-version"]).split('"')
            versions = {"java": banner[1] if len(banner) > 1 else banner[0], **self._pip_versions("jjava")}
            return _spec(argv, "Java", "java", env=env, interrupt="message"), versions, str(resources)
        if lang == "typescript":
            deno = self.store.venv / "bin" / "deno"
            argv = [str(deno), "jupyter", "--kernel", "--conn", conn]
            env = {"NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1", "DENO_NO_PROMPT": "1"}
            version = _output([str(deno), "--version"]).split()
            versions = {"deno": version[1] if len(version) > 1 else "?"}
            if "typescript" in version:
                versions["typescript"] = version[version.index("typescript") + 1]
            return _spec(argv, "TypeScript (Deno)", "typescript", env=env), versions, str(deno)
        if lang == "nodejs":
            node = shutil.which("node")
            tslab = self.store.npm_prefix / "lib" / "node_modules" / "tslab"
            if not node or not (tslab / "bin" / "tslab").is_file():
                raise InstallError(f"tslab is not in {tslab} or node is not on PATH")
            argv = [node, str(tslab / "bin" / "tslab"), "kernel", "--config-path", conn, "--js"]
            version = json.loads((tslab / "package.json").read_text()).get("version", "?")
            versions = {"node": _output([node, "--version"]).lstrip("v"), "tslab": version}
            return _spec(argv, "JavaScript (Node.js)", "javascript"), versions, str(tslab)
        if lang == "r":
            r = shutil.which("R")
            assert r is not None  # _r_ready() said yes
            argv = [r, "--slave", "-e", "IRkernel::main()", "--args", conn]
            rscript = shutil.which("Rscript") or "Rscript"
            irkernel = _output([rscript, "-e", "cat(format(packageVersion('IRkernel')))"])
            versions = {"R": _first_line([r, "--version"]).removeprefix("R version ").split(" ")[0]}
            versions["IRkernel"] = irkernel
            return _spec(argv, "R", "R"), versions, os.path.realpath(r)
        raise InstallError(f"no recipe for {lang}")

    def _pip_versions(self, *packages: str) -> dict[str, str]:
        code = (
            "import importlib.metadata as m, json, platform\n"
            f"d = {{p: m.version(p) for p in {list(packages)!r}}}\n"
            "d['python'] = platform.python_version()\nprint(json.dumps(d))"
        )
        result: dict[str, str] = json.loads(_output([str(self.store.venv_python), "-c", code]))
        if "ipykernel" not in packages:
            result.pop("python")
        return result

    def _run(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Run one step, its output appended to install.log and shown as it comes: on a terminal as one line that
        follows the step's latest line, elsewhere (CI logs, notebooks) as the lines themselves, indented."""
        log = self.store.root / "install.log"
        label = argv[argv.index("-m") + 1] if "-m" in argv[:3] else os.path.basename(argv[0])
        tail: collections.deque[str] = collections.deque(maxlen=8)
        started = time.monotonic()
        with open(log, "a") as out:
            out.write(f"\n$ {' '.join(argv)}\n")
            out.flush()
            try:
                proc = subprocess.Popen(
                    argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, errors="replace"
                )
            except OSError as exc:
                raise InstallError(f"{argv[0]} could not run: {exc}") from None
            assert proc.stdout is not None
            with proc:
                for line in proc.stdout:
                    out.write(line)
                    out.flush()
                    if line.strip():
                        tail.append(line.rstrip())
                        self._show(label, line.strip(), time.monotonic() - started)
            self._show(label, None, 0)
        if proc.returncode != 0:
            raise InstallError(f"{argv[0]} exited with {proc.returncode} (see {log}):\n  " + "\n  ".join(tail))

    def _show(self, label: str, line: str | None, elapsed: float) -> None:
        """One line of a step's output (None: the step ended)."""
        if self.quiet:
            return
        if not self._tty:
            if line is not None:
                print(f"    {line}", flush=True)
            return
        text = "" if line is None else f"  {label}: {line} ({elapsed:.0f} s)"
        width = shutil.get_terminal_size().columns
        sys.stdout.write("\r\x1b[K" + text[: max(width - 1, 20)])
        sys.stdout.flush()


def _spec(
    argv: list[str], display: str, language: str, *, env: dict[str, str] | None = None, interrupt: str = "signal"
) -> dict[str, Any]:
    return {
        "argv": argv,
        "display_name": f"{display} (scalebox-local runtime)",
        "language": language,
        "interrupt_mode": interrupt,
        "env": env or {},
        "metadata": {"scalebox_runtime": True},
    }


def _output(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(f"{argv[0]} could not run: {exc}") from None
    return done.stdout.strip()


def _first_line(argv: list[str]) -> str:
    """First line of a program's version banner (java prints it on stderr)."""
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "?"


def _base_python() -> str:
    """The interpreter the runtimes venv is made from."""
    return BASE_PYTHON if os.access(BASE_PYTHON, os.X_OK) else sys.executable


def _has_ensurepip() -> bool:
    return subprocess.run([_base_python(), "-c", "import ensurepip"], capture_output=True, check=False).returncode == 0


def versions_text(versions: dict[str, str]) -> str:
    """`python 3.11.2, numpy 2.1.0`: a language's versions on one line."""
    return ", ".join(f"{name} {version}" for name, version in versions.items())
