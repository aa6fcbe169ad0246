"""Comms for the kernel's own widgets (the `%scalebox` status panel): the `comm` package's manager, with comms that
publish on the kernel's iopub. ipywidgets asks `comm.create_comm` and `comm.get_comm_manager`, as it does in
ipykernel; `install` points both at this kernel."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import comm
from comm.base_comm import BaseComm, CommManager

if TYPE_CHECKING:
    from .base import WireKernel


class KernelComm(BaseComm):
    """A comm whose messages go out on the kernel's iopub, answering the request being handled."""

    kernel: WireKernel

    def publish_msg(
        self,
        msg_type: str,
        data: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        buffers: list[Any] | None = None,
        **keys: Any,
    ) -> None:
        kernel = self.kernel
        content = {"data": data or {}, "comm_id": self.comm_id, **keys}
        kernel.session.send(
            kernel.iopub_socket,
            msg_type,
            content,
            parent=kernel.get_parent("shell"),
            ident=self.topic,
            buffers=buffers,
            metadata=metadata or {},
        )


def install(kernel: WireKernel) -> CommManager:
    """Make `comm` hand out this kernel's comms and manager; the manager."""
    manager = CommManager()
    # The kernel is a class attribute: a primary comm publishes its comm_open from BaseComm.__init__.
    comm.create_comm = type("ScaleboxComm", (KernelComm,), {"kernel": kernel})
    comm.get_comm_manager = lambda: manager
    return manager
