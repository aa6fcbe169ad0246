"""`jupyter scalebox install`: one kernelspec per sandbox language (scalebox-python, scalebox-r, …)."""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from dotenv import dotenv_values
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_core.application import JupyterApp
from jupyter_core.paths import ENV_JUPYTER_PATH, SYSTEM_JUPYTER_PATH, jupyter_data_dir
from traitlets import Bool, List, Unicode

from .. import __version__
from .languages import LANGUAGES, KernelLanguage, get_language

LOGOS = ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg")
KERNEL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # jupyter_client lowercases names; never `.` or `..`
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)


def _template(lang: KernelLanguage) -> Traversable:
    """The language's folder in kernelspecs/ (shipped in the package as scalebox_kernel.kernelspecs)."""
    return resources.files("scalebox_kernel.kernelspecs") / lang.kernel_name


def kernel_json(lang: KernelLanguage, executable: str | None = None) -> dict[str, Any]:
    """The kernel.json of one language, from its template in kernelspecs/: the absolute interpreter path (VS Code
    hides specs it cannot resolve), message-mode interrupt (the kernel cancels the remote run instead of taking a
    signal), and what the kernel says of its language before a sandbox exists."""
    spec: dict[str, Any] = json.loads((_template(lang) / "kernel.json").read_text())
    spec["argv"][0] = executable or sys.executable
    spec.setdefault("metadata", {})["scalebox"] = {
        "language": lang.key,
        "version": __version__,
        "language_info": lang.language_info,
    }
    return spec


def write_kernelspec(
    lang: KernelLanguage,
    directory: Path,
    executable: str | None = None,
    *,
    display_name: str | None = None,
    env: dict[str, str] | None = None,
) -> Path:
    """kernel.json and logos for `lang` in `directory` (created); `display_name` and `env` (the kernel's
    environment: `SCALEBOX_API_URL`, say) replace the defaults. With `env`, kernel.json is readable by its owner
    only."""
    directory.mkdir(parents=True, exist_ok=True)
    spec = kernel_json(lang, executable)
    if display_name:
        spec["display_name"] = display_name
    if env:
        spec["env"] = dict(env)
    target = directory / "kernel.json"
    target.write_text(json.dumps(spec, indent=1) + "\n")
    if env:
        target.chmod(0o600)
    template = _template(lang)
    for name in LOGOS:
        (directory / name).write_bytes((template / name).read_bytes())
    return directory


class InstallApp(JupyterApp):
    name = "jupyter-scalebox-install"
    description = (
        "Install the Scalebox kernelspecs (one per sandbox language), so that Jupyter frontends offer "
        "'Scalebox (Python)' and friends; --uninstall removes them."
    )
    examples = (
        "jupyter scalebox install                  # every language, for this user\n"
        "jupyter scalebox install --sys-prefix --language python\n"
        "jupyter scalebox install --uninstall\n"
    )

    user = Bool(False, config=True, help="Install for this user (~/.local/share/jupyter); the default.")
    sys_prefix = Bool(False, config=True, help=f"Install into this Python environment ({sys.prefix}).")
    prefix = Unicode("", config=True, help="Install under this prefix (PREFIX/share/jupyter/kernels).")
    languages = List(Unicode(), config=True, help=f"Languages to install (default: all of {', '.join(LANGUAGES)}).")
    uninstall = Bool(False, config=True, help="Remove the Scalebox kernelspecs instead of installing them.")
    kernel_name = Unicode(
        "", config=True, help="The kernelspec's name (one language only): side-by-side specs, e.g. scalebox-cloud."
    )
    display_name = Unicode("", config=True, help="The name frontends show (one language only).")
    env = List(
        Unicode(),
        config=True,
        help="KEY=VALUE for the kernel's environment (repeatable), e.g. SCALEBOX_API_URL=… or SCALEBOX_CHANNEL=…; "
        "secrets (an API key) only from --env-file, never on the command line.",
    )
    env_file = Unicode("", config=True, help="A file of KEY=VALUE lines (a .env) for the kernel's environment.")

    flags = {
        **JupyterApp.flags,
        "user": ({"InstallApp": {"user": True}}, "Install for the current user (default)."),
        "sys-prefix": ({"InstallApp": {"sys_prefix": True}}, "Install into sys.prefix."),
        "uninstall": ({"InstallApp": {"uninstall": True}}, "Remove the Scalebox kernelspecs."),
    }
    aliases = {
        **JupyterApp.aliases,
        "prefix": "InstallApp.prefix",
        "language": "InstallApp.languages",
        "name": "InstallApp.kernel_name",
        "display-name": "InstallApp.display_name",
        "env": "InstallApp.env",
        "env-file": "InstallApp.env_file",
    }

    def _environment(self) -> dict[str, str]:
        """The kernel's environment from --env and --env-file; exits on a malformed pair or a secret given on the
        command line (every user's `ps` shows it)."""
        env: dict[str, str] = {}
        if self.env_file:
            if not Path(self.env_file).is_file():
                self.log.error("--env-file %s: no such file", self.env_file)
                self.exit(2)
            try:
                values = dotenv_values(self.env_file)
            except OSError as exc:
                self.log.error("Cannot read %s: %s", self.env_file, exc)
                self.exit(2)
            env.update({k: v for k, v in values.items() if v is not None})
        for pair in self.env:
            key, sep, value = pair.partition("=")
            if not sep or not ENV_NAME.fullmatch(key):
                self.log.error("--env takes KEY=VALUE with KEY a variable name, not %r", pair.split("=")[0][:40])
                self.exit(2)
            if SECRET_NAME.search(key):
                self.log.error(
                    "%s looks like a secret: a command line is visible to every user (ps). Put it in a file only "
                    "you can read and pass --env-file FILE.",
                    key,
                )
                self.exit(2)
            env[key] = value
        return env

    def _chosen(self) -> list[KernelLanguage]:
        names = [part for item in self.languages for part in item.split(",") if part.strip()]
        if not names or "all" in names:
            return list(LANGUAGES.values())
        try:
            chosen = {lang.key: lang for lang in map(get_language, names)}
            return list(chosen.values())
        except ValueError as exc:
            self.log.error("%s", exc)
            self.exit(2)
            raise  # not reached

    def _location(self) -> tuple[bool, str | None]:
        """(user, prefix) for KernelSpecManager; exits on conflicting choices."""
        chosen = [
            flag
            for flag, on in (("--user", self.user), ("--sys-prefix", self.sys_prefix), ("--prefix", self.prefix))
            if on
        ]
        if len(chosen) > 1:
            self.log.error("Choose one of %s, not several.", " / ".join(chosen))
            self.exit(2)
        if self.prefix:
            return False, str(Path(self.prefix).expanduser().resolve())
        if self.sys_prefix:
            return False, sys.prefix
        return True, None

    def start(self) -> None:
        langs = self._chosen()
        if self.uninstall:
            self._uninstall(langs)
            return
        user, prefix = self._location()
        if (self.kernel_name or self.display_name) and len(langs) != 1:
            self.log.error("--name and --display-name name one kernelspec: add --language L")
            self.exit(2)
        if self.kernel_name and not KERNEL_NAME.fullmatch(self.kernel_name):
            self.log.error(
                "--name takes lowercase letters, digits, '.', '_' and '-', starting with a letter or digit, not %r",
                self.kernel_name,
            )
            self.exit(2)
        env = self._environment()
        manager = KernelSpecManager()
        with tempfile.TemporaryDirectory() as tmp:
            for lang in langs:
                name = self.kernel_name or lang.kernel_name
                source = write_kernelspec(lang, Path(tmp) / name, display_name=self.display_name, env=env)
                installed = manager.install_kernel_spec(str(source), name, user=user, prefix=prefix)
                print(f"Installed kernelspec {name} ({self.display_name or lang.display_name}) in {installed}")
        if any(lang.key != "python" for lang in langs):
            print("Each language runs once its runtime is on scalebox-local ('jupyter scalebox runtimes list' shows")
            print("which are; 'jupyter scalebox runtimes install' adds them). Until then its cells say so.")

    def _uninstall(self, langs: list[KernelLanguage]) -> None:
        explicit = self.user or self.sys_prefix or self.prefix
        if explicit:
            user, prefix = self._location()
            roots = [Path(jupyter_data_dir())] if user else [Path(prefix or sys.prefix) / "share" / "jupyter"]
        else:
            roots = [Path(jupyter_data_dir()), *map(Path, ENV_JUPYTER_PATH), *map(Path, SYSTEM_JUPYTER_PATH)]
            roots += [Path(p) for p in KernelSpecManager().kernel_dirs]  # JUPYTER_PATH entries too
        removed = 0
        if self.kernel_name and not KERNEL_NAME.fullmatch(self.kernel_name):
            self.log.error("--name %r is not a kernelspec name", self.kernel_name)
            self.exit(2)
        names = [self.kernel_name] if self.kernel_name else [lang.kernel_name for lang in langs]
        for name in names:
            for root in dict.fromkeys(roots):
                kernels = root if root.name == "kernels" else root / "kernels"
                spec = kernels / name
                if (spec / "kernel.json").is_file() and "scalebox_kernel.kernel" in (spec / "kernel.json").read_text():
                    shutil.rmtree(spec)  # ours only: another kernel of that name is not this command's to remove
                    removed += 1
                    print(f"Removed {name} from {spec}")
        if not removed:
            print("No Scalebox kernelspecs found to remove.")


main = InstallApp.launch_instance
