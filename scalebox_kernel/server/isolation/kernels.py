"""A jupyter_client kernel manager whose kernel runs inside a sandbox's jail, reached over IPC sockets.

The kernel (as the sandbox's uid) reads its connection file from, and binds its sockets in, the sandbox's
/run/scalebox. That directory is the sandbox's to change, so the server never follows a name in it: it writes the
connection file there as the sandbox's uid (in-root, no-follow), and it connects to the sockets through hard links
it makes in a root-only directory once it has checked that each is a socket of the sandbox's own uid. A sandbox
that swaps a socket for a symlink to a host socket, or plants one in advance, only ever gets the server to talk
to its own processes. Kernels without IPC support run behind the relay (relay.py), which serves the same sockets
from inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import sys
from typing import Any

from jupyter_client.manager import AsyncKernelManager
from traitlets import Bool, Float, Instance, Unicode

from .jail import Jail, JailError
from .layout import HOME, SANDBOX_RELAY, SANDBOX_RUN

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
SOCKET_POLL = 0.005  # seconds between looks for the kernel's sockets while it starts


def relay_python() -> str:
    """The interpreter that runs the relay inside a sandbox (standard library only)."""
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def link_socket(run_fd: int, host_fd: int, name: str, uid: int) -> bool:
    """Hard-link socket `name` of the sandbox's run directory into the root-only one; False unless it is there
    and is a socket of `uid` (a link, a file or a socket of anyone else is refused)."""
    try:
        info = os.stat(name, dir_fd=run_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != uid:
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=host_fd)
    try:
        os.link(name, name, src_dir_fd=run_fd, dst_dir_fd=host_fd, follow_symlinks=False)
    except (FileNotFoundError, FileExistsError):
        return False
    linked = os.stat(name, dir_fd=host_fd, follow_symlinks=False)  # what the name was when it was linked
    if stat.S_ISSOCK(linked.st_mode) and linked.st_uid == uid:
        return True
    os.unlink(name, dir_fd=host_fd)
    return False


class JailedKernelManager(AsyncKernelManager):
    """AsyncKernelManager for a kernel in `jail`; `relay=True` for kernels that cannot do Jupyter's IPC."""

    jail = Instance(Jail)
    relay = Bool(False, help="Run the kernel behind the IPC relay (jjava, deno and tslab only speak TCP).")
    sandbox_cwd = Unicode(HOME, help="The kernel's working directory, as the sandbox sees it.")
    socket_timeout = Float(60.0, help="Seconds the kernel may take to bind its sockets.")

    def __init__(self, **kwargs: Any) -> None:
        jail: Jail = kwargs["jail"]
        name = os.path.basename(kwargs.get("connection_file", "kernel.json")).removesuffix(".json")
        kwargs.setdefault("transport", "ipc")
        kwargs.setdefault("ip", str(jail.link_dir / name))  # a short path: sockets are named <ip>-<port>
        super().__init__(**kwargs)

    @property
    def _name(self) -> str:
        return os.path.basename(self.ip)

    @property
    def sandbox_connection_file(self) -> str:
        return f"{SANDBOX_RUN}/{self._name}.json"

    def write_connection_file(self, **kwargs: Any) -> None:
        """Write it as jupyter_client does (in the server's root-only kernel directory), then give the kernel its
        own copy in /run/scalebox: sandbox paths, written as the sandbox's uid, mode 0600."""
        written = self._connection_file_written and os.path.exists(self.connection_file)
        super().write_connection_file(**kwargs)
        if written:
            return
        with open(self.connection_file) as handle:
            info = json.load(handle)
        info["ip"] = f"{SANDBOX_RUN}/{self._name}"
        data = json.dumps(info, indent=1).encode()
        tree = self.jail.tree
        tree.call(tree.replace_file, self.sandbox_connection_file, data, 0o600)

    async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
        host_file, sandbox_file = self.connection_file, self.sandbox_connection_file
        argv = [sandbox_file if arg == host_file else arg for arg in kernel_cmd]
        if self.relay:
            argv = [relay_python(), SANDBOX_RELAY, sandbox_file, "--", *argv]
        env = dict(kw.pop("env", None) or {})
        env.pop("JPY_PARENT_PID", None)  # its parent is outside the sandbox's PID namespace
        tree = self.jail.tree
        await tree.run(self._remove_stale_sockets)  # else a dead kernel's socket could be linked first
        # Wrapped just before the launch, with nothing awaited between: the argv names the jail's held namespace
        # fds, which a stop meanwhile would close.
        host_argv, host_env = self.jail.wrap(argv, env=env, cwd=self.sandbox_cwd)
        kw.update(env=host_env, cwd=str(self.jail.root))
        await super()._async_launch_kernel(host_argv, **kw)
        await self._link_sockets()

    def _socket_names(self) -> set[str]:
        return {f"{self._name}-{getattr(self, f'{channel}_port')}" for channel in CHANNELS}

    def _remove_stale_sockets(self) -> None:
        """Unlink what an earlier kernel of this name left in /run/scalebox (as the sandbox, on its threads)."""
        tree = self.jail.tree
        for name in self._socket_names():
            with contextlib.suppress(FileNotFoundError):
                tree.remove(f"{SANDBOX_RUN}/{name}")

    async def _link_sockets(self) -> None:
        """Wait until the kernel has bound all its sockets, linking each into the root-only directory."""
        identity = self.jail.identity
        if identity is None:
            raise JailError("the sandbox has no uid yet")
        pending = self._socket_names()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.socket_timeout
        flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        run_fd, host_fd = os.open(self.jail.run_dir, flags), os.open(self.jail.host_dir, flags)
        try:
            while pending:
                pending = {name for name in pending if not link_socket(run_fd, host_fd, name, identity.uid)}
                if not pending or loop.time() > deadline:
                    return  # the kernel_info wait reports a kernel that never listened
                if self.provisioner is not None and await self.provisioner.poll() is not None:
                    return  # it died: the caller sees it and reports its log
                await asyncio.sleep(SOCKET_POLL)
        finally:
            os.close(run_fd)
            os.close(host_fd)
