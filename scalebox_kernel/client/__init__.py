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
    Logs,
    OutputMessage,
    ProcessInfo,
    Result,
    SandboxInfo,
)
from .sandbox import AsyncSandbox
from .sync import Commands, Filesystem, Sandbox, SyncCommandHandle, SyncWatchHandle, portal

__all__ = [
    "AsyncCommands",
    "AsyncFilesystem",
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
    "Logs",
    "OutputMessage",
    "ProcessInfo",
    "Result",
    "Sandbox",
    "SandboxInfo",
    "SyncCommandHandle",
    "SyncWatchHandle",
    "WatchHandle",
    "portal",
    "resolve_connection",
]
