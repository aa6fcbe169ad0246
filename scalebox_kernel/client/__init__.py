"""The Scalebox client: `Sandbox` (sync) and `AsyncSandbox` talk to scalebox-local or the Scalebox cloud.

Without an API key it uses scalebox-local (started if needed); with one, the Scalebox cloud or `api_url`.
Errors come from `scalebox_kernel.errors`.
"""

from .commands import AsyncCommands, CommandHandle
from .connection import Connection, resolve_connection
from .filesystem import AsyncFilesystem, WatchHandle
from .models import (
    CommandResult,
    Context,
    EntryInfo,
    Execution,
    ExecutionError,
    FilesystemEvent,
    FileType,
    Locality,
    Logs,
    ObjectStorage,
    OutputMessage,
    ProcessInfo,
    Result,
    SandboxInfo,
    SandboxMetrics,
    ScaleboxRegion,
)
from .pty import AsyncPty, PtyHandle, PtySize
from .sandbox import AsyncSandbox
from .sync import Commands, Filesystem, Pty, Sandbox, SyncCommandHandle, SyncPtyHandle, SyncWatchHandle, portal

__all__ = [
    "AsyncCommands",
    "AsyncFilesystem",
    "AsyncPty",
    "AsyncSandbox",
    "CommandHandle",
    "CommandResult",
    "Commands",
    "Connection",
    "Context",
    "EntryInfo",
    "Execution",
    "ExecutionError",
    "FileType",
    "Filesystem",
    "FilesystemEvent",
    "Locality",
    "Logs",
    "ObjectStorage",
    "OutputMessage",
    "ProcessInfo",
    "Pty",
    "PtyHandle",
    "PtySize",
    "Result",
    "Sandbox",
    "SandboxInfo",
    "SandboxMetrics",
    "ScaleboxRegion",
    "SyncCommandHandle",
    "SyncPtyHandle",
    "SyncWatchHandle",
    "WatchHandle",
    "portal",
    "resolve_connection",
]
