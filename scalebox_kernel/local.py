"""Finding scalebox-local, and starting it when nobody has: the runtime file in Jupyter's runtime directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from jupyter_core.paths import jupyter_runtime_dir

from .errors import ServerUnavailable

RUNTIME_FILE_NAME = "scalebox-local.json"
#: Where `jupyter scalebox serve` takes its API key from (besides --api-key-file and the config file).
API_KEY_ENV = "SCALEBOX_LOCAL_API_KEY"


@dataclass(frozen=True)
class LocalServerInfo:
    """What a running scalebox-local tells the other doors about itself."""

    url: str  # base URL of the control plane, without /v1
    api_key: str
    certfile: str | None
    pid: int
    data_dir: str

    def __repr__(self) -> str:  # never show the key
        return f"LocalServerInfo(url={self.url!r}, pid={self.pid}, certfile={self.certfile!r})"


def runtime_file() -> Path:
    return Path(jupyter_runtime_dir()) / RUNTIME_FILE_NAME


def write_runtime_info(info: LocalServerInfo) -> Path:
    path = runtime_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(info), f)
    os.replace(tmp, path)
    return path


def remove_runtime_info(pid: int) -> None:
    """Remove the runtime file if it still describes the server with this pid."""
    info = read_runtime_info(check_alive=False)
    if info and info.pid == pid:
        runtime_file().unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_runtime_info(check_alive: bool = True) -> LocalServerInfo | None:
    try:
        data = json.loads(runtime_file().read_text())
        info = LocalServerInfo(**data)
    except (OSError, ValueError, TypeError):
        return None
    if check_alive and not _alive(info.pid):
        return None
    return info


def spawn_local_server(
    *,
    data_dir: str | Path | None = None,
    runtime_dir: str | Path | None = None,
    api_key: str | None = None,
    tls: bool = False,
    extra_args: list[str] | None = None,
    log_path: str | Path | None = None,
    detach: bool = False,
    wait: float = 60.0,
    port: int = 0,
) -> tuple[subprocess.Popen[bytes], LocalServerInfo]:
    """Start `jupyter scalebox serve` on a loopback port (0: a free one); return the process once its runtime file
    says it is up. `runtime_dir` overrides Jupyter's runtime directory for that server (tests, benchmarks)."""
    runtime = Path(runtime_dir) if runtime_dir else Path(jupyter_runtime_dir())
    runtime.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "scalebox_kernel", "serve", "--ip", "127.0.0.1", "--port", str(port)]
    if data_dir:
        argv += ["--data-dir", str(data_dir)]
    if tls:
        argv.append("--tls")
    argv += extra_args or []
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(runtime))
    env.pop(API_KEY_ENV, None)
    if api_key:
        env[API_KEY_ENV] = api_key  # never on the command line, where every user's `ps` would show it
    log = Path(log_path) if log_path else runtime / "scalebox-local.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd="/",  # not the caller's folder (a notebook's, which may be deleted); the server moves to its data dir
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
        )
    path = runtime / RUNTIME_FILE_NAME
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            info = LocalServerInfo(**json.loads(path.read_text()))
            if info.pid == proc.pid:
                return proc, info
        except (OSError, ValueError, TypeError):
            pass
        if proc.poll() is not None:
            raise ServerUnavailable(f"scalebox-local exited with code {proc.returncode} while starting; see {log}")
        time.sleep(0.05)
    proc.kill()
    raise ServerUnavailable(f"scalebox-local did not start within {wait:.0f} s; see {log}")


def ensure_local_server(data_dir: str | None = None, wait: float = 60.0) -> LocalServerInfo:
    """The running scalebox-local, started in the background (detached, loopback only) if there is none."""
    info = read_runtime_info()
    if info:
        return info
    try:
        _, info = spawn_local_server(data_dir=data_dir, detach=True, wait=wait)
    except ServerUnavailable:
        # Another process may have won the race to start it; it then wrote the runtime file.
        running = read_runtime_info()
        if running is None:
            raise
        info = running
    return info
