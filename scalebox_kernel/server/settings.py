"""scalebox-local's settings: one traitlets object, filled from `jupyter scalebox serve` flags and config."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from traitlets import Bool, CaselessStrEnum, Float, Int, List, Unicode, default, validate
from traitlets.config import Configurable

from ..config import ScaleboxConfig, _number, _parsed


class ServerSettings(Configurable):
    """Limits and intervals of scalebox-local (all overridable in jupyter_scalebox_config.py)."""

    data_dir = Unicode(config=True, help="Database, certificates and sandbox files. Env: SCALEBOX_DATA_DIR.")

    @default("data_dir")
    def _default_data_dir(self) -> str:
        # Under `serve`, only its command line beats the environment (the config file it read is below it).
        command_line = getattr(self.parent, "cli_config", None)
        return ScaleboxConfig.load(config=command_line if command_line is not None else self.config).data_dir

    @validate("data_dir")
    def _absolute_data_dir(self, proposal: Any) -> str:
        # Made absolute where it is given: the server then works from inside it (os.chdir).
        return os.path.abspath(os.path.expanduser(proposal["value"])) if proposal["value"] else proposal["value"]

    keepalive_interval = Float(
        10.0,
        config=True,
        help="Seconds between keepalive frames on quiet streams, at most (a client's Keepalive-Ping-Interval "
        "header asks for them sooner; ours gives up after stream_idle_timeout, 60 s by default).",
    )
    default_timeout = Int(300, config=True, help="Seconds a sandbox lives when its create request names none.")
    max_timeout = Int(86400, config=True, help="Longest timeout a sandbox may ask for, in seconds.")
    max_request_bytes = Int(
        64 * 1024 * 1024, config=True, help="Largest RPC or REST request body accepted, in bytes (413 beyond)."
    )
    max_upload_bytes = Int(1024 * 1024 * 1024, config=True, help="Largest file accepted by /upload, in bytes.")
    kernel_start_timeout = Float(60.0, config=True, help="Seconds a language kernel may take to start.")
    stream_buffer_mb = Int(
        4,
        min=1,
        config=True,
        help="MiB of output the server holds in memory per Execute or Process stream whose client reads slower "
        "than the cell or command writes. Beyond it a cell's output spills to a file on the sandbox's own disk "
        "(at most 1 GiB) and a command's pipe is no longer read (which pauses the command) until the client "
        "catches up.",
    )
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
    disk_mb = Int(
        4096,
        config=True,
        help="Disk (MiB) of a sandbox whose create request names none: its files live on a sparse ext4 image of "
        "that size when isolated (root with loop devices), so filling it stops that sandbox only; 0: no limit.",
    )
    pool_size = Int(
        min=0,
        config=True,
        help="Sandboxes the warm pool keeps started (jail, home and kernels ready), handed to creates that they "
        "can honour; 0 turns the pool off. Env: SCALEBOX_LOCAL_POOL_SIZE.",
    )

    @default("pool_size")
    def _default_pool_size(self) -> int:
        return _parsed("SCALEBOX_LOCAL_POOL_SIZE", _number(int, 0), 2, "a whole number, 0 or more")

    pool_languages = List(
        Unicode(),
        ["python"],
        config=True,
        help="Languages whose kernel every pooled sandbox starts before it is taken (its first cell in each then "
        "finds a kernel ready).",
    )
    pool_memory_mb = Int(
        1024,
        min=0,
        config=True,
        help="MiB the pooled sandboxes may use together (measured in their cgroups); the pool stops growing "
        "before one more would pass it.",
    )
    allow_private_networks = Bool(
        False,
        config=True,
        help="Let sandboxes with internet access reach the private ranges (10/8, 172.16/12, 192.168/16, "
        "100.64/10) and the host's attached subnets. The host's own addresses, loopback and link-local (cloud "
        "metadata) stay unreachable either way.",
    )
    max_cpu_count = Int(
        config=True, help="Most CPUs a create request may ask for (cpu_count); defaults to this machine's CPUs."
    )

    @default("max_cpu_count")
    def _default_max_cpu_count(self) -> int:
        return max(os.cpu_count() or 1, self.cpu_count)

    max_memory_mb = Int(
        config=True, help="Most memory (MiB) a create request may ask for (memory_mb); defaults to this machine's."
    )

    @default("max_memory_mb")
    def _default_max_memory_mb(self) -> int:
        try:
            physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
        except (ValueError, OSError):
            physical = 0
        return max(physical, self.memory_mb)

    max_disk_mb = Int(
        config=True,
        help="Most disk (MiB) a create request may ask for (disk_mb, or storage_gb); defaults to the size of the "
        "file system that holds the data dir.",
    )

    @default("max_disk_mb")
    def _default_max_disk_mb(self) -> int:
        place = Path(self.data_dir).absolute()
        while not place.exists() and place != place.parent:
            place = place.parent
        try:
            total = shutil.disk_usage(place).total // (1024 * 1024)
        except OSError:
            total = 0
        return max(total, self.disk_mb)

    sandbox_uid_base = Int(
        600_000, config=True, help="First uid given to isolated sandboxes (each gets its own, from a range of 65536)."
    )
    public_host = Unicode(
        "", config=True, help="Host[:port] put in sandbox_domain; defaults to the address the server listens on."
    )
    jupyter_endpoint = Bool(
        True,
        config=True,
        help="Serve each sandbox's Jupyter endpoint (the kernels REST API and WebSocket channels under "
        "/sbx/<id>/api). Off, the server answers as a back end without one: Scalebox kernels fall back to "
        "ExecutionService.",
    )

    port_connect_timeout = Float(
        5.0, config=True, help="Seconds to connect to a sandbox's own port (/sbx/<id>/port/<n>) before a 504."
    )
    port_idle_timeout = Float(
        300.0,
        config=True,
        help="Seconds a forwarded HTTP request to a sandbox's port may pass without a byte either way before it is "
        "cut (WebSockets are kept alive by pings instead).",
    )
    port_max_connections = Int(
        64, min=1, config=True, help="Forwarded connections (HTTP and WebSocket) to one sandbox's ports at once."
    )

    @property
    def stream_buffer_bytes(self) -> int:
        return self.stream_buffer_mb * 1024 * 1024

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
