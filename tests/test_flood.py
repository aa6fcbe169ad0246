"""Floods through every door, on a scalebox-local of this module's own: nothing lost, every cell ends, and the
server's memory stays bounded (by `stream_buffer_mb`, spilling or pausing) whatever the client does.

Doors: `Sandbox.run_code`, the Scalebox kernel driven by jupyter_client, and `%%scalebox` in IPython. Memory is
the server process's own (`/proc/<pid>/status`): VmHWM for the peak of one print, VmRSS for a client that never
reads.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_support import EXECUTE, START, Box, process_output, wait_for
from client_support import config_for
from conftest import LocalServer
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from kernel_support import KernelRun, environ, scalebox_kernels, text_of

from scalebox_kernel.client import Sandbox
from scalebox_kernel.protocol import pb

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
LINES = 20_000
FLUSHED_LINES = f"for i in range({LINES}): print(i, flush=True)"
UNFLUSHED_MIB = "for i in range(200): print(str(i % 10) * (2**20 - 1))"  # 200 prints of 1 MiB, one flush
NUMBERS = "".join(f"{i}\n" for i in range(LINES))
#: What a client that never reads may cost the server while 300 MiB of output goes by (the stream's buffer is
#: `stream_buffer_mb`, 4 MiB, plus a frame or two on the way to the socket and the allocator's slack).
NEVER_READ_BOUND = 64 * MiB


def mib_output() -> str:
    return "".join(str(i % 10) * (2**20 - 1) + "\n" for i in range(200))


def status_bytes(pid: int, field: str) -> int:
    """VmRSS or VmHWM of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for pid {pid}")


def deleted_files_under(pid: int, directory: Path) -> list[str]:
    """Files (a spill file, say) the process holds open below `directory` that have no name any more."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(directory)) and target.endswith("(deleted)"):
            found.append(target)
    return found


@pytest.fixture(scope="module")
def server(server_factory) -> LocalServer:  # type: ignore[no-untyped-def]
    """A server for this module only, so that its memory figures are this module's."""
    return server_factory()


@pytest.fixture(scope="module")
def control(server: LocalServer) -> Iterator[httpx.Client]:
    """A control-plane client of this module's server."""
    with server.client() as client:
        client.timeout = httpx.Timeout(60)
        yield client


@pytest.fixture(scope="module")
def sandbox(server: LocalServer) -> Iterator[Sandbox]:
    with Sandbox.create(config=config_for(server, execution_timeout=150)) as box:
        box.run_code("1")  # the kernel is up
        yield box


# --------------------------------------------------------------------------------------------------- run_code


def test_run_code_delivers_every_flushed_line_in_order(sandbox: Sandbox) -> None:
    execution = sandbox.run_code(FLUSHED_LINES)
    assert execution.error is None and execution.logs.stderr == []
    assert "".join(execution.logs.stdout) == NUMBERS


def test_run_code_delivers_one_huge_unflushed_message_in_frames(sandbox: Sandbox) -> None:
    execution = sandbox.run_code(UNFLUSHED_MIB)
    assert execution.error is None and execution.logs.stderr == []
    assert "".join(execution.logs.stdout) == mib_output()
    assert max(len(chunk.encode()) for chunk in execution.logs.stdout) <= MiB  # each event under the client's limit


def test_a_lost_message_and_a_lost_idle_are_reported_and_the_cell_ends(sandbox: Sandbox) -> None:
    """The kernel is made to skip one number (as if ZMQ had dropped a message) and to not send this cell's idle:
    the cell still ends (a kernel_info barrier stands in for the idle) and says what was lost."""
    code = """\
import os
from jupyter_client.session import Session
counter = Session.send.__globals__["_counters"][os.getpid()]
kernel = get_ipython().kernel
publish = kernel._publish_status
def drop_one_idle(status, channel, parent=None):
    if status == "idle" and kernel._publish_status is drop_one_idle:
        kernel._publish_status = publish
        next(counter)
        return None
    return publish(status, channel, parent)
kernel._publish_status = drop_one_idle
print("before", flush=True)
print("after")
"""
    execution = sandbox.run_code(code)
    assert "".join(execution.logs.stdout) == "before\nafter\n"
    assert execution.logs.stderr == ["scalebox-local: 1 output message was lost on the way from the kernel.\n"]
    again = sandbox.run_code("print('next')")
    assert again.logs.stdout == ["next\n"] and again.logs.stderr == []


def test_a_result_too_big_for_one_frame_is_reported(sandbox: Sandbox) -> None:
    bundle = "{'text/plain': 'x' * (40 * 2**20), 'text/html': '<b>b</b>'}"
    code = f"from IPython.display import display\ndisplay({bundle}, raw=True)"
    execution = sandbox.run_code(code)
    assert [result.html for result in execution.results] == ["<b>b</b>"]  # what fits is kept
    assert len(execution.logs.stderr) == 1 and "text (40.0 MiB) left out" in execution.logs.stderr[0]


def test_a_300_mb_print_peaks_under_twice_its_size(server: LocalServer, sandbox: Sandbox) -> None:
    pid = server.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM starts again from the current RSS
    size = 300_000_000
    execution = sandbox.run_code(f"print('y' * {size})")
    assert execution.error is None and sum(len(chunk) for chunk in execution.logs.stdout) == size + 1
    peak = status_bytes(pid, "VmHWM")
    assert peak < 2 * size, f"the server peaked at {peak / MiB:.0f} MiB for a {size / MiB:.0f} MiB print"


# ---------------------------------------------------------------------------------------- clients that never read


def assert_rss_settles(pid: int, at_most: int, timeout: float = 15.0) -> None:
    """The server's RSS comes down to at most `at_most` (freed memory may take a moment to go back)."""
    deadline = time.monotonic() + timeout
    while (rss := status_bytes(pid, "VmRSS")) > at_most and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rss <= at_most, f"the server kept {rss / MiB:.0f} MiB, more than {at_most / MiB:.0f} MiB"


def test_an_execute_stream_never_read_keeps_the_server_small(server: LocalServer, control: httpx.Client) -> None:
    box = Box(server, control)
    try:
        box.execute("1")
        pid = server.process.pid
        before = status_bytes(pid, "VmRSS")
        code = "import pathlib\nfor i in range(300): print('z' * 2**20, flush=True)\npathlib.Path('/tmp/done').touch()"
        with box.open(EXECUTE, pb.ExecuteRequest(code=code), pb.ExecuteResponse):
            # The cell runs to its end although nobody reads: its output goes to the spill file.
            wait_for(lambda: shell_output(box, "test -f /tmp/done && echo yes") == "yes\n", 60)
            grown = status_bytes(pid, "VmRSS") - before
            assert grown < NEVER_READ_BOUND, f"the server grew by {grown / MiB:.0f} MiB for an unread stream"
            assert deleted_files_under(pid, server.data_dir)  # the spill file, open and nameless
        # Closing the stream frees it all (300 MiB went through; allocator slack and queued frames stay under 24)
        assert_rss_settles(pid, before + 24 * MiB)
        wait_for(lambda: not deleted_files_under(pid, server.data_dir))
        messages = box.execute("print('still fine')").messages  # print() writes twice: one or two events
        assert "".join(m.stdout.content for m in messages if m.HasField("stdout")) == "still fine\n"
    finally:
        box.kill()


def test_a_process_stream_never_read_pauses_the_command(server: LocalServer, control: httpx.Client) -> None:
    box = Box(server, control)
    try:
        pid = server.process.pid
        before = status_bytes(pid, "VmRSS")
        command = "for i in $(seq 300); do head -c 1M /dev/zero; echo $i > /tmp/written; done"
        request = pb.StartRequest(process=pb.ProcessConfig(cmd="/bin/bash", args=["-c", command]))
        with box.open(START, request, pb.StartResponse):
            written = stalled(lambda: shell_output(box, "cat /tmp/written 2>/dev/null"))
            # Held back: what the stream's buffer and the sockets hold, not the 300 MiB it would write unread.
            assert int(written or 0) < 100, f"{written} MiB were written although nobody read them"
            grown = status_bytes(pid, "VmRSS") - before
            assert grown < NEVER_READ_BOUND, f"the server grew by {grown / MiB:.0f} MiB for an unread stream"
        # Once the client left, the output is drained and dropped, and the command ends.
        wait_for(lambda: shell_output(box, "cat /tmp/written") == "300\n", 60)
        assert_rss_settles(pid, before + 16 * MiB)
    finally:
        box.kill()


def shell_output(box: Box, command: str) -> str:
    return process_output(box.run(command)).decode()


def stalled(read: Callable[[], str], quiet: float = 2.0, timeout: float = 60.0) -> str:
    """What `read` returns once it has not changed for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    value, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return value
    raise AssertionError(f"still changing after {timeout} s: {value!r}")


# ------------------------------------------------------------------------------------------- the Scalebox kernel


@pytest.fixture(scope="module")
def kernel(server: LocalServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelRun]:
    with scalebox_kernels(server, tmp_path_factory):
        run = KernelRun()
        yield run
        run.shutdown()


def run_reading(kernel: KernelRun, code: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run a cell reading its iopub as it comes (as a frontend does: jupyter_client's own SUB socket drops past
    1000 unread messages), then take its reply."""
    msg_id = kernel.kc.execute(code)
    outputs = kernel.outputs(msg_id, timeout=60)
    return kernel.reply(msg_id, timeout=60), outputs


def test_kernel_delivers_every_flushed_line_and_ends(kernel: KernelRun) -> None:
    reply, outputs = run_reading(kernel, FLUSHED_LINES)
    assert reply["content"]["status"] == "ok"
    assert text_of(outputs) == NUMBERS and text_of(outputs, "stderr") == ""


def test_kernel_delivers_one_huge_unflushed_message(kernel: KernelRun) -> None:
    reply, outputs = run_reading(kernel, UNFLUSHED_MIB)
    assert reply["content"]["status"] == "ok"
    assert text_of(outputs) == mib_output() and text_of(outputs, "stderr") == ""


# -------------------------------------------------------------------------------------------------- %%scalebox


@pytest.fixture(scope="module")
def shell(server: LocalServer) -> Iterator[InteractiveShell]:
    with environ(server.env()):
        ip = InteractiveShell.instance()
        ip.run_line_magic("load_ext", "scalebox_kernel")
        yield ip
        ip.magics_manager.registry["ScaleboxMagics"].at_exit()
        ip.run_line_magic("unload_ext", "scalebox_kernel")


def test_magic_delivers_every_flushed_line(shell: InteractiveShell) -> None:
    with capture_output() as captured:
        result = shell.run_cell(f"%%scalebox\n{FLUSHED_LINES}")
    assert result.success, result.error_in_exec
    assert captured.stdout == NUMBERS and not re.search("lost|scalebox-local", captured.stderr)
