"""The async client (`AsyncSandbox`) against a real scalebox-local: streaming, cancellation, commands, codecs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from client_support import SLOW_PRINT, config_for

from scalebox_kernel.client import AsyncSandbox, CommandHandle, CommandResult, OutputMessage
from scalebox_kernel.errors import CommandExitError, ExecutionTimeout, NotFound

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sandbox(local_server: Any) -> AsyncIterator[AsyncSandbox]:
    """One sandbox over plain HTTP for the module; a short request timeout proves streams do not depend on it."""
    async with await AsyncSandbox.create(config=config_for(local_server, request_timeout=5)) as sbx:
        yield sbx


async def test_run_code_streams_with_async_callbacks(sandbox: AsyncSandbox) -> None:
    seen: list[tuple[float, OutputMessage]] = []

    async def on_stdout(message: OutputMessage) -> None:
        await asyncio.sleep(0)
        seen.append((time.monotonic(), message))

    execution = await sandbox.run_code(SLOW_PRINT + "21 * 2", on_stdout=on_stdout)
    ended = time.monotonic()
    assert execution.text == "42"
    assert [m.line for _, m in seen] == ["first\n", "second\n"]
    assert seen[0][0] < ended - 1.0


async def test_stderr_callback_and_envs(sandbox: AsyncSandbox) -> None:
    errors: list[OutputMessage] = []
    execution = await sandbox.run_code(
        "import os, sys\nprint(os.environ.get('ONLY_HERE'), file=sys.stderr)",
        envs={"ONLY_HERE": "yes"},
        on_stderr=errors.append,
    )
    assert execution.logs.stderr == ["yes\n"]
    assert [m.line for m in errors] == ["yes\n"] and errors[0].error


async def test_timeout_interrupts_the_cell_and_keeps_state(sandbox: AsyncSandbox) -> None:
    await sandbox.run_code("progress = 'set'")
    started = time.monotonic()
    with pytest.raises(ExecutionTimeout):
        await sandbox.run_code("import time\ntime.sleep(60)", timeout=1.5)
    assert time.monotonic() - started < 10
    assert (await sandbox.run_code("progress")).text == "'set'"


async def test_cancelling_run_code_interrupts_the_kernel(sandbox: AsyncSandbox) -> None:
    first = asyncio.Event()
    task = asyncio.create_task(
        sandbox.run_code("import time\nprint('go', flush=True)\ntime.sleep(60)", on_stdout=lambda m: first.set())
    )
    await asyncio.wait_for(first.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    started = time.monotonic()
    assert (await sandbox.run_code("'free'")).text == "'free'"
    assert time.monotonic() - started < 15, "the kernel was still busy with the cancelled cell"


async def test_context_in_another_cwd(sandbox: AsyncSandbox) -> None:
    context = await sandbox.create_code_context("python", cwd="/workspace")
    try:
        assert ((await sandbox.run_code("import os; os.getcwd()", context=context)).text or "").endswith("/workspace'")
        # a context wins over a language: the language is not even sent
        assert (await sandbox.run_code("1", context=context, language="python")).text == "1"
    finally:
        await sandbox.destroy_context(context)


async def test_commands_callbacks_and_result(sandbox: AsyncSandbox) -> None:
    out: list[str] = []
    err: list[str] = []
    result = await sandbox.commands.run(
        "for i in 1 2 3; do echo line$i; done; echo oops >&2",
        on_stdout=lambda m: out.append(m.line),
        on_stderr=lambda m: err.append(m.line),
    )
    assert isinstance(result, CommandResult)
    assert result.stdout == "line1\nline2\nline3\n" and "".join(out) == result.stdout
    assert "".join(err) == "oops\n" == result.stderr


async def test_background_wait_connect_and_list(sandbox: AsyncSandbox) -> None:
    handle = await sandbox.commands.run("sleep 1; echo finished", background=True)
    assert isinstance(handle, CommandHandle)
    assert handle.pid in [p.pid for p in await sandbox.commands.list()]
    follower = await sandbox.commands.connect(handle.pid)
    result, followed = await asyncio.gather(handle.wait(), follower.wait())
    assert result.stdout == "finished\n" and result.exit_code == 0
    assert followed.exit_code == 0


async def test_background_disconnect_leaves_the_process_running(sandbox: AsyncSandbox) -> None:
    handle = await sandbox.commands.run("sleep 30", background=True)
    assert isinstance(handle, CommandHandle)
    await handle.disconnect()
    assert handle.pid in [p.pid for p in await sandbox.commands.list()]
    assert await handle.kill()


async def test_foreground_timeout_kills_the_command(sandbox: AsyncSandbox) -> None:
    started = time.monotonic()
    with pytest.raises(ExecutionTimeout):
        await sandbox.commands.run("echo $$ > timed.pid; sleep 60", timeout=1.5)
    assert time.monotonic() - started < 10
    pid = int((await sandbox.files.read("timed.pid")).strip())
    assert pid not in [p.pid for p in await sandbox.commands.list()]


async def test_long_quiet_command_outlives_the_request_timeout(sandbox: AsyncSandbox) -> None:
    """11 s of silence: longer than request_timeout (5 s) and than the agent's keepalive interval (10 s)."""
    result = await sandbox.commands.run("sleep 11; echo awake", timeout=60)
    assert isinstance(result, CommandResult) and result.stdout == "awake\n"


async def test_nonzero_exit_from_background_wait(sandbox: AsyncSandbox) -> None:
    handle = await sandbox.commands.run("exit 5", background=True)
    assert isinstance(handle, CommandHandle)
    with pytest.raises(CommandExitError) as caught:
        await handle.wait()
    assert caught.value.exit_code == 5


async def test_watch_dir_with_async_callback(sandbox: AsyncSandbox) -> None:
    await sandbox.files.make_dir("/tmp/awatch")
    arrived = asyncio.Event()
    names: list[str] = []

    async def on_event(event: Any) -> None:
        names.append(event.name)
        if event.name == "f.txt":
            arrived.set()

    handle = await sandbox.files.watch_dir("/tmp/awatch", on_event)
    try:
        await sandbox.files.write("/tmp/awatch/f.txt", b"1")
        await asyncio.wait_for(arrived.wait(), 10)
    finally:
        await handle.stop()
    assert "f.txt" in names


async def test_json_codec(local_server: Any, sandbox: AsyncSandbox) -> None:
    """The same calls in the Connect JSON codec (what the JS SDK speaks)."""
    other = await AsyncSandbox.connect(sandbox.sandbox_id, config=config_for(local_server), codec="json")
    try:
        execution = await other.run_code("print('via json')\n{'a': 1}")
        assert execution.logs.stdout == ["via json\n"]
        assert execution.text == "{'a': 1}"
        await other.files.write("/tmp/json-codec.txt", "j")
        assert "json-codec.txt" in [e.name for e in await other.files.list("/tmp")]
        assert not await other.files.exists("/tmp/json-codec-missing")
        result = await other.commands.run("echo json")
        assert isinstance(result, CommandResult) and result.stdout == "json\n"
        with pytest.raises(NotFound):
            await other.files.get_info("/tmp/json-codec-missing")
    finally:
        await other.close()


async def test_https_async(local_server_tls: Any) -> None:
    async with await AsyncSandbox.create(config=config_for(local_server_tls)) as sbx:
        assert sbx.agent_url.startswith("https://")
        assert (await sbx.run_code("'tls'")).text == "'tls'"
        await sbx.files.write("/tmp/t.bin", b"\x00\x01")
        assert await sbx.files.read("/tmp/t.bin", format="bytes") == b"\x00\x01"
        assert await sbx.is_running()
