"""A kernel's (normalised) output messages as ExecuteResponse events, each small enough for one Connect frame.

Stream text arrives already cut to at most 1 MiB (iopub.TEXT_SLICE); queued stdout or stderr events are joined
again, up to MERGE_LIMIT, for a client that is behind. A display or result cannot be cut: past RESULT_LIMIT its
biggest representations are left out and the cell's stderr says so, rather than the client refusing the frame and
losing the whole cell.
"""

from __future__ import annotations

from typing import Any

from ...protocol import pb
from ...protocol.connect import MAX_MESSAGE_BYTES
from ...protocol.mime import bundle_to_fields
from ..streaming import MiB, StreamBuffer

#: Most characters of queued stdout (or stderr) events joined into one for a client that is behind.
MERGE_LIMIT = 256 * 1024
#: Most characters of stdout or stderr in one event.
STREAM_PIECE = 1024 * 1024
#: Largest result (display or value) sent as one event; a bigger one loses its biggest representations.
RESULT_LIMIT = MAX_MESSAGE_BYTES // 2


def stderr_event(text: str) -> pb.ExecuteResponse:
    return pb.ExecuteResponse(stderr=pb.Output(content=text))


def cell_events(msg_type: str, content: dict[str, Any], json_in_extra: bool) -> list[pb.ExecuteResponse]:
    """One (normalised) kernel message as protocol events; clear_output has no place in the protocol."""
    if msg_type == "stream":
        text = str(content.get("text", ""))
        # The reader slices a big stream message already when it can; any other big text is sliced here.
        pieces = [text[start : start + STREAM_PIECE] for start in range(0, len(text), STREAM_PIECE)] or [""]
        if content.get("name") == "stderr":
            return [pb.ExecuteResponse(stderr=pb.Output(content=piece)) for piece in pieces]
        return [pb.ExecuteResponse(stdout=pb.Output(content=piece)) for piece in pieces]
    if msg_type in ("execute_result", "display_data", "update_display_data"):
        # update_display_data cannot update anything on the wire; its new content arrives as one more result.
        fields = bundle_to_fields(content.get("data", {}), json_in_extra=json_in_extra)
        if msg_type == "execute_result":
            count = content.get("execution_count") or 0
            result = pb.Result(**fields, is_main_result=True, execution_count=count)
        else:
            result = pb.Result(**fields, is_main_result=False)
        left_out = _fit(result)
        if left_out is None:
            return [pb.ExecuteResponse(result=result)]
        kept = [pb.ExecuteResponse(result=result)] if _representations(result) else []
        return [*kept, stderr_event(left_out)]
    if msg_type == "error":
        error = pb.Error(
            name=content.get("ename", ""),
            value=content.get("evalue", ""),
            traceback="\n".join(content.get("traceback", [])),
        )
        return [pb.ExecuteResponse(error=error)]
    return []


def merge_following(event: pb.ExecuteResponse, output: StreamBuffer[pb.ExecuteResponse]) -> pb.ExecuteResponse:
    """The event, with the stdout (or stderr) events queued right behind it joined on: a client that is behind a
    flood of small prints gets a few big events instead of one per print."""
    kind = event.WhichOneof("event")
    if kind not in ("stdout", "stderr"):
        return event
    texts = [getattr(event, kind).content]
    size = len(texts[0])
    while (following := output.peek()) is not None and following.WhichOneof("event") == kind:
        text = getattr(following, kind).content
        if size + len(text) > MERGE_LIMIT:
            break
        output.take()
        texts.append(text)
        size += len(text)
    if len(texts) == 1:
        return event
    merged = pb.Output(content="".join(texts))
    return pb.ExecuteResponse(stdout=merged) if kind == "stdout" else pb.ExecuteResponse(stderr=merged)


def _fit(result: pb.Result) -> str | None:
    """Make a result small enough for one event by leaving out its biggest representations; what was left out,
    as a notice (None if it fitted). One output cannot be split the way stdout can."""
    if result.ByteSize() <= RESULT_LIMIT:
        return None
    sizes = {name: len(value) for name, value in _representations(result)}
    dropped: list[str] = []
    for name, size in sorted(sizes.items(), key=lambda item: -item[1]):
        if result.ByteSize() <= RESULT_LIMIT:
            break
        if name in result.extra:
            del result.extra[name]
        else:
            result.ClearField(name)
        dropped.append(f"{name} ({size / MiB:.1f} MiB)")
    return (
        f"scalebox-local: an output was too large to send: {', '.join(dropped)} left out (one output may be at most "
        f"{RESULT_LIMIT // MiB} MiB; write big data to a file and download it instead).\n"
    )


def _representations(result: pb.Result) -> list[tuple[str, str]]:
    """(field or extra MIME type, value) of every text representation a result carries."""
    found = [(field.name, value) for field, value in result.ListFields() if isinstance(value, str)]
    return [*found, *result.extra.items()]
