"""The two framings of Jupyter's kernel WebSocket (`protocol.jupyter_ws`): layouts as published, round trips,
and malformed frames refused with a clear error."""

from __future__ import annotations

import struct

import pytest

from scalebox_kernel.protocol import jupyter_ws
from scalebox_kernel.protocol.jupyter_ws import FramingError, WireMessage


def test_v1_frames_round_trip_and_match_the_published_layout() -> None:
    message = WireMessage("shell", [b'{"msg_id":"a"}', b"{}", b"{}", b'{"x":1}'], [b"\x00\x01", b""])
    frame = jupyter_ws.encode_v1(message)
    count = struct.unpack_from("<Q", frame)[0]
    assert count == 8  # channel, four parts, two buffers, and the end
    offsets = struct.unpack_from(f"<{count}Q", frame, 8)
    assert frame[offsets[0] : offsets[1]] == b"shell"
    assert frame[offsets[4] : offsets[5]] == b'{"x":1}'
    decoded = jupyter_ws.decode_v1(frame)
    assert [bytes(p) for p in decoded.parts] == list(message.parts)
    assert [bytes(b) for b in decoded.buffers] == [b"\x00\x01", b""]


def test_legacy_frames_with_buffers_round_trip() -> None:
    message = WireMessage("iopub", [b'{"msg_type":"comm_msg"}', b"{}", b"{}", b'{"data":{}}'], [b"abc"])
    frame = jupyter_ws.encode_json(message)
    assert isinstance(frame, bytes)
    decoded = jupyter_ws.decode_json(frame, from_client=False)
    assert decoded.channel == "iopub" and decoded.content == {"data": {}} and bytes(decoded.buffers[0]) == b"abc"
    text = jupyter_ws.encode_json(WireMessage("shell", [b"{}", b"{}", b"{}", b'{"code":"1"}']))
    assert isinstance(text, str) and jupyter_ws.decode_json(text).content == {"code": "1"}


@pytest.mark.parametrize(
    "frame",
    [b"", b"\x01" * 7, struct.pack("<Q", 2**40), struct.pack("<7Q", 6, 56, 60, 61, 62, 63, 9999), "not json", "[1]"],
)
def test_malformed_frames_are_framing_errors(frame: bytes | str) -> None:
    with pytest.raises(FramingError):
        jupyter_ws.decode(frame, jupyter_ws.V1_SUBPROTOCOL if isinstance(frame, bytes) else None)


def test_clients_cannot_send_on_iopub() -> None:
    frame = jupyter_ws.encode_v1(WireMessage("iopub", [b"{}", b"{}", b"{}", b"{}"]))
    with pytest.raises(FramingError, match="unknown channel"):
        jupyter_ws.decode_v1(frame)
