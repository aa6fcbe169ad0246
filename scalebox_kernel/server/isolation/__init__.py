"""Sandboxing for scalebox-local: bubblewrap namespaces, a uid per sandbox, cgroup limits and the freezer."""

from .cgroups import Limits, SandboxCgroups, Usage
from .detect import Capabilities, CgroupLayout, capabilities, detect_capabilities
from .jail import Jail, JailError, JailOptions
from .layout import SANDBOX_RELAY, SANDBOX_RUN

__all__ = [
    "SANDBOX_RELAY",
    "SANDBOX_RUN",
    "Capabilities",
    "CgroupLayout",
    "Jail",
    "JailError",
    "JailOptions",
    "Limits",
    "SandboxCgroups",
    "Usage",
    "capabilities",
    "detect_capabilities",
]
