"""A bare Jupyter WebSocket client for the endpoint tests: messages built and read with jupyter_client's Session,
framed by the endpoint's own codec, sent over the `websockets` library (no code of ours between test and server
but the framing, which tests/test_jupyter_endpoint.py checks against hand-made frames too)."""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl as ssl_module
from typing import Any

from jupyter_client.session import Session
from websockets.asyncio.client import ClientConnection, connect

from scalebox_kernel.protocol import jupyter_ws
from scalebox_kernel.protocol.jupyter_ws import WireMessage


def ws_url(base: str, kernel_id: str, session_id: str | None = None, token: str | None = None) -> str:
    url = base.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
    url += f"/api/kernels/{kernel_id}/channels"
    query = [f"session_id={session_id}"] if session_id else []
    if token:
        query.append(f"token={token}")
    return url + ("?" + "&".join(query) if query else "")


class Frontend:
    """One client session on one kernel's channels."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.session = Session(key=secrets.token_bytes(16), username="test")  # the server signs anew
        self.subprotocol = ws.subprotocol
        self.inbox: list[dict[str, Any]] = []

    @classmethod
    async def open(
        cls, url: str, token: str | None = None, *, v1: bool = True, ssl: ssl_module.SSLContext | None = None
    ) -> Frontend:
        headers = {"Authorization": f"token {token}"} if token else {}
        protocols = [jupyter_ws.V1_SUBPROTOCOL] if v1 else None
        ws = await connect(
            url,
            additional_headers=headers,
            subprotocols=protocols,  # type: ignore[arg-type]
            max_size=None,
            proxy=None,
            ssl=ssl,
        )
        return cls(ws)

    async def send(
        self, channel: str, msg_type: str, content: dict[str, Any], buffers: list[bytes] | None = None
    ) -> str:
        msg = self.session.msg(msg_type, content)
        parts = [self.session.pack(msg[name]) for name in ("header", "parent_header", "metadata", "content")]
        await self.ws.send(jupyter_ws.encode(WireMessage(channel, parts, buffers or []), self.subprotocol))
        return str(msg["header"]["msg_id"])

    async def execute(self, code: str, **extra: Any) -> str:
        content = {"code": code, "silent": False, "store_history": True, "allow_stdin": False, **extra}
        return await self.send("shell", "execute_request", content)

    async def receive(self, timeout: float = 30) -> dict[str, Any]:
        frame = await asyncio.wait_for(self.ws.recv(), timeout)
        wire = jupyter_ws.decode(frame, self.subprotocol, from_client=False)
        message = {
            "channel": wire.channel,
            "header": wire.header,
            "parent_header": wire.parent_header,
            "metadata": json.loads(bytes(wire.parts[2])),
            "content": wire.content,
            "buffers": [bytes(b) for b in wire.buffers],
        }
        self.inbox.append(message)
        return message

    async def until(
        self, msg_id: str, *, reply: bool = True, idle: bool = True, timeout: float = 60
    ) -> list[dict[str, Any]]:
        """Messages answering `msg_id` until its reply and its idle status have both come."""
        got: list[dict[str, Any]] = []
        seen_reply, seen_idle = not reply, not idle
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (seen_reply and seen_idle):
            message = await self.receive(max(deadline - loop.time(), 0.01))
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            got.append(message)
            kind = message["header"].get("msg_type", "")
            if message["channel"] in ("shell", "control") and kind.endswith("_reply"):
                seen_reply = True
            if kind == "status" and message["content"].get("execution_state") == "idle":
                seen_idle = True
        return got

    async def close(self) -> None:
        await self.ws.close()


def of_type(messages: list[dict[str, Any]], msg_type: str) -> list[dict[str, Any]]:
    return [m for m in messages if m["header"].get("msg_type") == msg_type]


def stdout(messages: list[dict[str, Any]]) -> str:
    return "".join(m["content"]["text"] for m in of_type(messages, "stream") if m["content"]["name"] == "stdout")
