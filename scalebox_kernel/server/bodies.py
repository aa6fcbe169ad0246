"""Reading requests (bodies with a size limit, the credential of an Authorization header), and the JSON error body
every non-Connect endpoint answers with."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from .scrub import scrub

#: After a body went over the limit, this much more is read and dropped so the client still sees the error
#: (closing mid-upload makes most clients report a broken pipe instead of the 413).
_DRAIN_LIMIT = 1024 * 1024 * 1024


def authorization_token(headers: Headers, schemes: tuple[str, ...] = ("bearer",)) -> str:
    """The credential of an `Authorization: <scheme> <token>` header whose scheme is one of `schemes`; "" when there
    is none, and for the constant `Bearer root` the SDKs send beside their real credential (PROTOCOL.md 1.2, 2.3)."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() in schemes and token != "root" else ""


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body is larger than the limit of {limit} bytes")
        self.limit = limit


async def read_limited(request: Request, limit: int) -> bytes:
    """The whole body (chunked or not), or BodyTooLarge once it passes `limit` bytes."""
    declared = request.headers.get("content-length", "")
    oversized = declared.isdigit() and int(declared) > limit
    body = bytearray()
    drained = 0
    try:
        async for chunk in request.stream():
            if oversized:
                drained += len(chunk)
                if drained > _DRAIN_LIMIT:
                    break
                continue
            body += chunk
            if len(body) > limit:
                oversized = True
                body.clear()
    except ClientDisconnect:
        pass
    if oversized:
        raise BodyTooLarge(limit)
    return bytes(body)


def error_response(status: int, message: str, code: str | int | None = None) -> JSONResponse:
    """`{"error", "message", "code"}`: the Python SDK needs `error`, JS and OpenAPI read `message` (with no host
    path of the server in it)."""
    message = scrub(message)
    return JSONResponse({"error": message, "message": message, "code": status if code is None else code}, status)
