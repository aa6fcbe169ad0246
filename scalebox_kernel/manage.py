"""`jupyter scalebox list | kill | stop`: look after sandboxes and scalebox-local from the shell."""

from __future__ import annotations

import os
import signal
import time
from datetime import UTC, datetime

from jupyter_core.application import JupyterApp
from traitlets import Bool, Unicode, default

from . import __version__
from .config import CONFIG_FILE, ScaleboxConfig
from .errors import ScaleboxError
from .local import read_runtime_info


class _ClientApp(JupyterApp):
    """Base of the subcommands that talk to the configured server (scalebox-local, or the cloud with a key)."""

    version = __version__
    classes = [ScaleboxConfig]

    @default("config_file_name")
    def _default_config_file_name(self) -> str:
        return CONFIG_FILE

    def scalebox_config(self) -> ScaleboxConfig:
        """The one configuration, this command's options (`--ScaleboxConfig.api_url=…`) winning."""
        return ScaleboxConfig.load(config=self.cli_config)

    def _fail(self, exc: ScaleboxError) -> None:
        print(f"error: {exc}")
        self.exit(1)


class ListApp(_ClientApp):
    name = "jupyter-scalebox-list"
    description = "List the sandboxes of the configured server (running and paused; --all adds terminated ones)."
    all = Bool(False, config=True, help="Also list terminated sandboxes.")
    flags = {**JupyterApp.flags, "all": ({"ListApp": {"all": True}}, "Also list terminated sandboxes.")}

    def start(self) -> None:
        from .client import Sandbox

        states = ["running", "paused", "terminated"] if self.all else ["running", "paused"]
        try:
            sandboxes = Sandbox.list(state=states, config=self.scalebox_config())
        except ScaleboxError as exc:
            self._fail(exc)
            return
        if not sandboxes:
            print("no sandboxes")
            return
        print(f"{'SANDBOX':<24} {'STATE':<11} {'TEMPLATE':<18} {'ENDS':<20} METADATA")
        for info in sandboxes:
            ends = info.end_at.astimezone().strftime("%Y-%m-%d %H:%M:%S") if info.end_at else "-"
            meta = ", ".join(f"{k}={v}" for k, v in sorted(info.metadata.items())) or "-"
            print(f"{info.sandbox_id:<24} {info.state:<11} {info.template_id:<18} {ends:<20} {meta}")


class KillApp(_ClientApp):
    name = "jupyter-scalebox-kill"
    description = (
        "Kill sandboxes by id (jupyter scalebox kill ID [ID …]), or every running and paused one (--all), "
        "optionally only those started more than a while ago (--all --older-than 1h)."
    )
    all = Bool(False, config=True, help="Kill every running and paused sandbox of the configured server.")
    older_than = Unicode(
        "", config=True, help="With --all: only sandboxes started longer ago than this (90s, 30m, 2h)."
    )
    flags = {**JupyterApp.flags, "all": ({"KillApp": {"all": True}}, "Kill every running and paused sandbox.")}
    aliases = {**JupyterApp.aliases, "older-than": "KillApp.older_than"}

    def start(self) -> None:
        from .client import Sandbox
        from .subcommands._status import parse_duration

        if bool(self.extra_args) == self.all or (self.older_than and not self.all):
            print(
                "usage: jupyter scalebox kill SANDBOX_ID [SANDBOX_ID …]  (ids from 'jupyter scalebox list')\n"
                "       jupyter scalebox kill --all [--older-than 1h]"
            )
            self.exit(2)
        try:
            age = parse_duration(self.older_than) if self.older_than else 0
        except ValueError as exc:
            print(f"error: --older-than: {exc}")
            self.exit(2)
        missing = 0
        try:
            config = self.scalebox_config()
            targets = list(self.extra_args)
            if self.all:
                now = datetime.now(UTC)
                targets = [
                    info.sandbox_id
                    for info in Sandbox.list(state=["running", "paused"], config=config)
                    if not age or (info.started_at is not None and (now - info.started_at).total_seconds() > age)
                ]
                if not targets:
                    print("no sandboxes to kill")
            for sandbox_id in targets:
                killed = Sandbox.kill_by_id(sandbox_id, config=config)
                print(f"{sandbox_id}: {'killed' if killed else 'not found'}")
                missing += not killed
        except ScaleboxError as exc:
            self._fail(exc)
            return
        if missing and not self.all:
            self.exit(1)


class StopApp(JupyterApp):
    name = "jupyter-scalebox-stop"
    version = __version__
    description = "Stop the scalebox-local started in the background (its sandboxes' files stay in the data dir)."

    def start(self) -> None:
        info = read_runtime_info()
        if info is None:
            print("scalebox-local is not running")
            return
        os.kill(info.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            # The server removes its runtime file as the last step of a clean shutdown.
            running = read_runtime_info(check_alive=False)
            if running is None or running.pid != info.pid:
                print(f"stopped scalebox-local (pid {info.pid})")
                return
            time.sleep(0.1)
        print(f"scalebox-local (pid {info.pid}) did not stop within 30 s")
        self.exit(1)
