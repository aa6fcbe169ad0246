"""Liveness on every stream: a stopped server (SIGSTOP) ends a running cell, command or watch with
ServerUnavailable within `stream_idle_timeout` (plus a margin), through `run_code`, the Scalebox kernel and
`%%scalebox`; after SIGCONT the next cell works and the state is still there. A silent cell on a healthy server
(keepalives flowing) is not cut. A server that closes a stream early or sends garbage is a clear error, not a hang.

The stopping tests use a scalebox-local of their own, never the shared one, and always SIGCONT it in `finally`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest
from client_support import config_for
from conftest import LocalServer
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from kernel_support import KernelRun, environ, install_kernelspecs, text_of

from scalebox_kernel.client import OutputMessage, Sandbox, SyncCommandHandle
from scalebox_kernel.client.connect_client import ConnectClient
from scalebox_kernel.client.connection import Connection
from scalebox_kernel.client.execution import Handlers, execute
from scalebox_kernel.client.transport import Transport
from scalebox_kernel.errors import ScaleboxError, ServerUnavailable
from scalebox_kernel.magics import ScaleboxMagics
from scalebox_kernel.protocol import pb
from scalebox_kernel.protocol.connect import FLAG_END_STREAM, envelope

pytestmark = pytest.mark.slow

IDLE = 4.0  # the clients' stream_idle_timeout here; they ask the server for a keepalive every second
BOUND = IDLE + 5  # a stopped server must end the call within this many seconds of the stop
BUSY_CELL = "import time\nprint('started', flush=True)\ntime.sleep(120)"


@pytest.fixture(scope="module")
def server(server_factory: Any) -> LocalServer:
    """A scalebox-local only this module uses (it gets stopped), with keepalives every second."""
    return server_factory(extra=["--ServerSettings.keepalive_interval=1"])


class Stopper:
    """SIGSTOPs a server at most once, remembering when; `resume` (always called) SIGCONTs it."""

    def __init__(self, server: LocalServer) -> None:
        self.pid = server.process.pid
        self.at: float | None = None
        self._lock = threading.Lock()

    def stop(self, *_: object) -> None:
        with self._lock:
            if self.at is None:
                os.kill(self.pid, signal.SIGSTOP)
                self.at = time.monotonic()

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def waited(self) -> float:
        """Seconds since the stop."""
        assert self.at is not None, "the server was never stopped"
        return time.monotonic() - self.at


@contextmanager
def stopper(server: LocalServer) -> Iterator[Stopper]:
    stop = Stopper(server)
    try:
        yield stop
    finally:
        stop.resume()


def assert_gave_up_on_silence(error: BaseException | str) -> None:
    text = str(error)
    assert f"sent nothing for {IDLE:g} s" in text and "SCALEBOX_STREAM_IDLE_TIMEOUT" in text, text


# ---------------------------------------------------------------------------------------------- the client


def test_run_code_fails_when_the_server_stops_and_works_after(server: LocalServer) -> None:
    sbx = Sandbox.create(config=config_for(server, stream_idle_timeout=IDLE))
    try:
        sbx.run_code("kept = 'yes'")
        with stopper(server) as stop:
            with pytest.raises(ServerUnavailable) as caught:
                sbx.run_code(BUSY_CELL, on_stdout=stop.stop)  # stopped once the cell has visibly started
            assert stop.waited() < BOUND
        assert caught.value.silent_for == IDLE
        assert_gave_up_on_silence(caught.value)
        assert sbx.run_code("print(kept)").logs.stdout == ["yes\n"]  # the interrupted cell left the state alone
    finally:
        sbx.kill()
        sbx.close()


def test_commands_and_watches_fail_when_the_server_stops(server: LocalServer) -> None:
    sbx = Sandbox.create(config=config_for(server, stream_idle_timeout=IDLE))
    try:
        sbx.files.make_dir("/tmp/watched")
        watch = sbx.files.watch_dir("/tmp/watched", lambda event: None)
        with stopper(server) as stop:
            with pytest.raises(ServerUnavailable) as caught:
                sbx.commands.run("echo started; sleep 120", on_stdout=stop.stop, timeout=0)
            assert stop.waited() < BOUND
            assert_gave_up_on_silence(caught.value)
            while watch.error is None and stop.waited() < BOUND:
                time.sleep(0.1)
            assert isinstance(watch.error, ServerUnavailable)
            assert_gave_up_on_silence(watch.error)
        assert sbx.commands.run("echo again").stdout == "again\n"
    finally:
        sbx.kill()
        sbx.close()


def test_silent_cell_and_command_on_a_healthy_server_are_not_cut(local_server: LocalServer) -> None:
    """The shared server keeps its default keepalive interval (10 s): only because the client asks for one
    every second do streams silent for twice the idle timeout survive."""
    sbx = Sandbox.create(config=config_for(local_server, stream_idle_timeout=IDLE))
    try:
        quiet = f"sleep {IDLE * 2:g}; echo awake"
        command = sbx.commands.run(quiet, background=True)
        assert isinstance(command, SyncCommandHandle)
        execution = sbx.run_code(f"import time\ntime.sleep({IDLE * 2:g})\nprint('awake')")
        assert execution.error is None and execution.logs.stdout == ["awake\n"]
        assert command.wait().stdout == "awake\n"
    finally:
        sbx.kill()
        sbx.close()


# ---------------------------------------------------------------------------------------------- the doors


def test_kernel_cell_fails_when_the_server_stops_and_the_next_cell_works(
    server: LocalServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    jupyter_path = install_kernelspecs(tmp_path_factory.mktemp("kernelspecs"))
    env = {"JUPYTER_PATH": str(jupyter_path), "SCALEBOX_STREAM_IDLE_TIMEOUT": f"{IDLE:g}", **server.env()}
    with environ(env):
        run = KernelRun()
    try:
        reply, _ = run.execute("kept = 'yes'", timeout=120)
        assert reply["content"]["status"] == "ok", reply["content"]
        with stopper(server) as stop:
            msg_id = run.kc.execute(BUSY_CELL)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # stopped once the cell has visibly started
                msg = run.kc.get_iopub_msg(timeout=60)
                if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
                    break
            stop.stop()
            reply = run.reply(msg_id, timeout=BOUND + 30)
            assert stop.waited() < BOUND
        outputs = run.outputs(msg_id)  # the cell ended: its idle status came
        content = reply["content"]
        assert content["status"] == "error" and content["ename"] == "ServerUnavailable", content
        assert_gave_up_on_silence(content["evalue"])
        assert content["traceback"] == [f"ServerUnavailable: {content['evalue']}"]  # no frames of ours
        assert [m["content"]["ename"] for m in outputs if m["msg_type"] == "error"] == ["ServerUnavailable"]
        reply, outputs = run.execute("print(kept)", timeout=120)
        assert reply["content"]["status"] == "ok" and text_of(outputs) == "yes\n"
    finally:
        run.shutdown()


@pytest.fixture
def shell(server: LocalServer) -> Iterator[InteractiveShell]:
    with environ({"SCALEBOX_STREAM_IDLE_TIMEOUT": f"{IDLE:g}", **server.env()}):
        ip = InteractiveShell.instance()
        ip.run_line_magic("load_ext", "scalebox_kernel")
        magics = ip.magics_manager.registry["ScaleboxMagics"]
        assert isinstance(magics, ScaleboxMagics)
        try:
            yield ip
        finally:
            magics.at_exit()
            ip.run_line_magic("unload_ext", "scalebox_kernel")


def test_scalebox_magic_cell_fails_when_the_server_stops_and_the_next_cell_works(
    server: LocalServer, shell: InteractiveShell
) -> None:
    with capture_output() as captured:
        assert shell.run_cell("%%scalebox\nkept = 'yes'").success, captured.stdout + captured.stderr
    with stopper(server) as stop:

        def stop_once_started() -> None:
            deadline = time.monotonic() + 60
            while "started" not in captured.stdout and time.monotonic() < deadline:
                time.sleep(0.05)
            stop.stop()

        with capture_output() as captured:
            watcher = threading.Thread(target=stop_once_started, daemon=True)
            watcher.start()
            result = shell.run_cell("%%scalebox\n" + BUSY_CELL)
            watcher.join()
        assert stop.waited() < BOUND
    assert type(result.error_in_exec).__name__ == "ServerUnavailable"
    assert_gave_up_on_silence(result.error_in_exec)
    assert "started" in captured.stdout and "ServerUnavailable" in captured.stdout
    assert "Traceback" not in captured.stdout and 'File "' not in captured.stdout  # no frames of ours
    with capture_output() as captured:
        assert shell.run_cell("%%scalebox\nprint(kept)").success
    assert captured.stdout == "yes\n"


# ---------------------------------------------------------------------------------------------- broken servers


@asynccontextmanager
async def misbehaving_agent(reply: bytes | None, *, close: bool) -> AsyncIterator[ConnectClient]:
    """A loopback HTTP server that answers every stream with `reply` (None: not even headers), then closes the
    connection or stays silent; and a client for it whose streams give up after one silent second."""
    done = asyncio.Event()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")),
            0,  # a GET
        )
        await reader.readexactly(length)
        if reply is not None:
            headers = b"HTTP/1.1 200 OK\r\nContent-Type: application/connect+proto\r\nConnection: close\r\n\r\n"
            writer.write(reply if reply.startswith(b"HTTP/") else headers + reply)  # a reply may bring its own
            await writer.drain()
        if not close:
            await done.wait()
        writer.close()

    listener = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    transport = Transport(Connection(url, "k" * 20, True, 5.0, stream_idle_timeout=1.0), max_retries=0)
    try:
        yield ConnectClient(transport, url, {})
    finally:
        done.set()
        await transport.aclose()
        listener.close()


CHUNKED = b"HTTP/1.1 200 OK\r\nContent-Type: application/connect+proto\r\nTransfer-Encoding: chunked\r\n\r\n"


def stdout_frame(text: str) -> bytes:
    return envelope(pb.ExecuteResponse(stdout=pb.Output(content=text)).SerializeToString())


async def run_against(reply: bytes | None, *, close: bool) -> tuple[BaseException, list[str]]:
    """What a cell run against a misbehaving agent raised, and the lines it printed before that."""
    lines: list[str] = []
    async with misbehaving_agent(reply, close=close) as rpc:
        handlers = Handlers(on_stdout=lambda m: lines.append(m.line))
        with pytest.raises(ScaleboxError) as caught:
            await asyncio.wait_for(execute(rpc, pb.ExecuteRequest(code="1"), handlers, None), 30)
    return caught.value, lines


@pytest.mark.parametrize(
    ("reply", "close", "expected"),
    [
        (None, False, "sent nothing for 1 s"),  # no response headers
        (stdout_frame("one\n"), False, "sent nothing for 1 s"),  # a frame, then silence
        (stdout_frame("one\n") + envelope(b"x" * 10)[:8], False, "sent nothing for 1 s"),  # half a frame
        (stdout_frame("one\n"), True, "without its end-of-stream frame"),  # closed early
        (
            CHUNKED + b"%x\r\n" % len(stdout_frame("one\n")) + stdout_frame("one\n") + b"\r\n40\r\nab",
            True,
            "mid-stream",
        ),
    ],
    ids=["no-headers", "silent", "half-a-frame", "closed-early", "closed-mid-chunk"],
)
async def test_a_stream_that_stops_short_is_server_unavailable(reply: bytes | None, close: bool, expected: str) -> None:
    error, lines = await run_against(reply, close=close)
    assert isinstance(error, ServerUnavailable) and expected in str(error), error
    assert lines == ([] if reply is None else ["one\n"])  # what came before the fault was delivered


@pytest.mark.parametrize(
    ("garbage", "expected"),
    [
        (b"\xff\x00\x00\x00\x05hello", "malformed stream"),
        (envelope(b"\xff\xff\xff\xff"), "malformed stream"),
        (envelope(b"not json", FLAG_END_STREAM), "malformed end-of-stream frame"),
        (b"\x00\x7f\xff\xff\xff", "more than this client accepts"),  # a 2 GiB message announced
    ],
    ids=["bad-flags", "undecodable-message", "bad-end-of-stream", "oversized"],
)
async def test_garbage_on_a_stream_is_a_clear_error_not_a_hang(garbage: bytes, expected: str) -> None:
    error, lines = await run_against(stdout_frame("one\n") + garbage, close=False)
    assert not isinstance(error, ServerUnavailable) and expected in str(error), error
    assert lines == ["one\n"]


@pytest.mark.parametrize(
    ("reply", "close", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 5000, True, "cannot reach"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 5000, False, "sent nothing for 1 s"),
    ],
    ids=["cut-mid-body", "silent-mid-body"],
)
async def test_a_download_that_breaks_off_mid_body_is_a_clear_error(reply: bytes, close: bool, expected: str) -> None:
    """A file read with progress (a streamed body) that stops short: ServerUnavailable, saying what, not an
    httpx exception; what came was counted."""
    from scalebox_kernel.client.filesystem import AsyncFilesystem

    counted: list[int] = []
    async with misbehaving_agent(reply, close=close) as rpc:
        with pytest.raises(ScaleboxError) as caught:
            await asyncio.wait_for(AsyncFilesystem(rpc).read("/big.bin", "bytes", on_bytes=counted.append), 30)
    assert isinstance(caught.value, ServerUnavailable) and expected in str(caught.value), caught.value
    assert "Reading /big.bin" in str(caught.value) and counted and counted[-1] <= 5000


async def test_keepalive_frames_are_skipped_silently() -> None:
    messages: list[OutputMessage] = []
    frames = envelope(pb.ExecuteResponse().SerializeToString()) * 3 + envelope(b"{}", FLAG_END_STREAM)
    async with misbehaving_agent(frames, close=True) as rpc:
        execution = await execute(rpc, pb.ExecuteRequest(code="1"), Handlers(on_stdout=messages.append), None)
    assert messages == [] and execution.logs.stdout == [] and execution.results == [] and execution.error is None
