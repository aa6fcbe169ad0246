"""Helpers for the escape suite (test_escapes.py): attacks run as sandbox code, and what the host side checks.

Nothing here is a mock: sandboxes are real, on real servers; these helpers only run sandbox code, start host
listeners, and take snapshots of host state to compare before and after an attack.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from client_support import config_for
from conftest import LocalServer

from scalebox_kernel.client import Sandbox, SyncCommandHandle
from scalebox_kernel.errors import ScaleboxError
from scalebox_kernel.local import spawn_local_server

TRY = """
import json, os, signal, socket, errno, ctypes, time
def tried(action):
    try:
        result = action()
        return "SUCCEEDED: " + repr(result)[:200]
    except BaseException as exc:
        name = errno.errorcode.get(getattr(exc, "errno", None) or -1, "")
        return type(exc).__name__ + (":" + name if name else "")
"""


def attempt(sandbox: Sandbox, code: str, timeout: float = 120) -> dict[str, Any]:
    """Run Python in the sandbox's kernel; it prints one JSON object saying what each attempt got."""
    execution = sandbox.run_code(TRY + textwrap.dedent(code), timeout=timeout)
    assert execution.error is None, execution.error
    return json.loads("".join(execution.logs.stdout).strip().splitlines()[-1])


def shell(sandbox: Sandbox, script: str, timeout: float = 60) -> str:
    """Run a shell script in the sandbox (its exit code is ignored); stdout and stderr together."""
    result = sandbox.commands.run(f"( {script} ) 2>&1; true", timeout=timeout)
    return str(result.stdout)


def create(server: LocalServer, **body: Any) -> Sandbox:
    """A sandbox created with fields our client does not send (disk_mb, env_vars, ...), then attached to."""
    with server.client() as http:
        response = http.post("/v1/sandboxes", json={"template": "code-interpreter", "timeout": 600, **body})
    assert response.status_code in (200, 201), response.text
    return Sandbox.connect(response.json()["data"]["sandbox_id"], config=config_for(server))


def start_script(sandbox: Sandbox, name: str, source: str, *args: str, ready: str = "") -> SyncCommandHandle:
    """Write a Python script into the sandbox's /tmp and run it in the background with the system Python; wait
    for `ready` on its stdout when given."""
    path = f"/tmp/{name}.py"
    sandbox.files.write(path, textwrap.dedent(source))
    quoted = " ".join("'" + arg.replace("'", "'\"'\"'") + "'" for arg in args)
    handle = sandbox.commands.run(f"/usr/bin/python3 {path} {quoted}", background=True, timeout=0)
    assert isinstance(handle, SyncCommandHandle)
    if ready:
        assert wait_until(lambda: ready in handle.stdout, 30), (handle.stdout, handle.stderr)
    return handle


def uid_of(sandbox: Sandbox) -> int:
    info = sandbox.get_info().isolation
    assert info is not None
    return int(info["uid"])


# ---------------------------------------------------------------------------------------------------- victims


@dataclass
class Victim:
    """A sandbox that must not notice anything: a file, kernel state and a running command."""

    sandbox: Sandbox
    command: SyncCommandHandle
    secret: str

    @classmethod
    def make(cls, server: LocalServer) -> Victim:
        sandbox = create(server)
        secret = "victim-" + secrets.token_hex(8)
        sandbox.files.write("/home/user/secret.txt", secret)
        assert sandbox.run_code("state = 'kept'").error is None
        command = sandbox.commands.run("sleep 600", background=True)
        assert isinstance(command, SyncCommandHandle)
        return cls(sandbox, command, secret)

    def assert_unaffected(self, *, kernel: bool = True, command: bool = True) -> None:
        assert self.sandbox.files.read("/home/user/secret.txt") == self.secret
        if kernel:
            execution = self.sandbox.run_code("state")
            assert execution.error is None and execution.text == "'kept'", (execution.error, execution.logs)
        else:
            assert self.sandbox.run_code("1 + 1").text == "2"
        if command:
            assert any(p.pid == self.command.pid for p in self.sandbox.commands.list())

    def close(self) -> None:
        with contextlib.suppress(ScaleboxError):
            self.sandbox.kill()
        self.sandbox.close()


def assert_server_serves(server: LocalServer) -> None:
    """The server answers /health and a brand-new sandbox runs a cell."""
    assert server.process.poll() is None, "the server died"
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/health").status_code < 300
    fresh = create(server)
    try:
        assert fresh.run_code("6 * 7").text == "42"
    finally:
        fresh.kill()
        fresh.close()


# ---------------------------------------------------------------------------------------------------- host state


Snapshot = dict[str, tuple[int, int, int, int, int]]


def snapshot(top: Path) -> Snapshot:
    """Every entry below (and including) `top`, never following links: mode, owner, group, size, mtime."""
    found: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [".", *dirnames, *filenames]:
            path = Path(dirpath, name) if name != "." else Path(dirpath)
            info = os.lstat(path)
            found[str(path)] = (info.st_mode, info.st_uid, info.st_gid, info.st_size, info.st_mtime_ns)
    return found


@dataclass
class HostFiles:
    """What host-side attacks aim at: a root-only secret file, a root-owned directory with a secret in it (its
    names carry the secret too), paths that must never come to exist, and a directory under /opt, which every
    sandbox sees read-only at the same path."""

    base: Path
    token: str
    secret_file: Path
    directory: Path
    opt_dir: Path
    missing: list[Path] = field(default_factory=list)

    @classmethod
    def make(cls, base: Path) -> HostFiles:
        token = "hostsecret" + secrets.token_hex(12)
        base.mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o755)
        secret_file = base / "root-only.txt"
        secret_file.write_text(token * 10 + "\n")
        os.chmod(secret_file, 0o600)
        directory = base / "root-dir"
        directory.mkdir(mode=0o755)
        (directory / "secret.txt").write_text(token + "\n")
        os.chmod(directory / "secret.txt", 0o600)
        (directory / f"hostonly-{token}").mkdir(mode=0o700)
        opt_dir = Path("/opt") / f"scalebox-escape-{secrets.token_hex(6)}"
        opt_dir.mkdir(mode=0o755)
        (opt_dir / "secret.txt").write_text(token + "\n")
        os.chmod(opt_dir / "secret.txt", 0o600)
        missing = [base / "created-by-server.log", base / "created-by-server.json", base / "profile-made"]
        return cls(base, token, secret_file, directory, opt_dir, missing)

    def state(self) -> tuple[Snapshot, Snapshot, Snapshot]:
        return snapshot(self.base), snapshot(self.opt_dir), snapshot(Path("/opt"))

    def close(self) -> None:
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.opt_dir)], check=False)

    def assert_untouched(self, before: tuple[Snapshot, Snapshot, Snapshot]) -> None:
        after = self.state()
        assert after[0] == before[0], _changes(before[0], after[0])
        assert after[1] == before[1], _changes(before[1], after[1])
        top_before = {k: v for k, v in before[2].items() if Path(k).parent == Path("/opt")}
        top_after = {k: v for k, v in after[2].items() if Path(k).parent == Path("/opt")}
        assert set(top_after) == set(top_before), _changes(top_before, top_after)
        for path in self.missing:
            assert not os.path.lexists(path), f"{path} was created on the host"

    def leaks(self, text: str | bytes) -> bool:
        """Whether a host secret shows in what a sandbox or an API call gave back."""
        needle = self.token.encode() if isinstance(text, bytes) else self.token
        return needle in text  # type: ignore[operator]


def _changes(before: Snapshot, after: Snapshot) -> str:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return f"host changed: added {added[:5]}, removed {removed[:5]}, changed {changed[:5]}"


def host_ipv4() -> str | None:
    """The host's first non-loopback IPv4 address (from `ip -j -4 addr`)."""
    try:
        listing = json.loads(subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True).stdout)
    except (OSError, ValueError):
        return None
    for interface in listing:
        if interface.get("ifname") == "lo":
            continue
        for info in interface.get("addr_info", []):
            if info.get("local"):
                return str(info["local"])
    return None


class Listener:
    """A TCP (or UDP) listener on a host address that records whether anything reached it."""

    def __init__(self, host: str, kind: int = socket.SOCK_STREAM) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, kind)
        self.sock.bind((host, 0))
        if kind == socket.SOCK_STREAM:
            self.sock.listen()
        self.sock.settimeout(0.2)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.reached: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                if self.sock.type == socket.SOCK_STREAM:
                    conn, peer = self.sock.accept()
                    self.reached.append(peer)
                    conn.close()
                else:
                    self.reached.append(self.sock.recvfrom(65536)[1])
            except (TimeoutError, OSError):
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


# ---------------------------------------------------------------------------------------------------- processes


def cmdlines() -> dict[int, bytes]:
    """Every host process's command line, as `ps` shows it to any user."""
    found: dict[int, bytes] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
    return found


def uids_in_use() -> set[int]:
    """The real uid of every process on the host (zombies included)."""
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                status = Path(f"/proc/{entry}/status").read_text()
                found.add(int(status.split("\nUid:")[1].split()[0]))
    return found


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@contextmanager
def scanning(needles: list[bytes], every: float = 0.05, limit: float = 60.0) -> Iterator[list[tuple[int, bytes]]]:
    """Scan every process's argv in the background (bounded in time) while the block runs; yields the hits."""
    hits: list[tuple[int, bytes]] = []
    scans = [0]
    stop = threading.Event()

    def scan() -> None:
        deadline = time.monotonic() + limit
        while not stop.is_set() and time.monotonic() < deadline:
            for pid, line in cmdlines().items():
                if any(needle in line for needle in needles):
                    hits.append((pid, line))
            scans[0] += 1
            stop.wait(every)

    thread = threading.Thread(target=scan, daemon=True)
    thread.start()
    try:
        yield hits
    finally:
        stop.set()
        thread.join(10)
    assert scans[0] >= 3, "the process list was hardly scanned"


def serve_with_key_file(data_dir: Path, key_file: Path, extra: list[str] | None = None) -> LocalServer:
    """`jupyter scalebox serve --api-key-file FILE` with no key in the environment; the key comes from the file."""
    runtime = data_dir / "runtime"
    log = data_dir / "server.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    proc, info = spawn_local_server(
        data_dir=data_dir,
        runtime_dir=runtime,
        extra_args=["--api-key-file", str(key_file), *(extra or [])],
        log_path=log,
    )
    return LocalServer(info.url, info.api_key, info.certfile, data_dir, runtime, proc, log, list(proc.args))  # type: ignore[arg-type]


def serve_briefly(args: list[str], home: Path, wait: float = 20.0) -> tuple[int | None, str]:
    """Run `python -m scalebox_kernel serve ARGS` with a private runtime and data dir; (exit code or None if it was
    still serving after `wait` s or once its runtime file appeared, its output)."""
    runtime = home / "runtime"
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(runtime))
    env.pop("SCALEBOX_LOCAL_API_KEY", None)
    argv = [sys.executable, "-m", "scalebox_kernel", "serve", "--ip", "127.0.0.1", "--port", "0"]
    argv += ["--data-dir", str(home / "data"), *args]
    out = home / "serve.log"
    with open(out, "wb") as handle:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + wait
    code: int | None = None
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None or (runtime / "scalebox-local.json").exists():
            break
        time.sleep(0.05)
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        code = None
    return code, out.read_text(errors="replace")


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


def is_root_only(path: Path) -> bool:
    info = os.lstat(path)
    return info.st_uid == 0 and not info.st_mode & (stat.S_IRWXG | stat.S_IRWXO)
