"""The Scalebox kernel process's own Jupyter messaging (kernel/base.py, kernel/wire.py), from outside: raw ZMQ
sockets on a real kernel process, with frames no frontend should send, replays, and the requests' error
replies; a cell that fails aborts the cells queued behind it; an orphaned kernel ends; a kernel started without
a connection file writes its own."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import LocalServer
from jupyter_client.connect import write_connection_file
from kernel_support import KernelRun, frontend_script, scalebox_kernels

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def scalebox_env(local_server: LocalServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with scalebox_kernels(local_server, tmp_path_factory):
        yield


class RawKernel:
    """A kernel process on a connection file of ours, and DEALER sockets on its shell and control channels that
    send whatever frames a test makes."""

    def __init__(self, tmp_path: Path, *options: str) -> None:
        self.key = uuid.uuid4().hex.encode()
        self.file, self.info = write_connection_file(str(tmp_path / "kernel.json"), ip="127.0.0.1", key=self.key)
        self.log = tmp_path / "kernel.log"
        argv = [sys.executable, "-m", "scalebox_kernel.kernel", "-f", self.file, "--language", "python", *options]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out)
        self.context = zmq.Context()
        self.sockets: dict[str, zmq.Socket[Any]] = {}
        for channel in ("shell", "control"):
            socket = self.context.socket(zmq.DEALER)
            socket.linger = 0
            socket.connect(f"tcp://127.0.0.1:{self.info[f'{channel}_port']}")
            self.sockets[channel] = socket
        self.hb = self.context.socket(zmq.REQ)
        self.hb.linger = 0
        self.hb.connect(f"tcp://127.0.0.1:{self.info['hb_port']}")

    def frames(self, msg_type: str, content: Any, *, sign: bool = True) -> list[bytes]:
        header = {
            "msg_id": uuid.uuid4().hex,
            "msg_type": msg_type,
            "username": "test",
            "session": "s",
            "date": "2026-12-03T00:00:00Z",
            "version": "5.3",
        }
        parts = [json.dumps(part).encode() for part in (header, {}, {}, content)]
        return [b"<IDS|MSG>", self.sign(parts) if sign else b"0" * 64, *parts]

    def sign(self, parts: list[bytes]) -> bytes:
        mac = hmac.new(self.key, digestmod=hashlib.sha256)
        for part in parts:
            mac.update(part)
        return mac.hexdigest().encode()

    def send(self, frames: list[bytes], channel: str = "shell") -> None:
        self.sockets[channel].send_multipart(frames)

    def replies(self, channel: str = "shell", wait: float = 1.0) -> list[dict[str, Any]]:
        """Every reply that arrives on `channel` until none has for `wait` seconds."""
        socket, found = self.sockets[channel], []
        while socket.poll(int(wait * 1000)):
            frames = socket.recv_multipart()
            parts = frames[frames.index(b"<IDS|MSG>") + 1 :]
            assert hmac.compare_digest(parts[0], self.sign(parts[1:5])), "a reply not signed with the key"
            found.append(
                {"header": json.loads(parts[1]), "parent": json.loads(parts[2]), "content": json.loads(parts[4])}
            )
        return found

    def ask(self, msg_type: str, content: Any, channel: str = "shell", timeout: float = 60) -> dict[str, Any]:
        frames = self.frames(msg_type, content)
        msg_id = json.loads(frames[2])["msg_id"]
        self.send(frames, channel)
        deadline = time.monotonic() + timeout
        socket = self.sockets[channel]
        while time.monotonic() < deadline:
            if not socket.poll(int(max(0.0, deadline - time.monotonic()) * 1000)):
                break
            frames = socket.recv_multipart()
            parts = frames[frames.index(b"<IDS|MSG>") + 1 :]
            if json.loads(parts[2]).get("msg_id") == msg_id:
                return {"header": json.loads(parts[1]), "content": json.loads(parts[4])}
        raise AssertionError(f"no reply to {msg_type} on {channel} within {timeout} s")

    def beats(self) -> bool:
        self.hb.send(b"ping")
        return bool(self.hb.poll(5000)) and self.hb.recv() == b"ping"

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(AssertionError):
                self.ask("shutdown_request", {"restart": False}, "control", timeout=30)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.context.destroy(linger=0)


@pytest.fixture
def raw(tmp_path: Path) -> Iterator[RawKernel]:
    kernel = RawKernel(tmp_path)
    try:
        assert kernel.ask("kernel_info_request", {})["content"]["status"] == "ok"
        yield kernel
    finally:
        kernel.close()


def _garbage(rng: random.Random, kernel: RawKernel) -> list[bytes]:
    """One malformed message: no delimiter, too few parts, a bad signature, or signed parts that are not a
    Jupyter message (not JSON, not objects, fields of the wrong type), or a huge frame."""
    kind = rng.randrange(8)
    if kind == 0:
        return [rng.randbytes(rng.randrange(1, 64)) for _ in range(rng.randrange(1, 6))]
    if kind == 1:
        return [b"<IDS|MSG>", *[rng.randbytes(8) for _ in range(rng.randrange(0, 4))]]
    if kind == 2:
        return kernel.frames("kernel_info_request", {}, sign=False)
    if kind == 3:
        parts = [rng.randbytes(rng.randrange(0, 32)) for _ in range(4)]
        return [b"<IDS|MSG>", kernel.sign(parts), *parts]
    if kind == 4:
        parts = [json.dumps(rng.choice([[], 1, "x", None, {"msg_type": 5}])).encode() for _ in range(4)]
        return [b"<IDS|MSG>", kernel.sign(parts), *parts]
    if kind == 5:
        msg_type = rng.choice(["execute_request", "complete_request", "inspect_request", "history_request"])
        content = {"code": rng.choice([5, None, [], {}]), "cursor_pos": rng.choice(["x", [], -1]), "detail_level": "a"}
        return kernel.frames(msg_type, content)
    if kind == 6:
        return kernel.frames(rng.choice(["", "no_such_request", "comm_msg", "\u2603" * 40]), {"comm_id": 1})
    return kernel.frames("kernel_info_request", {"pad": "x" * (2 << 20)}, sign=rng.random() < 0.5)


def test_bad_frames_are_refused_and_the_kernel_keeps_answering(raw: RawKernel) -> None:
    """A few hundred malformed messages on shell and control: each is refused (logged, never a traceback) or
    answered with an error reply, and the kernel still answers kernel_info on both channels and its heartbeat."""
    rng = random.Random(20261203)
    for round_ in range(6):
        for _ in range(40):
            raw.send(_garbage(rng, raw), rng.choice(["shell", "control"]))
        for channel in ("shell", "control"):
            reply = raw.ask("kernel_info_request", {}, channel)
            assert reply["content"]["status"] == "ok", (round_, reply)
            assert reply["content"]["implementation"] == "scalebox_kernel"
        assert raw.beats()
    for channel in ("shell", "control"):
        for reply in raw.replies(channel, wait=0.5):  # what the garbage got: error replies, or a kernel_info
            assert reply["content"]["status"] in ("ok", "error"), reply
            if reply["content"]["status"] == "error":
                assert reply["content"]["ename"] in ("BadRequest", "UnknownRequest") and reply["content"]["evalue"]
    assert raw.proc.poll() is None
    log = raw.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert "Refused a shell message" in log and "signature does not match" in log


def test_a_request_of_the_wrong_shape_gets_an_error_reply_that_says_why(raw: RawKernel) -> None:
    reply = raw.ask("execute_request", {"code": 5, "silent": False})
    assert reply["header"]["msg_type"] == "execute_reply"
    content = reply["content"]
    assert content["status"] == "error" and content["ename"] == "BadRequest"
    assert "code is int" in content["evalue"] and isinstance(content["execution_count"], int)
    reply = raw.ask("complete_request", {"code": "pri", "cursor_pos": "x"})
    assert reply["header"]["msg_type"] == "complete_reply" and reply["content"]["status"] == "error"
    reply = raw.ask("usage_request", {}, "control")
    assert reply["header"]["msg_type"] == "usage_reply"
    assert reply["content"]["ename"] == "UnknownRequest" and "usage_request" in reply["content"]["evalue"]


def test_a_replayed_message_is_answered_once(raw: RawKernel) -> None:
    frames = raw.frames("kernel_info_request", {})
    raw.send(frames)
    raw.send(frames)
    replies = raw.replies("shell", wait=2.0)
    assert len(replies) == 1, replies
    assert "replayed message" in raw.log.read_text()


def test_a_failed_cell_aborts_the_cells_queued_behind_it_unless_told_not_to(local_server: LocalServer) -> None:
    """On the ExecutionService path (the kernel runs the cell itself), as ipykernel: the execute requests that
    were waiting when a cell failed are answered `aborted`; with stop_on_error=False the next cell runs."""
    run = KernelRun(env={"SCALEBOX_CHANNEL": "execute"})
    try:
        reply, _ = run.execute("x = 1")
        assert reply["content"]["status"] == "ok"
        failing = run.kc.execute("import time; time.sleep(1); 1/0")
        queued = [run.kc.execute(f"print({i})") for i in range(3)]
        assert run.reply(failing)["content"]["status"] == "error"
        statuses = [run.reply(msg_id)["content"]["status"] for msg_id in queued]
        assert statuses == ["aborted"] * 3
        failing = run.kc.execute("import time; time.sleep(1); 1/0", stop_on_error=False)
        after = run.kc.execute("print('ran')")
        assert run.reply(failing)["content"]["status"] == "error"
        assert run.reply(after)["content"]["status"] == "ok"
        reply, _ = run.execute("x")  # the kernel, and the sandbox's state, are as they were
        assert reply["content"]["status"] == "ok"
    finally:
        run.shutdown()


def test_a_cell_that_cannot_reach_a_sandbox_aborts_the_cells_queued_behind_it() -> None:
    """With "Run All" and no server, the first cell says why; the ones queued behind it do not each wait to
    fail the same way: they are aborted, as after any failed cell."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once the socket closes
    run = KernelRun(env={"SCALEBOX_API_URL": f"http://127.0.0.1:{port}", "SCALEBOX_API_KEY": "sk-none"})
    try:
        first = run.kc.execute("1 + 1")
        queued = [run.kc.execute(f"print({i})") for i in range(3)]
        assert run.reply(first, timeout=120)["content"]["ename"] == "ServerUnavailable"
        assert [run.reply(msg_id)["content"]["status"] for msg_id in queued] == ["aborted"] * 3
    finally:
        run.shutdown()


def test_a_shutdown_on_the_shell_channel_ends_this_kernel_not_the_sandboxes(local_server: LocalServer) -> None:
    """Old frontends send shutdown_request on shell. With the sandbox's kernel answering the other requests,
    this one is still about the local process: it ends, and the sandbox is let go of as at any shutdown."""
    run = KernelRun()
    try:
        reply, _ = run.execute("import os; os.getpid()")
        assert reply["content"]["status"] == "ok"
        sandbox_id = run.sandbox_id()
        assert sandbox_id in local_server.sandbox_ids()
        msg = run.kc.session.msg("shutdown_request", {"restart": False})
        run.kc.shell_channel.send(msg)
        assert run.reply(msg["header"]["msg_id"])["content"] == {"status": "ok", "restart": False}
        deadline = time.monotonic() + 30
        while run.km.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not run.km.is_alive(), "the kernel process did not end"
        assert sandbox_id not in local_server.sandbox_ids(), "its sandbox was not let go of"
    finally:
        run.shutdown(now=True)


def test_a_kernel_whose_parent_is_gone_ends(tmp_path: Path) -> None:
    """As ipykernel: the process that started the kernel (JPY_PARENT_PID) dies, and the kernel (in its own process
    here; test_zygote.py has a forked one) ends too."""
    connection, _ = write_connection_file(str(tmp_path / "kernel.json"), ip="127.0.0.1")
    pid_file = tmp_path / "kernel.pid"
    parent = subprocess.Popen([sys.executable, "-c", frontend_script(connection, pid_file, zygote=False)])
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    kernel_pid = int(pid_file.read_text())
    try:
        time.sleep(1.5)
        assert _alive(kernel_pid), "the kernel ended with its parent alive"
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 30
        while _alive(kernel_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(kernel_pid), "the orphaned kernel is still running"
    finally:
        if _alive(kernel_pid):
            os.kill(kernel_pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_a_kernel_without_a_connection_file_writes_its_own(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "scalebox_kernel.kernel", "--language", "bash"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        files: list[Path] = []
        while not files and time.monotonic() < deadline:
            files = list(runtime.glob("kernel-scalebox-*.json")) if runtime.exists() else []
            time.sleep(0.05)
        assert files, "no connection file was written"
        assert files[0].stat().st_mode & 0o077 == 0, "the connection file (it holds the key) is readable by others"
        info = json.loads(files[0].read_text())
        assert info["key"] and info["transport"] == "tcp" and info["kernel_name"] == "scalebox-bash"
        from jupyter_client import BlockingKernelClient

        client = BlockingKernelClient()
        client.load_connection_file(str(files[0]))
        client.start_channels()
        try:
            reply = client.kernel_info(reply=True, timeout=30)
            assert reply["content"]["language_info"]["name"] == "bash"
            client.shutdown()
            assert proc.wait(30) == 0
        finally:
            client.stop_channels()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
