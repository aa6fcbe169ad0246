"""`jupyter scalebox install`: one kernelspec per sandbox language (scalebox-python, scalebox-r, …)."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_core.application import JupyterApp
from jupyter_core.paths import ENV_JUPYTER_PATH, SYSTEM_JUPYTER_PATH, jupyter_data_dir
from traitlets import Bool, List, Unicode

from .. import __version__
from .languages import LANGUAGES, KernelLanguage, get_language

LOGOS = ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg")


def kernel_json(lang: KernelLanguage, executable: str | None = None) -> dict[str, Any]:
    """The kernel.json of one language: absolute interpreter path (VS Code hides specs it cannot resolve) and
    message-mode interrupt (the kernel cancels the remote run instead of taking a signal)."""
    return {
        "argv": [
            executable or sys.executable,
            "-m",
            "scalebox_kernel.kernel",
            "-f",
            "{connection_file}",
            "--language",
            lang.key,
        ],
        "display_name": lang.display_name,
        "language": lang.spec_language,
        "interrupt_mode": "message",
        "metadata": {
            "debugger": False,
            "scalebox": {"language": lang.key, "version": __version__, "language_info": lang.language_info},
        },
    }


def write_kernelspec(lang: KernelLanguage, directory: Path, executable: str | None = None) -> Path:
    """kernel.json and logos for `lang` in `directory` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kernel.json").write_text(json.dumps(kernel_json(lang, executable), indent=1) + "\n")
    package = resources.files("scalebox_kernel.kernel") / "resources"
    for name in LOGOS:
        (directory / name).write_bytes((package / name).read_bytes())
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

    flags = {
        "user": ({"InstallApp": {"user": True}}, "Install for the current user (default)."),
        "sys-prefix": ({"InstallApp": {"sys_prefix": True}}, "Install into sys.prefix."),
        "uninstall": ({"InstallApp": {"uninstall": True}}, "Remove the Scalebox kernelspecs."),
    }
    aliases = {"prefix": "InstallApp.prefix", "language": "InstallApp.languages"}

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
        manager = KernelSpecManager()
        with tempfile.TemporaryDirectory() as tmp:
            for lang in langs:
                source = write_kernelspec(lang, Path(tmp) / lang.kernel_name)
                manager.install_kernel_spec(str(source), lang.kernel_name, user=user, prefix=prefix)
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
        for lang in langs:
            for root in dict.fromkeys(roots):
                kernels = root if root.name == "kernels" else root / "kernels"
                spec = kernels / lang.kernel_name
                if (spec / "kernel.json").is_file():
                    shutil.rmtree(spec)
                    removed += 1
                    print(f"Removed {lang.kernel_name} from {spec}")
        if not removed:
            print("No Scalebox kernelspecs found to remove.")


main = InstallApp.launch_instance
