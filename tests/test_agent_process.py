"""The Process service on scalebox-local: commands, their streams, stdin, signals, re-attach, PTY, pause.

Without isolation (until issue 6) commands run on the host: they use relative paths (their cwd is the sandbox's
/home/user), never absolute ones, which would name host files.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from agent_support import CODEC_IDS, CODECS, START, Box, end_of, process_output, results_of, wait_for
from client_support import config_for
from conftest import LocalServer

from scalebox_kernel.client import Sandbox
from scalebox_kernel.protocol import connect, pb

P = "sandboxagent.Process/"


@pytest.fixture(scope="module")
def box(local_server: LocalServer, http: httpx.Client) -> Iterator[Box]:
    sandbox = Box(local_server, http, env_vars={"SANDBOX_VAR": "from-create"})
    yield sandbox
    sandbox.kill()


def bash(command: str, **fields: object) -> pb.StartRequest:
    return pb.StartRequest(process=pb.ProcessConfig(cmd="/bin/bash", args=["-l", "-c", command], **fields))


def kill(box: Box, pid: int) -> None:
    request = pb.SendSignalRequest(process=pb.ProcessSelector(pid=pid), signal=pb.SIGNAL_SIGKILL)
    box.ok(P + "SendSignal", request, pb.SendSignalResponse)


@pytest.mark.parametrize("codec", CODECS, ids=CODEC_IDS)
def test_start_streams_start_output_and_end(box: Box, codec: connect.Codec) -> None:
    request = bash("echo out; echo err >&2; exit 3")
    reply = box.stream(START, request, pb.StartResponse, codec)
    assert reply.status == 200 and reply.ended and reply.error is None
    first = reply.messages[0].event
    assert first.HasField("start") and first.start.pid > 0  # the Python SDK takes the pid from frame one
    assert process_output(reply) == b"out\n" and process_output(reply, "stderr") == b"err\n"
    end = end_of(reply)
    assert (end.exit_code, end.exited, end.status) == (3, True, "exit status 3")
    assert reply.messages[-1].event.HasField("end")


def test_environment_cwd_and_no_server_secrets(box: Box, local_server: LocalServer) -> None:
    command = 'pwd; echo "$SANDBOX_VAR $CALL_VAR $HOME"; env; python -c "import ipykernel"'
    reply = box.run(command, envs={"CALL_VAR": "v"})
    out = process_output(reply).decode()
    lines = out.splitlines()
    assert lines[0].endswith("/home/user") and lines[1] == f"from-create v {lines[0]}"
    assert local_server.api_key not in out and "SCALEBOX_" not in out  # nothing of the server's own env
    assert end_of(reply).exit_code == 0  # the kernels' Python is the one on PATH in login shells
    reply = box.run("pwd", cwd="/tmp")
    assert process_output(reply).decode().strip().endswith("/tmp")


def test_stdin_and_signals(box: Box) -> None:
    with box.open(START, bash("read line; echo got:$line"), pb.StartResponse) as frames:
        pid = frames.next().message.event.start.pid
        request = pb.SendInputRequest(process=pb.ProcessSelector(pid=pid), input=pb.ProcessInput(stdin=b"hello\n"))
        box.ok(P + "SendInput", request, pb.SendInputResponse)
        events = [f.message.event for f in frames]
    assert b"".join(e.data.stdout for e in events if e.HasField("data")) == b"got:hello\n"
    assert events[-1].end.exit_code == 0

    with box.open(START, bash("sleep 30"), pb.StartResponse) as frames:
        pid = frames.next().message.event.start.pid
        started = time.monotonic()
        request = pb.SendSignalRequest(process=pb.ProcessSelector(pid=pid), signal=pb.SIGNAL_SIGTERM)
        box.ok(P + "SendSignal", request, pb.SendSignalResponse)
        end = next(f.message.event.end for f in frames if f.message.event.HasField("end"))
    assert (end.exited, end.status) == (False, "signal: terminated") and time.monotonic() - started < 5

    for signal in (pb.SIGNAL_SIGKILL, pb.SIGNAL_SIGTERM):
        request = pb.SendSignalRequest(process=pb.ProcessSelector(pid=999999), signal=signal)
        status, body = box.unary(P + "SendSignal", request, pb.SendSignalResponse)
        assert status == 404 and body["message"] == "process with pid 999999 not found"  # SDKs look for "not found"
    request = pb.SendInputRequest(process=pb.ProcessSelector(pid=999999), input=pb.ProcessInput(stdin=b"x"))
    assert box.unary(P + "SendInput", request, pb.SendInputResponse)[0] == 404


def test_list_connect_and_background_survive_a_disconnect(box: Box) -> None:
    command = "for i in 1 2 3 4 5 6; do echo tick $i; sleep 0.4; done; echo done > bg-done.txt"
    request = bash(command)
    request.tag = "ticker"
    with box.open(START, request, pb.StartResponse) as frames:
        pid = frames.next().message.event.start.pid
    # The client left; the command goes on (SDK background semantics) and is listed.
    listed = box.ok(P + "List", pb.ListRequest(), pb.ListResponse)
    [info] = [p for p in listed.processes if p.pid == pid]
    assert info.config.cmd == "/bin/bash" and info.config.args[2] == command and info.tag == "ticker"

    reply = box.stream(P + "Connect", pb.ConnectRequest(process=pb.ProcessSelector(pid=pid)), pb.ConnectResponse)
    assert reply.messages[0].event.start.pid == pid  # start first on re-attach too
    assert b"tick 6\n" in process_output(reply) and end_of(reply).exit_code == 0
    assert (
        box.http.get(f"{box.base}/download/home/user/bg-done.txt", headers={"X-Access-Token": box.token}).text
        == "done\n"
    )
    listed = box.ok(P + "List", pb.ListRequest(), pb.ListResponse)
    assert pid not in [p.pid for p in listed.processes]
    # A finished command can still be connected to for a while: it reports how it ended.
    by_tag = pb.ConnectRequest(process=pb.ProcessSelector(tag="ticker"))
    reply = box.stream(P + "Connect", by_tag, pb.ConnectResponse)
    assert reply.messages[0].event.start.pid == pid and end_of(reply).exit_code == 0
    status, body = box.unary(P + "Update", pb.UpdateRequest(process=pb.ProcessSelector(pid=4)), pb.UpdateResponse)
    assert status == 404 and body["code"] == "not_found"


def test_shell_background_ends_the_stream_at_once(box: Box) -> None:
    # The Python SDK runs background commands as `cmd &` and expects the stream to end when bash does.
    started = time.monotonic()
    reply = box.run("sleep 3 > /dev/null 2>&1 & echo launched")
    assert process_output(reply) == b"launched\n" and end_of(reply).exit_code == 0
    assert time.monotonic() - started < 2


def test_a_background_child_holding_stdout_does_not_hold_the_call(box: Box, local_server: LocalServer) -> None:
    """The child keeps the pipe open for 20 s; the call ends with the shell, through the SDK-style client."""
    sandbox = Sandbox.connect(box.id, config=config_for(local_server))
    try:
        started = time.monotonic()
        result = sandbox.commands.run("sleep 20 & echo hi")
        assert result.stdout == "hi\n" and result.exit_code == 0
        assert time.monotonic() - started < 2
    finally:
        sandbox.close()  # the sandbox stays: it is the module's
    # the same for a terminal
    request = bash("sleep 20 & echo hi")
    request.pty.CopyFrom(pb.PTY())
    started = time.monotonic()
    reply = box.stream(START, request, pb.StartResponse)
    assert b"hi" in process_output(reply, "pty") and end_of(reply).exit_code == 0
    assert time.monotonic() - started < 2


def test_a_slow_reader_gets_all_output_of_a_command_that_exits(box: Box) -> None:
    """While the client does not read, the command is held back; none of its output is dropped when it exits."""
    size = 24 * 1024 * 1024  # several times the stream's buffer
    with box.open(START, bash(f"head -c {size} /dev/zero; echo tail"), pb.StartResponse) as frames:
        time.sleep(1)  # the command fills the buffer and waits
        events = [f.message.event for f in frames]
    data = b"".join(e.data.stdout for e in events if e.HasField("data"))
    assert len(data) == size + 5 and data.endswith(b"tail\n")
    assert events[-1].end.exit_code == 0


def test_keepalives_and_no_kill_on_connect_timeout(box: Box) -> None:
    headers = {"Keepalive-Ping-Interval": "1", "Connect-Timeout-Ms": "1000"}
    with box.open(START, bash("sleep 2.6; echo finished"), pb.StartResponse, **headers) as frames:
        events = [f.message.event for f in frames]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "start" and kinds.count("keepalive") >= 2 and kinds[-1] == "end"
    assert events[-1].end.exit_code == 0  # the 1 s deadline header did not kill the command


def test_pty_mode(box: Box) -> None:
    size = pb.PTY(size=pb.PTY.Size(cols=100, rows=30))
    request = pb.StartRequest(
        process=pb.ProcessConfig(cmd="/bin/bash", args=["-c", "stty size; read line; stty size; echo got:$line"]),
        pty=size,
    )
    with box.open(START, request, pb.StartResponse) as frames:
        pid = frames.next().message.event.start.pid
        output = b""
        for frame in frames:
            output += frame.message.event.data.pty
            if b"30 100" in output:
                break
        selector = pb.ProcessSelector(pid=pid)
        resize = pb.UpdateRequest(process=selector, pty=pb.PTY(size=pb.PTY.Size(cols=120, rows=40)))
        box.ok(P + "Update", resize, pb.UpdateResponse)
        typed = pb.SendInputRequest(process=selector, input=pb.ProcessInput(pty=b"hi\n"))
        box.ok(P + "SendInput", typed, pb.SendInputResponse)
        events = [f.message.event for f in frames]
    output += b"".join(e.data.pty for e in events if e.HasField("data"))
    assert b"40 120" in output and b"got:hi" in output and events[-1].end.exit_code == 0


def test_bad_commands_are_clear_errors(box: Box) -> None:
    reply = box.stream(START, pb.StartRequest(process=pb.ProcessConfig(cmd="/no/such/program")), pb.StartResponse)
    assert reply.error is not None and reply.error.code == "invalid_argument"
    assert "/no/such/program" in reply.error.message
    assert reply.messages == []
    reply = box.stream(START, bash("pwd", cwd="/does/not/exist"), pb.StartResponse)
    assert reply.error is not None and "/does/not/exist" in reply.error.message
    assert end_of(box.run("true")).exit_code == 0  # still serving


def test_pause_stops_commands_and_resume_continues(local_server: LocalServer, http: httpx.Client) -> None:
    sandbox = Box(local_server, http)
    try:
        with sandbox.open(
            START, bash("while true; do date +%s%N >> ticks; sleep 0.05; done"), pb.StartResponse
        ) as frames:
            pid = frames.next().message.event.start.pid
        count = lambda: len(process_output(sandbox.run("cat ticks")).splitlines())  # noqa: E731
        wait_for(lambda: count() > 3)
        sandbox.execute("kept = 'across pause'")
        assert http.post(f"/v1/sandboxes/{sandbox.id}/pause").status_code < 300
        ticks = local_server.data_dir / "sandboxes" / sandbox.id / "root" / "home" / "user" / "ticks"
        paused_at = len(ticks.read_text().splitlines())
        time.sleep(0.6)
        assert len(ticks.read_text().splitlines()) == paused_at  # stopped, not killed
        assert http.post(f"/v1/sandboxes/{sandbox.id}/connect", json={"timeout": 300}).status_code < 300
        wait_for(lambda: count() > paused_at + 3)
        assert results_of(sandbox.execute("kept"))[0].text == "'across pause'"  # the kernel was stopped, not lost
        kill(sandbox, pid)
    finally:
        sandbox.kill()
