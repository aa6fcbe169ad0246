"""The sync client (`Sandbox`) against a real scalebox-local, over HTTP and HTTPS."""

from __future__ import annotations

import asyncio
import base64
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from client_support import PLOT, SLOW_PRINT, access_token, assert_no_secret, config_for

from scalebox_kernel.client import (
    CommandResult,
    Context,
    EntryInfo,
    Execution,
    FileType,
    OutputMessage,
    Result,
    Sandbox,
    SyncCommandHandle,
)
from scalebox_kernel.errors import CommandExitError, NotFound, SandboxNotFound, SandboxPaused


@pytest.fixture(scope="module", params=["http", "https"])
def sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """One sandbox per transport for the whole module (HTTPS verifies the server's own certificate)."""
    server = request.getfixturevalue("local_server" if request.param == "http" else "local_server_tls")
    sbx = Sandbox.create(config=config_for(server), metadata={"suite": "test_client", "scheme": request.param})
    yield sbx
    sbx.kill()
    sbx.close()


@pytest.fixture(scope="module")
def https_sandbox(local_server_tls: Any) -> Iterator[Sandbox]:
    with Sandbox.create(config=config_for(local_server_tls)) as sbx:
        yield sbx


def test_create_gives_a_usable_sandbox(sandbox: Sandbox) -> None:
    assert sandbox.sandbox_id and sandbox.sandbox_domain
    assert sandbox.is_running()
    info = sandbox.get_info()
    assert info.sandbox_id == sandbox.sandbox_id
    assert info.state == "running"
    assert info.metadata["suite"] == "test_client"
    text = repr(sandbox)
    assert sandbox.sandbox_id in text
    assert_no_secret(text, sandbox.config.api_key, access_token(sandbox))


def test_run_code_print_and_expression(sandbox: Sandbox) -> None:
    execution = sandbox.run_code("print('hello')\n1 + 1")
    assert isinstance(execution, Execution)
    assert execution.logs.stdout == ["hello\n"]
    assert execution.text == "2"
    assert execution.error is None
    main = execution.results[0]
    assert main.is_main_result and main.execution_count == execution.execution_count
    assert main.formats() == ["text"]
    assert main.to_bundle() == {"text/plain": "2"}


def test_state_is_kept_between_cells(sandbox: Sandbox) -> None:
    sandbox.run_code("kept = 41")
    assert sandbox.run_code("kept + 1").text == "42"


def test_plot_gives_png(https_sandbox: Sandbox) -> None:
    execution = https_sandbox.run_code(PLOT)
    assert execution.error is None, execution.error
    images = [r for r in execution.results if r.png]
    assert images, execution.results
    png = base64.b64decode(images[0].png or "")
    assert png.startswith(b"\x89PNG")
    assert "image/png" in images[0].to_bundle()


def test_html_and_markdown_results(https_sandbox: Sandbox) -> None:
    execution = https_sandbox.run_code(
        "from IPython.display import HTML, Markdown, display\ndisplay(Markdown('# hi'))\nHTML('<b>bold</b>')"
    )
    markdown, html = execution.results
    assert markdown.markdown == "# hi" and not markdown.is_main_result
    assert html.html == "<b>bold</b>" and html.is_main_result
    assert html._repr_mimebundle_(include=["text/html"]) == {"text/html": "<b>bold</b>"}
    assert "html" in html.formats()


def test_error_is_reported_not_raised(sandbox: Sandbox) -> None:
    errors: list[Any] = []
    execution = sandbox.run_code("print('before')\n1 / 0", on_error=errors.append)
    assert execution.error is not None
    assert execution.error.name == "ZeroDivisionError"
    assert "division by zero" in execution.error.value
    assert "ZeroDivisionError" in execution.error.traceback
    assert errors == [execution.error]
    assert execution.logs.stdout == ["before\n"]


def test_callbacks_arrive_while_the_cell_runs(https_sandbox: Sandbox) -> None:
    seen: list[tuple[float, OutputMessage]] = []
    results: list[Result] = []
    execution = https_sandbox.run_code(
        SLOW_PRINT + "'done'", on_stdout=lambda m: seen.append((time.monotonic(), m)), on_result=results.append
    )
    ended = time.monotonic()
    assert [m.line for _, m in seen] == ["first\n", "second\n"]
    assert seen[0][0] < ended - 1.0, "the first line came only when the cell ended"
    assert not seen[0][1].error and seen[0][1].timestamp > 0
    assert results == execution.results and execution.text == "'done'"


def test_contexts_keep_separate_state(https_sandbox: Sandbox) -> None:
    context = https_sandbox.create_code_context(cwd="/tmp")
    assert isinstance(context, Context) and context.id and context.language.startswith("python")
    https_sandbox.run_code("only_here = 7", context=context)
    assert https_sandbox.run_code("only_here", context=context.id).text == "7"
    missing = https_sandbox.run_code("only_here")
    assert missing.error is not None and missing.error.name == "NameError"
    assert (https_sandbox.run_code("import os; os.getcwd()", context=context).text or "").endswith("/tmp'")
    https_sandbox.destroy_context(context)
    with pytest.raises(NotFound):
        https_sandbox.run_code("1", context=context)


def test_files_roundtrip(sandbox: Sandbox) -> None:
    entry = sandbox.files.write("/tmp/data/hello.txt", "héllo\n")
    assert entry is None or entry.path == "/tmp/data/hello.txt"
    assert sandbox.files.read("/tmp/data/hello.txt") == "héllo\n"
    blob = bytes(range(256))
    sandbox.files.write("/tmp/data/blob.bin", blob)
    assert sandbox.files.read("/tmp/data/blob.bin", format="bytes") == blob
    names = {e.name: e for e in sandbox.files.list("/tmp/data")}
    assert set(names) == {"hello.txt", "blob.bin"}
    assert names["blob.bin"].type == FileType.FILE and names["blob.bin"].size == 256
    assert sandbox.files.exists("/tmp/data/blob.bin")
    assert not sandbox.files.exists("/tmp/data/nope")
    # the kernel (whose cwd is /home/user) and commands see the same files
    sandbox.files.write("shared/seen.txt", "from the file API")
    assert sandbox.files.read("/home/user/shared/seen.txt") == "from the file API"
    assert sandbox.run_code("open('shared/seen.txt').read()").text == "'from the file API'"
    sandbox.commands.run("echo from a command > shared/made.txt")
    assert sandbox.files.read("shared/made.txt") == "from a command\n"


def test_file_management(https_sandbox: Sandbox) -> None:
    files = https_sandbox.files
    assert files.make_dir("/tmp/managed/sub")
    assert not files.make_dir("/tmp/managed/sub")
    files.write("/tmp/managed/a.txt", "a")
    moved = files.move("/tmp/managed/a.txt", "/tmp/managed/sub/b.txt")
    assert isinstance(moved, EntryInfo) and moved.path == "/tmp/managed/sub/b.txt"
    assert not files.exists("/tmp/managed/a.txt")
    info = files.get_info("/tmp/managed/sub")
    assert info.type == FileType.DIR and info.name == "sub"
    deep = {e.path for e in files.list("/tmp/managed", depth=2)}
    assert deep == {"/tmp/managed/sub", "/tmp/managed/sub/b.txt"}
    files.remove("/tmp/managed")
    assert not files.exists("/tmp/managed")
    with pytest.raises(NotFound):
        files.read("/tmp/managed/sub/b.txt")


def test_watch_dir_reports_changes(https_sandbox: Sandbox) -> None:
    https_sandbox.files.make_dir("/tmp/watched")
    events: list[Any] = []
    handle = https_sandbox.files.watch_dir("/tmp/watched", events.append)
    try:
        https_sandbox.files.write("/tmp/watched/new.txt", "x")
        deadline = time.monotonic() + 10
        while not any(e.name == "new.txt" for e in events) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        handle.stop()
    assert any(e.name == "new.txt" and e.type in ("create", "write") for e in events), events
    assert handle.error is None


def test_commands_foreground(sandbox: Sandbox) -> None:
    lines: list[str] = []
    result = sandbox.commands.run(
        "echo out; echo err >&2; echo $GREETING; pwd",
        envs={"GREETING": "hi"},
        cwd="/tmp",
        on_stdout=lambda m: lines.append(m.line),
    )
    assert isinstance(result, CommandResult)
    assert result.exit_code == 0
    out, greeting, cwd = result.stdout.splitlines()
    assert (out, greeting) == ("out", "hi")
    assert cwd.endswith("/tmp")  # the sandbox's /tmp (a host directory until issue 6 isolates processes)
    assert result.stderr == "err\n"
    assert "".join(lines) == result.stdout


def test_command_nonzero_exit_raises(https_sandbox: Sandbox) -> None:
    with pytest.raises(CommandExitError) as caught:
        https_sandbox.commands.run("echo partial; echo broken >&2; exit 3")
    assert caught.value.exit_code == 3
    assert caught.value.stdout == "partial\n"
    assert "broken" in caught.value.stderr and "broken" in str(caught.value)


def test_background_command_and_kill(https_sandbox: Sandbox) -> None:
    handle = https_sandbox.commands.run("echo started; sleep 60", background=True)
    assert isinstance(handle, SyncCommandHandle) and handle.pid > 0
    deadline = time.monotonic() + 10
    while "started" not in handle.stdout and time.monotonic() < deadline:
        time.sleep(0.05)
    assert handle.stdout == "started\n"
    assert handle.pid in [p.pid for p in https_sandbox.commands.list()]
    assert handle.kill()
    with pytest.raises(CommandExitError):
        handle.wait()
    assert not https_sandbox.commands.kill(handle.pid)


def test_stdin(https_sandbox: Sandbox) -> None:
    handle = https_sandbox.commands.run("head -n 1", background=True, stdin=True)
    assert isinstance(handle, SyncCommandHandle)
    https_sandbox.commands.send_stdin(handle.pid, "typed line\n")
    assert handle.wait().stdout == "typed line\n"


def test_sync_api_works_inside_a_running_event_loop(https_sandbox: Sandbox) -> None:
    async def cell() -> str | None:
        return https_sandbox.run_code("6 * 7").text  # as from an ipykernel cell, whose loop is running

    assert asyncio.run(cell()) == "42"


def test_keyboard_interrupt_interrupts_the_cell(https_sandbox: Sandbox) -> None:
    """Ctrl-C while waiting cancels the call, which drops the stream, which interrupts the kernel."""
    https_sandbox.run_code("marker = 'unset'")  # the kernel is up before the clock starts
    main = threading.main_thread().ident
    assert main is not None
    timer = threading.Timer(1.5, signal.pthread_kill, args=(main, signal.SIGINT))
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            https_sandbox.run_code("import time\nmarker = 'before'\ntime.sleep(60)\nmarker = 'after'")
    finally:
        timer.cancel()
    assert time.monotonic() - started < 15
    # The kernel is free again (not still sleeping), and its state survived the interrupt.
    quick = time.monotonic()
    assert https_sandbox.run_code("marker").text == "'before'"
    assert time.monotonic() - quick < 15


def test_lifecycle_timeout_list_pause_resume_kill(local_server_tls: Any) -> None:
    config = config_for(local_server_tls)
    sbx = Sandbox.create(config=config, timeout=600, metadata={"suite": "lifecycle", "n": "1"})
    try:
        sbx.run_code("survivor = 'still here'")
        sbx.files.write("/tmp/kept.txt", "kept")
        sbx.set_timeout(120)
        end_at = sbx.get_info().end_at
        assert end_at is not None and 100 < (end_at - datetime.now(UTC)).total_seconds() <= 125
        listed = Sandbox.list(config=config, metadata={"suite": "lifecycle"})
        assert [i.sandbox_id for i in listed] == [sbx.sandbox_id]
        assert Sandbox.list(config=config, metadata={"suite": "nothing-like-this"}) == []

        sbx.pause()
        sbx.pause()  # already paused is fine
        assert sbx.get_info().state == "paused"
        with pytest.raises(SandboxPaused):
            sbx.run_code("1")
        assert sbx.sandbox_id in [i.sandbox_id for i in Sandbox.list(config=config, state=["paused"])]

        again = Sandbox.connect(sbx.sandbox_id, config=config)
        assert again.get_info().state == "running"
        assert again.files.read("/tmp/kept.txt") == "kept"
        assert again.run_code("survivor").text == "'still here'"
        again.close()
    finally:
        sbx.kill()
    with pytest.raises(SandboxNotFound):
        sbx.get_info()
    with pytest.raises(SandboxNotFound):
        sbx.run_code("1")
    assert not Sandbox.kill_by_id(sbx.sandbox_id, config=config)
    sbx.close()
