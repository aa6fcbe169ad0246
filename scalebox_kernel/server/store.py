"""Sandbox records and the SQLite file that keeps them across server restarts."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RUNNING = "running"
PAUSED = "paused"
TERMINATED = "terminated"
STATES = (RUNNING, PAUSED, TERMINATED)

#: Terminated sandboxes are remembered this long (to say "expired" rather than "not found"), in seconds.
FORGET_AFTER = 7 * 24 * 3600


def iso(ts: float | None) -> str | None:
    """A Unix time as ISO 8601 in UTC with a `Z`, as the Scalebox API writes times."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class SandboxRecord:
    """What the control plane knows about one sandbox; one row of the `sandboxes` table."""

    sandbox_id: str
    template: str
    token: str
    created_at: float
    timeout: int
    end_at: float
    state: str = RUNNING
    metadata: dict[str, str] = field(default_factory=dict)
    envs: dict[str, str] = field(default_factory=dict)
    auto_pause: bool = False
    allow_internet_access: bool = True
    secure: bool = False
    cpu_count: int = 2
    memory_mb: int = 2048
    reason: str = ""
    paused_at: float | None = None
    ended_at: float | None = None
    disk_mb: int | None = None  # None: the server's default
    problem: str = ""  # why the last expiry or kill of it failed (it is being retried), if one did
    #: Its buckets (isolation/buckets.py `Bucket.to_json`): uri, mount point, endpoint, region; never a key.
    object_storage: list[dict[str, Any]] = field(default_factory=list)
    warm: bool = False  # taken from the warm pool (started before the create)

    def __repr__(self) -> str:  # never show the token
        return f"SandboxRecord({self.sandbox_id!r}, state={self.state!r}, reason={self.reason!r})"

    def remaining(self, now: float | None = None) -> float:
        return max(0.0, self.end_at - (now or time.time()))


_COLUMNS = [f.name for f in fields(SandboxRecord)]
_JSON_COLUMNS = {"metadata", "envs", "object_storage"}
_BOOL_COLUMNS = {"auto_pause", "allow_internet_access", "secure", "warm"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    sandbox_id TEXT PRIMARY KEY,
    template TEXT NOT NULL,
    token TEXT NOT NULL,
    created_at REAL NOT NULL,
    timeout INTEGER NOT NULL,
    end_at REAL NOT NULL,
    state TEXT NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    envs TEXT NOT NULL DEFAULT '{}',
    auto_pause INTEGER NOT NULL DEFAULT 0,
    allow_internet_access INTEGER NOT NULL DEFAULT 1,
    secure INTEGER NOT NULL DEFAULT 0,
    cpu_count INTEGER NOT NULL DEFAULT 2,
    memory_mb INTEGER NOT NULL DEFAULT 2048,
    reason TEXT NOT NULL DEFAULT '',
    paused_at REAL,
    ended_at REAL,
    disk_mb INTEGER,
    problem TEXT NOT NULL DEFAULT '',
    object_storage TEXT NOT NULL DEFAULT '[]',
    warm INTEGER NOT NULL DEFAULT 0
)
"""
#: Columns added since the first release, with their definitions: added to older databases when they open.
_ADDED_COLUMNS = {
    "disk_mb": "INTEGER",
    "problem": "TEXT NOT NULL DEFAULT ''",
    "object_storage": "TEXT NOT NULL DEFAULT '[]'",
    "warm": "INTEGER NOT NULL DEFAULT 0",
}


class SandboxStore:
    """The `sandboxes` table in `<data_dir>/scalebox-local.db` (private to the server's user)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        present = {row[1] for row in self._db.execute("PRAGMA table_info(sandboxes)")}
        for name, definition in _ADDED_COLUMNS.items():
            if name not in present:
                self._db.execute(f"ALTER TABLE sandboxes ADD COLUMN {name} {definition}")

    def close(self) -> None:
        self._db.close()

    def save(self, record: SandboxRecord) -> None:
        values = []
        for name in _COLUMNS:
            value: Any = getattr(record, name)
            if name in _JSON_COLUMNS:
                value = json.dumps(value)
            elif name in _BOOL_COLUMNS:
                value = int(value)
            values.append(value)
        marks = ", ".join("?" for _ in _COLUMNS)
        self._db.execute(f"INSERT OR REPLACE INTO sandboxes ({', '.join(_COLUMNS)}) VALUES ({marks})", values)

    def load_all(self) -> list[SandboxRecord]:
        """Every remembered sandbox; terminated ones older than FORGET_AFTER are dropped first."""
        self._db.execute(
            "DELETE FROM sandboxes WHERE state = ? AND ended_at < ?", (TERMINATED, time.time() - FORGET_AFTER)
        )
        rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM sandboxes ORDER BY created_at").fetchall()
        records = []
        for row in rows:
            kwargs: dict[str, Any] = {}
            for name, value in zip(_COLUMNS, row, strict=True):
                if name in _JSON_COLUMNS:
                    value = json.loads(value)
                elif name in _BOOL_COLUMNS:
                    value = bool(value)
                kwargs[name] = value
            records.append(SandboxRecord(**kwargs))
        return records
