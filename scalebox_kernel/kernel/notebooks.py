"""Which sandbox belongs to which notebook: a small JSON file in Jupyter's data dir, so that a restarted kernel
(or a reopened notebook) re-attaches to its sandbox while that sandbox lives."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_data_dir

FILE_NAME = "notebook-sandboxes.json"
_MAX_ENTRIES = 500  # old entries are dropped first; a sandbox outlives its notebook by hours at most


def notebook_key(connection_file: str | None) -> str:
    """The notebook's identity: the path the frontend names (JPY_SESSION_NAME), else the kernel's connection
    file, which a restart reuses."""
    name = os.environ.get("JPY_SESSION_NAME")
    if name:
        return f"notebook:{name}"
    return f"kernel:{Path(connection_file).name}" if connection_file else f"pid:{os.getpid()}"


class NotebookSandboxes:
    """`notebook key + server -> sandbox id (and whether its context must start fresh)`, safe across processes."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or Path(jupyter_data_dir()) / "scalebox-kernel" / FILE_NAME

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = json.loads(self.path.read_text())
                if not isinstance(data, dict):
                    data = {}
            except (OSError, ValueError):
                data = {}
            before = json.dumps(data, sort_keys=True)
            yield data
            if json.dumps(data, sort_keys=True) != before:
                if len(data) > _MAX_ENTRIES:
                    for old in sorted(data, key=lambda k: data[k].get("updated", 0))[: len(data) - _MAX_ENTRIES]:
                        del data[old]
                tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
                os.replace(tmp, self.path)

    @staticmethod
    def _slot(key: str, server: str, language: str) -> str:
        return f"{server} {language} {key}"

    def recall(self, key: str, server: str, language: str) -> dict[str, Any] | None:
        """`{"sandbox_id": ..., "restart": bool, "keep": bool}` remembered for this notebook on this server, if any."""
        with self._locked() as data:
            entry = data.get(self._slot(key, server, language))
        return dict(entry) if isinstance(entry, dict) and entry.get("sandbox_id") else None

    def remember(
        self, key: str, server: str, language: str, sandbox_id: str, *, restart: bool = False, keep: bool = False
    ) -> None:
        """Remember the sandbox; `restart`: its context must start fresh; `keep`: the user asked to keep it."""
        with self._locked() as data:
            data[self._slot(key, server, language)] = {
                "sandbox_id": sandbox_id,
                "restart": restart,
                "keep": keep,
                "updated": time.time(),
            }

    def forget(self, key: str, server: str, language: str) -> None:
        with self._locked() as data:
            data.pop(self._slot(key, server, language), None)
