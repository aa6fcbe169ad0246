"""Helpers for the Scalebox kernel tests: kernelspecs installed into a temporary prefix on JUPYTER_PATH (with the
real `jupyter scalebox install`), kernels started through jupyter_client, and one request's messages collected."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager

KERNEL = "scalebox-python"
#: A tqdm-style cell: a progress line cleared (`wait=True`) and printed four times, then a display updated by id.
CLEAR_AND_UPDATE = (
    "from IPython.display import clear_output, display\n"
    "for i in range(4):\n    clear_output(wait=True)\n    print('step', i)\n"
    "h = display('first', display_id=True)\nh.update('second')\n"
)


def install_kernelspecs(prefix: Path) -> Path:
    """`jupyter scalebox install --prefix PREFIX` (every language); returns the directory to put on JUPYTER_PATH."""
    argv = [sys.executable, "-m", "scalebox_kernel", "install", "--prefix", str(prefix)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return prefix / "share" / "jupyter"


@contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set for the duration (kernels started meanwhile inherit them)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def scalebox_kernels(server: Any, tmp_path_factory: Any, *more_paths: Path, **more_env: str) -> Iterator[None]:
    """The Scalebox kernelspecs installed in a temporary prefix, first on JUPYTER_PATH (then `more_paths`), and
    `server` in the environment, with `more_env`: what a module's kernels start with."""
    jupyter_path = install_kernelspecs(Path(tmp_path_factory.mktemp("kernelspecs")))
    paths = os.pathsep.join([str(jupyter_path), *map(str, more_paths)])
    with environ({"JUPYTER_PATH": paths, **more_env, **server.env()}):
        yield


def frontend_script(connection: str, pid_file: Path, zygote: bool = True) -> str:
    """`python -c` code of a stand-in frontend: it starts a Scalebox kernel on `connection` as its parent
    (JPY_PARENT_PID), writes the pid it started to `pid_file`, and waits (a test then kills it)."""
    zygote_env = "" if zygote else ", 'SCALEBOX_ZYGOTE': '0'"
    return (
        "import os, subprocess, sys\n"
        f"env = {{**os.environ, 'JPY_PARENT_PID': str(os.getpid()){zygote_env}}}\n"
        f"argv = [sys.executable, '-m', 'scalebox_kernel.kernel', '-f', {connection!r}]\n"
        "proc = subprocess.Popen(argv, env=env, start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(proc.pid))\n"
        "proc.wait()\n"
    )


class KernelRun:
    """A Scalebox kernel started through jupyter_client, and a blocking client for it."""

    def __init__(self, kernel_name: str = KERNEL, env: dict[str, str] | None = None) -> None:
        self.km = KernelManager(kernel_name=kernel_name)
        self.km.start_kernel(env={**os.environ, **(env or {})})
        self.kc: BlockingKernelClient = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def execute(self, code: str, timeout: float = 60, **options: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Run a cell; its execute_reply and its iopub output messages (no status or execute_input), in order.
        Fails if anything arrives for the cell after the reply's `idle`."""
        msg_id = self.kc.execute(code, **options)
        reply = self.reply(msg_id, timeout)
        outputs = self.outputs(msg_id)
        return reply, outputs

    def reply(self, msg_id: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg

    def outputs(self, msg_id: str, timeout: float = 10) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        while True:
            msg = self.kc.get_iopub_msg(timeout=timeout)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return found
            if msg["msg_type"] not in ("status", "execute_input"):
                found.append(msg)

    def request(self, method: str, *args: Any, timeout: float = 30, **kwargs: Any) -> dict[str, Any]:
        """Send a shell request (complete, inspect, history, …) and return its reply's content."""
        msg_id = getattr(self.kc, method)(*args, **kwargs)
        return self.reply(msg_id, timeout)["content"]

    def sandbox_id(self) -> str:
        """The sandbox this kernel's cells run in, as `%scalebox info` tells it."""
        reply, outputs = self.execute("%scalebox info")
        assert reply["content"]["status"] == "ok", reply["content"]
        text = "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")
        for line in text.splitlines():
            label, _, value = line.partition(":")
            if label.strip() == "sandbox":
                return value.strip()
        raise AssertionError(f"no sandbox id in %scalebox info: {text!r}")

    def shutdown(self, now: bool = False) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=now)


def text_of(outputs: list[dict[str, Any]], name: str = "stdout") -> str:
    return "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream" and m["content"]["name"] == name)


def of_type(outputs: list[dict[str, Any]], msg_type: str) -> list[dict[str, Any]]:
    return [m["content"] for m in outputs if m["msg_type"] == msg_type]
