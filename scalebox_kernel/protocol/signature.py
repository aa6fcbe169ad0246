"""Signed file URLs (PROTOCOL.md 4): the `signature` a client puts on an `/upload` or `/download` URL and the agent
checks, so that a browser or a third party can transfer one file without the sandbox's access token.

The signature is `v1_` + unpadded base64 of SHA-256 over `path:operation:user:token`, with `:expiration` (unix
seconds) appended when the URL expires. The pre-image holds the access token: it is never printed or logged.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Literal

Operation = Literal["read", "write"]

#: The query parameters of a signed URL.
USERNAME = "username"
SIGNATURE = "signature"
EXPIRATION = "signature_expiration"
#: The user the SDKs sign for when none is given.
DEFAULT_USER = "root"


def sign(path: str, operation: Operation, user: str, token: str, expiration: int | None = None) -> str:
    """The signature of one file operation, valid until `expiration` (unix seconds) when given."""
    parts = [path, operation, user, token]
    if expiration is not None:
        parts.append(str(int(expiration)))
    digest = hashlib.sha256(":".join(parts).encode("utf-8")).digest()
    return "v1_" + base64.b64encode(digest).rstrip(b"=").decode("ascii")
