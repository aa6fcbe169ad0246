"""A jupyter_client kernel manager whose kernel runs inside a sandbox's jail, reached over IPC sockets.

The connection file and sockets live in the sandbox's private runtime directory, which the sandbox sees as
/run/scalebox: the server connects to the host path, the kernel (as the sandbox's uid) binds the sandbox path.
Kernels without IPC support run behind the relay (relay.py), which serves the same sockets from inside.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from jupyter_client.manager import AsyncKernelManager
from traitlets import Bool, Instance, Unicode

from .jail import Jail
from .layout import HOME, SANDBOX_RELAY


def relay_python() -> str:
    """The interpreter that runs the relay inside a sandbox (standard library only)."""
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


class JailedKernelManager(AsyncKernelManager):
    """AsyncKernelManager for a kernel in `jail`; `relay=True` for kernels that cannot do Jupyter's IPC."""

    jail = Instance(Jail)
    relay = Bool(False, help="Run the kernel behind the IPC relay (jjava, deno and tslab only speak TCP).")
    sandbox_cwd = Unicode(HOME, help="The kernel's working directory, as the sandbox sees it.")

    def __init__(self, **kwargs: Any) -> None:
        jail: Jail = kwargs["jail"]
        name = os.path.basename(kwargs.get("connection_file", "kernel.json")).removesuffix(".json")
        kwargs.setdefault("transport", "ipc")
        kwargs.setdefault("ip", str(jail.link_dir / name))  # a short path: sockets are named <ip>-<port>
        super().__init__(**kwargs)

    def write_connection_file(self, **kwargs: Any) -> None:
        """Write it as jupyter_client does, then make it the kernel's: sandbox paths, its uid, mode 0600."""
        written = self._connection_file_written and os.path.exists(self.connection_file)
        super().write_connection_file(**kwargs)
        if written:
            return
        with open(self.connection_file) as handle:
            info = json.load(handle)
        info["ip"] = self.jail.sandbox_path(info["ip"])
        with open(self.connection_file, "w") as handle:
            json.dump(info, handle, indent=1)
        self.jail.own(self.connection_file, 0o600)

    async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
        host_file, sandbox_file = self.connection_file, self.jail.sandbox_path(self.connection_file)
        argv = [sandbox_file if arg == host_file else arg for arg in kernel_cmd]
        if self.relay:
            argv = [relay_python(), SANDBOX_RELAY, sandbox_file, "--", *argv]
        env = dict(kw.pop("env", None) or {})
        env.pop("JPY_PARENT_PID", None)  # its parent is outside the sandbox's PID namespace
        host_argv, host_env = self.jail.wrap(argv, env=env, cwd=self.sandbox_cwd)
        kw.update(env=host_env, cwd=str(self.jail.root))
        await super()._async_launch_kernel(host_argv, **kw)
