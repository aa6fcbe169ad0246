"""`jupyter scalebox runtimes install|list`: install the language kernels scalebox-local runs, and show them."""

from __future__ import annotations

import json
import time
from typing import Any

from jupyter_core.application import JupyterApp
from traitlets import Bool, List, Unicode

from .isolation.buckets import fuse_problem, s3fs_version
from .isolation.tools import which
from .runtimes_install import Installer, canonical_language, versions_text
from .runtimes_store import ORDER, RuntimeStore


def _chosen(values: list[str]) -> list[str]:
    names = [part.strip() for value in values for part in value.split(",") if part.strip()]
    if not names or "all" in names:
        return list(ORDER)
    return list(dict.fromkeys(canonical_language(name) for name in names))


class RuntimesInstallApp(JupyterApp):
    name = "jupyter-scalebox-runtimes-install"
    description = "Install the language kernels scalebox-local runs (default: all six) into the runtimes directory."
    examples = """
jupyter scalebox runtimes install                      # python, r, nodejs, typescript, java, bash
jupyter scalebox runtimes install --language r --language java
SCALEBOX_RUNTIMES_DIR=/srv/runtimes jupyter scalebox runtimes install --best-effort
"""
    languages = List(Unicode(), config=True, help=f"Languages to install (default: all of {', '.join(ORDER)}).")
    force = Bool(False, config=True, help="Reinstall even what is already installed.")
    best_effort = Bool(
        False, config=True, help="Exit with 0 even when some languages could not be installed (they are listed)."
    )
    aliases = {**JupyterApp.aliases, "language": "RuntimesInstallApp.languages"}
    flags = {
        **JupyterApp.flags,
        "force": ({"RuntimesInstallApp": {"force": True}}, "Reinstall even what is already installed."),
        "best-effort": (
            {"RuntimesInstallApp": {"best_effort": True}},
            "Exit with 0 even when some languages could not be installed (they are listed).",
        ),
    }

    def start(self) -> None:
        try:
            languages = _chosen(self.languages)
        except ValueError as exc:
            self.log.error("%s", exc)
            self.exit(2)
        store = RuntimeStore()
        print(f"Runtimes directory: {store.root}")
        started = time.monotonic()
        outcomes = Installer(store, force=self.force).install(languages)
        failed = {lang: why for lang, why in outcomes.items() if why.startswith("failed")}
        print(f"Done in {time.monotonic() - started:.1f} s: {len(outcomes) - len(failed)} of {len(outcomes)} ready.")
        for lang, why in failed.items():
            print(f"  {lang} is missing: {why.removeprefix('failed: ')}")
        if failed and not self.best_effort:
            self.exit(1)


class RuntimesListApp(JupyterApp):
    name = "jupyter-scalebox-runtimes-list"
    description = "Show which languages scalebox-local can run, with versions, and why the others are missing."
    json_output = Bool(False, config=True, help="Print JSON instead of a table.")
    flags = {**JupyterApp.flags, "json": ({"RuntimesListApp": {"json_output": True}}, "Print JSON instead of a table.")}

    def start(self) -> None:
        store = RuntimeStore()
        statuses = [store.status(lang) for lang in ORDER]
        storage = _object_storage()
        if self.json_output:
            languages = [s.as_json() for s in statuses]
            print(json.dumps({"dir": str(store.root), "languages": languages, "object_storage": storage}, indent=1))
            return
        print(f"Runtimes directory: {store.root}")
        for status in statuses:
            if status.state == "installed":
                versions = versions_text(status.versions)
                print(f"  {status.language:<11} installed  {versions}\n  {'':<11}            {status.path}")
            else:
                print(f"  {status.language:<11} {status.state:<10} {status.reason}")
        if storage["available"]:
            print(f"Object storage mounts: s3fs {storage['s3fs']} ({storage['path']})")
        else:
            print(f"Object storage mounts: unavailable: {storage['problem']}")


def _object_storage() -> dict[str, Any]:
    """Whether buckets can be mounted into sandboxes on this machine (s3fs, FUSE, root), for `runtimes list`."""
    problem = fuse_problem()
    return {"available": problem is None, "s3fs": s3fs_version(), "path": which("s3fs"), "problem": problem}


class RuntimesApp(JupyterApp):
    name = "jupyter-scalebox-runtimes"
    description = "Manage the language runtimes of scalebox-local (install, list)."
    # traitlets would name `jupyter-scalebox-runtimes`, which is no program: this is a subcommand.
    subcommand_description = Unicode(
        "Subcommands are launched as `jupyter scalebox runtimes cmd [args]`. For information on using subcommand "
        "'cmd', do: `jupyter scalebox runtimes cmd -h`."
    )
    subcommands = {
        "install": (RuntimesInstallApp, RuntimesInstallApp.description),
        "list": (RuntimesListApp, RuntimesListApp.description),
    }

    def start(self) -> None:
        if self.subapp is None:
            print(f"{self.description}\n\nSubcommands: install, list")
            self.exit(1)
        super().start()


main = RuntimesApp.launch_instance
