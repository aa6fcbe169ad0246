"""The agent's Connect RPCs by path, for the server's generic dispatch (rpc.py): request type, kind, handler.

Handlers raise `ConnectError` for errors; streaming handlers are async generators that send their own keepalives.
`StreamInput` (client streaming, used by no SDK) is deliberately absent: the dispatcher answers `unimplemented`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message

from ...protocol import pb
from ...protocol.connect import PROTO, Codec

if TYPE_CHECKING:
    from .agent import SandboxAgent


@dataclass(frozen=True)
class CallInfo:
    """What the dispatcher knows about one call besides its request message."""

    codec: Codec  # PROTO or JSON, from the request's Content-Type
    keepalive_interval: float  # seconds; streams yield a keepalive at least this often when quiet


Handler = Callable[["SandboxAgent", Any, CallInfo], Awaitable[Message] | AsyncIterator[Message]]


@dataclass(frozen=True)
class Rpc:
    request_type: type[Message]
    streaming: bool
    handler: Handler


def _in_thread(method: str) -> Handler:
    """A unary Filesystem call, on the sandbox's own file threads (as its uid, off the event loop)."""

    async def handler(agent: SandboxAgent, request: Any, info: CallInfo) -> Message:
        result: Message = await agent.tree.run(getattr(agent.files, method), request)
        return result

    return handler


async def _list(agent: SandboxAgent, request: Any, info: CallInfo) -> Message:
    return agent.processes.list()


async def _send_input(agent: SandboxAgent, request: Any, info: CallInfo) -> Message:
    return await agent.processes.send_input(request)


async def _send_signal(agent: SandboxAgent, request: Any, info: CallInfo) -> Message:
    return agent.processes.send_signal(request)


async def _update(agent: SandboxAgent, request: Any, info: CallInfo) -> Message:
    return agent.processes.update(request)


def _start(agent: SandboxAgent, request: Any, info: CallInfo) -> AsyncIterator[Message]:
    return agent.processes.start(request, info.keepalive_interval)


def _connect(agent: SandboxAgent, request: Any, info: CallInfo) -> AsyncIterator[Message]:
    return agent.processes.connect(request, info.keepalive_interval)


def _watch_dir(agent: SandboxAgent, request: Any, info: CallInfo) -> AsyncIterator[Message]:
    return agent.watchers.watch_dir(request, info.keepalive_interval)


async def _create_watcher(agent: SandboxAgent, request: Any, info: CallInfo) -> Message:
    return await agent.watchers.create(request)


async def _watcher_events(agent: SandboxAgent, request: Any, info: CallInfo) -> Message:
    return await agent.watchers.events(request)


async def _remove_watcher(agent: SandboxAgent, request: Any, info: CallInfo) -> Message:
    return await agent.watchers.remove(request)


def _execute(agent: SandboxAgent, request: Any, info: CallInfo) -> AsyncIterator[Message]:
    # Never fill Result.json/.data for proto clients: the Python SDK 1.0.10 crashes on them (PROTOCOL.md 5.5).
    return agent.contexts.execute(request, json_in_extra=info.codec is PROTO, keepalive=info.keepalive_interval)


async def _create_context(agent: SandboxAgent, request: Any, info: CallInfo) -> Message:
    return await agent.contexts.create_context(request)


async def _destroy_context(agent: SandboxAgent, request: Any, info: CallInfo) -> Message:
    return await agent.contexts.destroy_context(request)


RPCS: dict[str, Rpc] = {
    "sandboxagent.Filesystem/Stat": Rpc(pb.StatRequest, False, _in_thread("stat")),
    "sandboxagent.Filesystem/MakeDir": Rpc(pb.MakeDirRequest, False, _in_thread("make_dir")),
    "sandboxagent.Filesystem/Move": Rpc(pb.MoveRequest, False, _in_thread("move")),
    "sandboxagent.Filesystem/ListDir": Rpc(pb.ListDirRequest, False, _in_thread("list_dir")),
    "sandboxagent.Filesystem/Remove": Rpc(pb.RemoveRequest, False, _in_thread("remove")),
    "sandboxagent.Filesystem/WatchDir": Rpc(pb.WatchDirRequest, True, _watch_dir),
    "sandboxagent.Filesystem/CreateWatcher": Rpc(pb.CreateWatcherRequest, False, _create_watcher),
    "sandboxagent.Filesystem/GetWatcherEvents": Rpc(pb.GetWatcherEventsRequest, False, _watcher_events),
    "sandboxagent.Filesystem/RemoveWatcher": Rpc(pb.RemoveWatcherRequest, False, _remove_watcher),
    "sandboxagent.Process/List": Rpc(pb.ListRequest, False, _list),
    "sandboxagent.Process/Connect": Rpc(pb.ConnectRequest, True, _connect),
    "sandboxagent.Process/Start": Rpc(pb.StartRequest, True, _start),
    "sandboxagent.Process/Update": Rpc(pb.UpdateRequest, False, _update),
    "sandboxagent.Process/SendInput": Rpc(pb.SendInputRequest, False, _send_input),
    "sandboxagent.Process/SendSignal": Rpc(pb.SendSignalRequest, False, _send_signal),
    "sandboxagent.ExecutionService/Execute": Rpc(pb.ExecuteRequest, True, _execute),
    "sandboxagent.ContextService/CreateContext": Rpc(pb.CreateContextRequest, False, _create_context),
    "sandboxagent.ContextService/DestroyContext": Rpc(pb.DestroyContextRequest, False, _destroy_context),
}
