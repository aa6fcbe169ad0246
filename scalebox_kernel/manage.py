"""`jupyter scalebox list | kill | stop`: look after sandboxes and scalebox-local from the shell."""

from __future__ import annotations

import os
import signal
import time

from jupyter_core.application import JupyterApp
from traitlets import Bool

from . import __version__
from .errors import ScaleboxError
from .local import read_runtime_info


class _ClientApp(JupyterApp):
    """Base of the subcommands that talk to the configured server (scalebox-local, or the cloud with a key)."""

    version = __version__

    def _fail(self, exc: ScaleboxError) -> None:
        print(f"error: {exc}")
        self.exit(1)


class ListApp(_ClientApp):
    name = "jupyter-scalebox-list"
    description = "List the sandboxes of the configured server (running and paused; --all adds terminated ones)."
    all = Bool(False, config=True, help="Also list terminated sandboxes.")
    flags = {"all": ({"ListApp": {"all": True}}, "Also list terminated sandboxes.")}

    def start(self) -> None:
        from .client import Sandbox

        states = ["running", "paused", "terminated"] if self.all else ["running", "paused"]
        try:
            sandboxes = Sandbox.list(state=states)
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
    description = "Kill sandboxes by id: jupyter scalebox kill ID [ID …]."

    def start(self) -> None:
        from .client import Sandbox

        if not self.extra_args:
            print("usage: jupyter scalebox kill SANDBOX_ID [SANDBOX_ID …]  (ids from 'jupyter scalebox list')")
            self.exit(2)
        missing = 0
        for sandbox_id in self.extra_args:
            try:
                killed = Sandbox.kill_by_id(sandbox_id)
            except ScaleboxError as exc:
                self._fail(exc)
                return
            print(f"{sandbox_id}: {'killed' if killed else 'not found'}")
            missing += not killed
        if missing:
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
