"""The kernel process: ipykernel's application running ScaleboxKernel, with `--language` to pick the language."""

from __future__ import annotations

import ipaddress
import logging

import zmq
from ipykernel.kernelapp import IPKernelApp, kernel_aliases
from traitlets import DottedObjectName, Type

from ..config import ScaleboxConfig
from .kernel import ScaleboxKernel


class ScaleboxKernelApp(IPKernelApp):
    name = "scalebox-kernel"
    description = "A Jupyter kernel that runs every cell in a Scalebox sandbox."
    kernel_class = Type(ScaleboxKernel, klass="ipykernel.kernelbase.Kernel").tag(config=True)  # type: ignore[assignment]
    # The kernel's own stdout/stderr are not the user's output: leave them on the process's streams (the
    # frontend's log) instead of publishing them into cells.
    outstream_class = DottedObjectName(None, allow_none=True).tag(config=True)
    classes = [*IPKernelApp.classes, ScaleboxKernel, ScaleboxConfig]
    aliases = {**kernel_aliases, "language": "ScaleboxKernel.language"}

    def init_sockets(self) -> None:
        """ipykernel warns of plain TCP at every start; a frontend on this machine's loopback (where jupyter_client
        puts a kernel) has nothing to eavesdrop on, so the warning is only noise in the frontend's log. It stays
        for any other address."""
        quiet = _LoopbackTcpNotice() if self.transport == "tcp" and _is_loopback(self.ip) else None
        if quiet is not None:
            self.log.addFilter(quiet)
        try:
            super().init_sockets()
        finally:
            if quiet is not None:
                self.log.removeFilter(quiet)

    def init_iopub(self, context: zmq.Context) -> None:
        """iopub without a high-water mark: a frontend that falls behind a flood of output gets all of it later,
        instead of ZMQ dropping what does not fit."""
        context.sndhwm = 0
        try:
            super().init_iopub(context)
        finally:
            del context.sndhwm


class _LoopbackTcpNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Kernel is running over TCP without encryption")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main() -> None:
    ScaleboxKernelApp.launch_instance()
