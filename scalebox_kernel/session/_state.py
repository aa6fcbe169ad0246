"""What a session knows (contexts, packages, uploaded files), kept inside its sandbox so that any process that
attaches by the session id knows it too."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import NotFound

if TYPE_CHECKING:
    from ..client import AsyncSandbox

STATE_DIR = "/home/user/.scalebox"
STATE_PATH = f"{STATE_DIR}/session.json"
STATE_VERSION = 1


def content_hash(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


@dataclass
class SessionState:
    """The session's memory: code contexts per language, installed packages per language, uploaded files."""

    created_at: float = field(default_factory=time.time)
    contexts: dict[str, str] = field(default_factory=dict)  # language -> context id
    packages: dict[str, list[str]] = field(default_factory=dict)  # language -> package specs as asked for
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> {"sha256", "size"}
    paths: dict[str, str] = field(default_factory=dict)  # language -> where its packages go (set by install)

    def to_json(self) -> str:
        return json.dumps({"version": STATE_VERSION, **asdict(self)}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> SessionState:
        try:
            data = json.loads(text)
        except ValueError:
            return cls()
        if not isinstance(data, dict):
            return cls()
        state = cls()
        if isinstance(data.get("created_at"), int | float):
            state.created_at = float(data["created_at"])
        for name in ("contexts", "packages", "files", "paths"):
            value = data.get(name)
            if isinstance(value, dict):
                setattr(state, name, value)
        return state


async def load_state(sandbox: AsyncSandbox) -> SessionState | None:
    """The state stored in the sandbox, or None when the sandbox has none (not made by a session)."""
    try:
        text = await sandbox.files.read(STATE_PATH, format="text")
    except NotFound:
        return None
    return SessionState.from_json(text)


async def save_state(sandbox: AsyncSandbox, state: SessionState) -> None:
    await sandbox.files.write(STATE_PATH, state.to_json())
