"""scalebox-local's settings: one traitlets object, filled from `jupyter scalebox serve` flags and config."""

from __future__ import annotations

import os
from pathlib import Path

from traitlets import CaselessStrEnum, Float, Int, Unicode, default
from traitlets.config import Configurable

from ..config import ScaleboxConfig


class ServerSettings(Configurable):
    """Limits and intervals of scalebox-local (all overridable in jupyter_scalebox_config.py)."""

    data_dir = Unicode(config=True, help="Database, certificates and sandbox files. Env: SCALEBOX_DATA_DIR.")

    @default("data_dir")
    def _default_data_dir(self) -> str:
        return ScaleboxConfig().data_dir

    keepalive_interval = Float(
        10.0, config=True, help="Seconds between keepalive frames on quiet streams (clients time out at 30 s)."
    )
    default_timeout = Int(300, config=True, help="Seconds a sandbox lives when its create request names none.")
    max_timeout = Int(86400, config=True, help="Longest timeout a sandbox may ask for, in seconds.")
    max_request_bytes = Int(
        64 * 1024 * 1024, config=True, help="Largest RPC or REST request body accepted, in bytes (413 beyond)."
    )
    max_upload_bytes = Int(1024 * 1024 * 1024, config=True, help="Largest file accepted by /upload, in bytes.")
    kernel_start_timeout = Float(60.0, config=True, help="Seconds a language kernel may take to start.")
    pause_stop_after = Float(
        0.0,
        config=True,
        help="Seconds a paused sandbox keeps its processes (memory) before they are stopped to free memory, "
        "keeping files; 0 means never.",
    )
    cpu_count = Int(
        2, config=True, help="CPUs of a sandbox whose create request names none (a CPU-time quota when isolated)."
    )
    memory_mb = Int(
        2048, config=True, help="Memory (MiB) of a sandbox whose create request names none (a limit when isolated)."
    )
    isolation = CaselessStrEnum(
        ["auto", "none"],
        "auto",
        config=True,
        help="auto: confine sandboxes with what this machine offers (bubblewrap namespaces, a uid per sandbox, "
        "cgroup limits and freezer; needs root on Linux); none: run sandbox code on the host (--no-isolation).",
    )
    max_processes = Int(
        1024, config=True, help="Processes and threads a sandbox may have at once when isolated (0: no limit)."
    )
    sandbox_uid_base = Int(
        600_000, config=True, help="First uid given to isolated sandboxes (each gets its own, from a range of 65536)."
    )
    public_host = Unicode(
        "", config=True, help="Host[:port] put in sandbox_domain; defaults to the address the server listens on."
    )

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    def sandbox_root(self, sandbox_id: str) -> Path:
        """The host directory that is a sandbox's filesystem (/home/user, /workspace, /tmp live below it)."""
        return self.data_path / "sandboxes" / sandbox_id / "root"

    @property
    def cache_dir(self) -> Path:
        """Caches shared by every sandbox's kernels (matplotlib's font cache, say)."""
        path = self.data_path / "cache"
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o755)
        return path
