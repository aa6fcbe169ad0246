"""One cell on the agent: a single Execute stream, its events handed to callbacks as they arrive."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ..errors import ExecutionTimeout
from ..protocol import pb
from .callbacks import Callback, call_back
from .connect_client import ConnectClient
from .models import Execution, ExecutionError, OutputMessage, Result


@dataclass
class Handlers:
    """The callbacks of one `run_code` (any may be None)."""

    on_stdout: Callback | None = None
    on_stderr: Callback | None = None
    on_result: Callback | None = None
    on_error: Callback | None = None


async def execute(rpc: ConnectClient, request: pb.ExecuteRequest, handlers: Handlers, limit: float | None) -> Execution:
    """Run the request's code and collect its events; past `limit` seconds close the stream (an interrupt).

    `limit` is about the cell; a server that goes silent (no keepalive) ends the call sooner, with
    ServerUnavailable, after the connection's `stream_idle_timeout`."""
    execution = Execution()
    deadline = asyncio.timeout(limit)
    try:
        async with (
            deadline,
            rpc.stream("ExecutionService/Execute", request, pb.ExecuteResponse, what="Running code") as messages,
        ):
            async for message in messages:
                await _on_event(message, execution, handlers)
    except TimeoutError:
        if deadline.expired():
            raise ExecutionTimeout(f"The code ran longer than {limit} s and was interrupted.") from None
        raise
    return execution


async def _on_event(message: pb.ExecuteResponse, execution: Execution, handlers: Handlers) -> None:
    kind = message.WhichOneof("event")
    if kind == "stdout":
        execution.logs.stdout.append(message.stdout.content)
        await call_back(handlers.on_stdout, OutputMessage(message.stdout.content, error=False))
    elif kind == "stderr":
        execution.logs.stderr.append(message.stderr.content)
        await call_back(handlers.on_stderr, OutputMessage(message.stderr.content, error=True))
    elif kind == "result":
        result = Result.from_pb(message.result)
        execution.results.append(result)
        if result.is_main_result:
            execution.execution_count = result.execution_count
        await call_back(handlers.on_result, result)
    elif kind == "error":
        execution.error = ExecutionError.from_pb(message.error)
        await call_back(handlers.on_error, execution.error)
    # an empty frame is a keepalive
