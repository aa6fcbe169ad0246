"""The IPython extension against a real scalebox-local: in a real in-process IPython shell, and in a real
ipykernel driven through jupyter_client (output while the cell runs, widgets, interrupt)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import LocalServer
from IPython.core.interactiveshell import InteractiveShell
from kernel_support import CLEAR_AND_UPDATE, KernelRun
from magics_support import magics, ok, run
from test_session import tiny_wheel

from scalebox_kernel.client import Sandbox
from scalebox_kernel.errors import InvalidArgument
from scalebox_kernel.magics import ScaleboxCellError
from scalebox_kernel.session import Session


@pytest.fixture(scope="module")
def server_env(local_server: LocalServer) -> Iterator[LocalServer]:
    saved = dict(os.environ)
    os.environ.update(local_server.env())
    yield local_server
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def shell(server_env: LocalServer) -> Iterator[InteractiveShell]:
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "scalebox_kernel")
    yield ip
    magics().at_exit()
    ip.run_line_magic("unload_ext", "scalebox_kernel")


def sandbox_id(name: str = "default") -> str:
    session = magics().sessions.named[name].session
    assert session is not None
    return session.session_id


# ---------------------------------------------------------------------------------------------- in-process shell


def test_cell_output_results_plots_html_and_errors(shell: InteractiveShell) -> None:
    result, captured = run(
        shell, "%%scalebox\nprint('hello from the sandbox')\nimport sys; print('oops', file=sys.stderr)\n6 * 7"
    )
    assert result.success and captured.stdout.startswith("hello from the sandbox\n")
    assert "oops" in captured.stderr
    assert result.result is not None and result.result.text == "42"  # the main result is the cell's value
    plot = ok(shell, "%%scalebox\nimport matplotlib.pyplot as plt\nplt.plot([1, 3, 2]); plt.show()")
    assert any("image/png" in out.data for out in plot.outputs)
    page = ok(shell, "%%scalebox\nfrom IPython.display import HTML, display\ndisplay(HTML('<b>bold</b>'))")
    assert [out.data["text/html"] for out in page.outputs] == ["<b>bold</b>"]
    result, captured = run(shell, "%%scalebox\nkept = 'yes'\n1 / 0")
    assert isinstance(result.error_in_exec, ScaleboxCellError)
    assert type(result.error_in_exec).__name__ == "ZeroDivisionError"
    assert "ZeroDivisionError" in captured.stdout and "division by zero" in captured.stdout
    assert "interactiveshell.py" not in captured.stdout  # the remote traceback only, no local frames
    assert ok(shell, "%%scalebox\nprint(kept)").stdout == "yes\n"  # what ran before the error stays
    result, captured = run(shell, "%%scalebox --timeout 1\nimport time\nprint('started', flush=True)\ntime.sleep(60)")
    assert type(result.error_in_exec).__name__ == "ExecutionTimeout" and "started" in captured.stdout
    assert "longer than 1 s" in captured.stdout
    assert ok(shell, "%%scalebox\nprint(kept)").stdout == "yes\n"


def test_inputs_and_outputs_round_trip(shell: InteractiveShell) -> None:
    ok(shell, "import pandas as pd\nframe = pd.DataFrame({'a': [1, 2, 3], 'b': list('xyz')})")
    ok(shell, "number, d = 7, {'k': [1]}")
    cell = "frame2 = frame.assign(c=frame.a * 2)\nnumber2 = number * 6\nd2 = {**d, 'z': None}"
    ok(shell, f"%%scalebox -i frame number d -o frame2 number2 d2\n{cell}")
    ns = shell.user_ns
    assert ns["number2"] == 42 and ns["d2"] == {"k": [1], "z": None}
    assert list(ns["frame2"].columns) == ["a", "b", "c"] and ns["frame2"]["c"].tolist() == [2, 4, 6]
    # Too large is a clear error with the size, and nothing is sent.
    magics().max_transfer_mb = 0.01
    try:
        ok(shell, "big = b'x' * 100_000")
        result, captured = run(shell, "%%scalebox -i big\nprint('must not run')")
        assert not result.success and "must not run" not in captured.stdout
        assert "big is 0.1 MB" in captured.stdout and "0.01 MB" in captured.stdout
    finally:
        magics().max_transfer_mb = 50.0
    result, captured = run(shell, "%%scalebox -i not_defined_here\n1")
    assert not result.success and "not_defined_here" in captured.stderr
    result, captured = run(shell, "%%scalebox -o never_set\nx = 1")
    assert not result.success and "never_set" in captured.stdout and "NameError" in captured.stdout


def test_help_of_the_magic_and_of_a_subcommand(shell: InteractiveShell) -> None:
    assert "%scalebox new [NAME]" in ok(shell, "%scalebox --help").stdout
    before = ok(shell, "%scalebox list").stdout
    shown = ok(shell, "%scalebox new helped --help").stdout
    assert "usage: %scalebox new" in shown and "--language" in shown and "--timeout" in shown
    assert ok(shell, "%scalebox list").stdout == before  # nothing was started


def test_file_commands_share_one_rule_and_folders_go_both_ways(shell: InteractiveShell, tmp_path: Path) -> None:
    """Relative paths are from /workspace (where cells run) for ls, upload and download alike; a trailing / means
    "into this folder"; a folder downloads whole."""
    ok(
        shell,
        "%%scalebox\nimport os\nos.makedirs('d/sub', exist_ok=True)\nopen('d/a.txt', 'w').write('A')\n"
        "open('d/sub/b.txt', 'w').write('B')",
    )
    listed = ok(shell, "%scalebox ls d").stdout
    assert "a.txt" in listed and "sub/" in listed
    ok(shell, f"%scalebox download d/a.txt {tmp_path}/into/")
    assert (tmp_path / "into" / "a.txt").read_text() == "A"
    ok(shell, f"%scalebox download d {tmp_path}/copy")
    assert (tmp_path / "copy" / "a.txt").read_text() == "A" and (tmp_path / "copy" / "sub" / "b.txt").read_text() == "B"
    ok(shell, f"%scalebox download d {tmp_path}/copy/")  # into the existing folder: copy/d/...
    assert (tmp_path / "copy" / "d" / "sub" / "b.txt").read_text() == "B"
    ok(shell, f"%scalebox upload {tmp_path}/copy/sub/b.txt up/")
    assert ok(shell, "%%scalebox\nprint(open('up/b.txt').read())").stdout == "B\n"
    assert "b.txt" in ok(shell, "%scalebox ls up").stdout


def test_a_sessions_sandbox_is_set_up_before_it_starts(shell: InteractiveShell) -> None:
    made = ok(shell, "%scalebox new sized --cpu 1 --memory 512 --no-internet --env GREETING=hi --timeout 2m").stdout
    assert "Session sized: sandbox" in made
    assert ok(shell, "%%scalebox --session sized\nimport os\nprint(os.environ['GREETING'])").stdout == "hi\n"
    info = Sandbox.get_info(sandbox_id("sized"))
    assert (info.cpu_count, info.memory_mb, info.timeout) == (1, 512, 120), info
    ok(shell, "%scalebox close sized")
    with Sandbox.create(cpu_count=1, memory_mb=256) as sandbox:  # the same settings on the client
        assert (sandbox.get_info().cpu_count, sandbox.get_info().memory_mb) == (1, 256)
    with pytest.raises(InvalidArgument, match="cpu_count"):
        Sandbox.create(cpu_count=0)


def test_big_transfers_and_installs_show_what_happens(
    shell: InteractiveShell, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scalebox_kernel.session import _sandbox

    monkeypatch.setattr(_sandbox, "PROGRESS_EVERY", 0.02)  # loopback is fast: look often
    monkeypatch.setattr(magics(), "progress_delay", 0.0)  # and show the bar at once
    big = tmp_path / "big.bin"
    big.write_bytes(b"y" * (96 * 1024 * 1024))
    up = ok(shell, f"%scalebox upload {big} big.bin")
    assert "MiB of 96.0 MiB" in up.stderr and "/s)" in up.stderr, up.stderr[-500:]
    down = ok(shell, f"%scalebox download big.bin {tmp_path}/back/")
    assert (tmp_path / "back" / "big.bin").stat().st_size == 96 * 1024 * 1024
    assert "Downloading /workspace/big.bin:" in down.stderr and "/s)" in down.stderr, down.stderr[-500:]
    ok(shell, "%%scalebox\nimport os\nos.remove('big.bin')")


def test_a_failing_r_install_fails_in_the_magic(shell: InteractiveShell) -> None:
    from language_support import skip_reason

    why = skip_reason("r")
    if why:
        pytest.skip(why)
    ok(shell, "%scalebox new rsession --language r")
    try:
        failed, captured = run(shell, "%scalebox install no.such.package.scalebox")
        said = captured.stdout + captured.stderr + str(failed.error_in_exec)
        assert not failed.success and "not installed: no.such.package.scalebox" in said, said
        assert "Installed" not in captured.stdout
    finally:
        ok(shell, "%scalebox close rsession")


def test_named_sessions_side_by_side(shell: InteractiveShell) -> None:
    ok(shell, "%%scalebox --session left\nside = 'left'")
    ok(shell, "%%scalebox --session right\nside = 'right'")
    assert ok(shell, "%%scalebox --session left\nprint(side)").stdout == "left\n"
    assert ok(shell, "%%scalebox --session right\nprint(side)").stdout == "right\n"
    assert sandbox_id("left") != sandbox_id("right")
    listing = ok(shell, "%scalebox list").stdout
    assert sandbox_id("left") in listing and sandbox_id("right") in listing
    created = ok(shell, "%scalebox new third").stdout
    assert "Session third: sandbox" in created
    assert ok(shell, "%scalebox list").stdout.count("*") == 1 and "* third" in ok(shell, "%scalebox list").stdout
    result, _ = run(shell, "%%scalebox\nside")  # the current session is third: a sandbox of its own
    assert type(result.error_in_exec).__name__ == "NameError"
    everywhere = ok(shell, "%scalebox list --all").stdout
    assert sandbox_id("left") in everywhere and sandbox_id("third") in everywhere
    # Attach by id to a session someone else made (another notebook, a script).
    elsewhere = str(Session.run("side = 'elsewhere'", keep_alive=True).session_id)
    assert f"sandbox {elsewhere} (attached)" in ok(shell, f"%scalebox use {elsewhere} --as again").stdout
    assert ok(shell, "%%scalebox\nprint(side)").stdout == "elsewhere\n"
    assert "Using session left" in ok(shell, f"%scalebox use {sandbox_id('left')}").stdout
    third = sandbox_id("third")
    assert "closed" in ok(shell, "%scalebox close third").stdout
    assert third not in {info.sandbox_id for info in Sandbox.list()}
    ok(shell, "%scalebox close again --keep")
    assert Session.get(elsewhere).status == "running"  # forgotten here, still alive
    Session.close(elsewhere)
    ok(shell, "%scalebox close right")
    assert "Using session default" in ok(shell, "%scalebox use default").stdout
    # A session that cannot start (no such language) leaves neither a session nor a sandbox behind.
    before = {info.sandbox_id for info in Sandbox.list()}
    failed, captured = run(shell, "%scalebox new doomed --language cobol")
    assert not failed.success and "cobol" in captured.stdout + captured.stderr + str(failed.error_in_exec)
    assert "doomed" not in ok(shell, "%scalebox list").stdout
    assert {info.sandbox_id for info in Sandbox.list()} <= before


def test_pause_resume_timeout_info_and_status(shell: InteractiveShell) -> None:
    ok(shell, "%%scalebox\ncounter = 41")
    assert "paused" in ok(shell, "%scalebox pause").stdout
    info = ok(shell, "%scalebox info").stdout
    assert "state: paused" in info
    assert "running" in ok(shell, "%scalebox resume").stdout
    assert ok(shell, "%%scalebox\ncounter += 1; print(counter)").stdout == "42\n"
    ok(shell, "%scalebox pause")
    assert ok(shell, "%%scalebox\nprint(counter)").stdout == "42\n"  # a cell resumes a paused sandbox
    before = datetime.now(UTC)
    assert "more" in ok(shell, "%scalebox timeout 2h").stdout
    info = ok(shell, "%scalebox info").stdout
    assert "timeout: 7200 s" in info and ("time left: 1h 59m" in info or "time left: 2h 00m" in info)
    ends = Sandbox.connect(sandbox_id()).get_info().end_at
    assert ends is not None and (ends - before).total_seconds() > 7000
    status = ok(shell, "%scalebox status").stdout  # no kernel here: the text fallback
    assert sandbox_id() in status and "state: running" in status and "time left" in status
    assert "kept at exit: no" in status
    assert "will be kept when this shell exits" in ok(shell, "%scalebox keep").stdout
    assert "kept at exit: yes" in ok(shell, "%scalebox info").stdout
    assert "will be killed" in ok(shell, "%scalebox keep off").stdout
    assert "fresh python context" in ok(shell, "%scalebox restart").stdout
    assert ok(shell, "%%scalebox\nprint('counter' in globals())").stdout == "False\n"
    result, captured = run(shell, "%scalebox timeout soon")
    assert not result.success and "not a duration" in captured.stderr


def test_files_packages_env_and_commands(shell: InteractiveShell, tmp_path: Path) -> None:
    name, wheel = tiny_wheel("magicpkg")
    (tmp_path / name).write_bytes(wheel)
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha")
    (folder / "sub" / "b.txt").write_text("beta")
    quick = ok(shell, f"%scalebox upload {tmp_path / name}")
    assert "Uploaded 1 file(s)" in quick.stdout and quick.stderr == ""  # too quick for a progress bar
    assert "1 unchanged" in ok(shell, f"%scalebox upload {tmp_path / name}").stdout
    assert "Uploaded 2 file(s)" in ok(shell, f"%scalebox upload {folder} inputs").stdout
    listing = ok(shell, "%scalebox ls /workspace/inputs").stdout
    assert "a.txt" in listing and "sub/" in listing
    assert name in ok(shell, "%scalebox ls").stdout
    assert ok(shell, "%%scalebox\nprint(open('inputs/sub/b.txt').read())").stdout == "beta\n"
    magics().progress_delay = 0  # show the bar at once, to see it drawn and removed
    try:
        installing = ok(shell, f"%scalebox pip install ./{name}")
    finally:
        magics().progress_delay = 0.5
    assert "Installed" in installing.stdout
    assert "\rInstalling" in installing.stderr and installing.stderr.endswith("\r")  # drawn, then wiped
    # The bar follows pip's own lines (not one frozen "Installing…"), and says what pip installed.
    assert "Successfully installed magicpkg-0.1" in installing.stderr + installing.stdout, installing.stderr
    assert len({line for line in installing.stderr.split("\r") if line.strip()}) >= 3, installing.stderr
    assert "Already installed" in ok(shell, f"%scalebox install ./{name}").stdout
    assert ok(shell, "%%scalebox\nimport magicpkg; print(magicpkg.VALUE)").stdout == "hello from magicpkg 0.1\n"
    ok(shell, "%%scalebox\nopen('result.csv', 'w').write('x,y\\n1,2\\n')")
    target = tmp_path / "result.csv"
    assert "Downloaded" in ok(shell, f"%scalebox download result.csv {target}").stdout
    assert target.read_text() == "x,y\n1,2\n"
    ok(shell, "%scalebox env GREETING=hi TOKEN=secret")
    assert "GREETING=hi" in ok(shell, "%scalebox env").stdout
    assert (
        ok(shell, "%%scalebox --env EXTRA=1\nimport os; print(os.environ['GREETING'], os.environ['EXTRA'])").stdout
        == "hi 1\n"
    )
    assert (
        ok(shell, "%scalebox run echo $GREETING from $(pwd | xargs basename) && echo two").stdout
        == "hi from workspace\ntwo\n"
    )
    ok(shell, "%scalebox env --unset TOKEN")
    assert "TOKEN" not in ok(shell, "%scalebox env").stdout
    result, captured = run(shell, "%scalebox run echo partial; exit 3")
    assert not result.success and "partial" in captured.stdout and "code 3" in captured.stdout
    result, captured = run(shell, "%scalebox download /workspace/nope.txt")
    assert not result.success and "nope.txt" in captured.stdout


def test_autoscalebox_routes_cells_until_off(shell: InteractiveShell) -> None:
    ok(shell, "%autoscalebox on")
    try:
        assert ok(shell, "routed = 'remote'\nprint(routed)").stdout == "remote\n"
        assert "sandbox" in ok(shell, "%scalebox info").stdout  # magic lines still run here
    finally:
        assert "locally" in ok(shell, "%autoscalebox off").stdout
    assert "routed" not in shell.user_ns
    assert ok(shell, "%%scalebox\nprint(routed)").stdout == "remote\n"
    result, _ = run(shell, "%autoscalebox sideways")
    assert not result.success


def test_help_usage_errors_and_secrets(shell: InteractiveShell, server_env: LocalServer) -> None:
    text = ok(shell, "%scalebox help").stdout
    for sub in ("new", "use", "list", "info", "close", "keep", "pause", "resume", "timeout", "restart", "upload", "ls"):
        assert f"%scalebox {sub}" in text
    for sub in ("download", "pip install", "env", "run", "status", "help", "%autoscalebox", "%%scalebox"):
        assert sub in text
    result, captured = run(shell, "%scalebox frobnicate")
    assert not result.success and "unknown subcommand" in captured.stderr
    result, captured = run(shell, "%%scalebox --no-such-flag\n1")
    assert not result.success and "usage" in captured.stderr
    result, captured = run(shell, "%scalebox use sbx-0000000000000000")
    assert not result.success and "sbx-0000000000000000" in captured.stdout
    assert server_env.api_key not in captured.stdout + captured.stderr


def test_expired_sandbox_is_announced_and_replaced(shell: InteractiveShell) -> None:
    ok(shell, "%%scalebox --session doomed\nlost = 1")
    old = sandbox_id("doomed")
    assert Sandbox.kill_by_id(old)
    result, captured = run(shell, "%%scalebox --session doomed\nprint('fresh start')")
    assert result.success and "fresh start" in captured.stdout
    assert old in captured.stderr and "gone" in captured.stderr
    assert sandbox_id("doomed") != old
    ok(shell, "%scalebox close doomed")


def test_interrupt_in_process_keeps_state(shell: InteractiveShell) -> None:
    ok(shell, "%%scalebox\nsurvivor = 'still here'")
    timer = threading.Timer(1.5, lambda: os.kill(os.getpid(), 2))
    timer.start()
    started = time.monotonic()
    result, _ = run(shell, "%%scalebox\nwhile True: pass")
    timer.join()
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert time.monotonic() - started < 10
    assert ok(shell, "%%scalebox\nprint(survivor)").stdout == "still here\n"


# ---------------------------------------------------------------------------------------------- a real ipykernel


@pytest.fixture(scope="module")
def kernel(server_env: LocalServer) -> Iterator[KernelRun]:
    run = KernelRun("python3", env={"MPLBACKEND": "agg"})
    try:
        reply, _ = run.execute("%load_ext scalebox_kernel")
        assert reply["content"]["status"] == "ok"
        yield run
    finally:
        run.execute("%scalebox close")
        run.kc.stop_channels()
        run.km.shutdown_kernel(now=False)


def by_type(outputs: list[dict[str, Any]], msg_type: str) -> list[dict[str, Any]]:
    return [m["content"] for m in outputs if m["msg_type"] == msg_type]


def test_kernel_streams_results_plots_html_and_errors(kernel: KernelRun) -> None:
    reply, outputs = kernel.execute("%%scalebox\nprint('streamed')\nbefore = 'set'\n21 * 2")
    assert reply["content"]["status"] == "ok"
    assert by_type(outputs, "stream") == [{"name": "stdout", "text": "streamed\n"}]
    [result] = by_type(outputs, "execute_result")
    assert result["data"]["text/plain"] == "42"
    _, outputs = kernel.execute("%%scalebox\nimport matplotlib.pyplot as plt\nplt.plot([1, 2]); plt.show()")
    assert any("image/png" in d["data"] for d in by_type(outputs, "display_data"))
    _, outputs = kernel.execute("%%scalebox\nfrom IPython.display import HTML\nHTML('<i>it</i>')")
    assert by_type(outputs, "execute_result")[0]["data"]["text/html"] == "<i>it</i>"
    reply, outputs = kernel.execute("%%scalebox\n{}['missing']")
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyError"
    [error] = by_type(outputs, "error")
    assert error["ename"] == "KeyError" and "missing" in "\n".join(error["traceback"])


def test_kernel_cells_take_the_jupyter_channel(kernel: KernelRun) -> None:
    """clear_output, display updates and input() behave as they would locally."""
    reply, outputs = kernel.execute("%%scalebox\n" + CLEAR_AND_UPDATE)
    assert reply["content"]["status"] == "ok"
    assert [c["wait"] for c in by_type(outputs, "clear_output")] == [True] * 4
    [update] = by_type(outputs, "update_display_data")
    assert update["data"]["text/plain"] == "'second'" and update["transient"]["display_id"]
    msg_id = kernel.kc.execute("%%scalebox\nname = input('who? ')\nprint('hi', name)", allow_stdin=True)
    prompt = kernel.kc.get_stdin_msg(timeout=60)
    assert prompt["content"]["prompt"] == "who? "
    kernel.kc.input("ada")
    assert kernel.reply(msg_id)["content"]["status"] == "ok"
    assert [c["text"] for c in by_type(kernel.outputs(msg_id), "stream")] == ["hi ada\n"]


def test_kernel_output_arrives_while_the_cell_runs(kernel: KernelRun) -> None:
    msg_id = kernel.kc.execute("%%scalebox\nimport time\nprint('first', flush=True)\ntime.sleep(2)\nprint('second')")
    first_at = None
    while True:
        msg = kernel.kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream" and "first" in msg["content"]["text"]:
            first_at = time.monotonic()
        if msg["msg_type"] == "stream" and "second" in msg["content"]["text"]:
            assert first_at is not None and time.monotonic() - first_at > 1.5
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    assert first_at is not None
    assert kernel.reply(msg_id)["content"]["status"] == "ok"


def test_kernel_interrupt_keeps_sandbox_state(kernel: KernelRun) -> None:
    kernel.execute("%%scalebox\nbefore_loop = 'survived'")
    msg_id = kernel.kc.execute("%%scalebox\nwhile True: pass")
    time.sleep(2)
    started = time.monotonic()
    kernel.km.interrupt_kernel()
    reply = kernel.reply(msg_id, timeout=30)
    assert time.monotonic() - started < 10
    assert reply["content"]["status"] == "error"
    outputs = kernel.outputs(msg_id)
    assert "interrupted" in "\n".join(by_type(outputs, "error")[0]["traceback"])
    reply, outputs = kernel.execute("%%scalebox\nprint(before_loop)")
    assert reply["content"]["status"] == "ok", reply["content"]
    assert by_type(outputs, "stream")[0]["text"] == "survived\n"


def test_kernel_round_trip_widgets_and_progress(kernel: KernelRun, tmp_path: Path) -> None:
    code = "import pandas as pd\nlocal_df = pd.DataFrame({'v': [1.5, 2.5]})"
    assert kernel.execute(code)[0]["content"]["status"] == "ok"
    reply, _ = kernel.execute("%%scalebox -i local_df -o back\nback = local_df.v.sum()")
    assert reply["content"]["status"] == "ok"
    _, outputs = kernel.execute("print(back)")
    assert by_type(outputs, "stream")[0]["text"] == "4.0\n"
    _, outputs = kernel.execute("%scalebox status")
    views = [d for d in by_type(outputs, "display_data") if "application/vnd.jupyter.widget-view+json" in d["data"]]
    assert len(views) == 1  # the status panel
    # A long wait (pip installing) shows a progress widget that is closed when done.
    name, wheel = tiny_wheel("slowpkg")
    (tmp_path / name).write_bytes(wheel)
    kernel.execute(f"%scalebox upload {tmp_path / name}")
    kernel.execute("get_ipython().magics_manager.registry['ScaleboxMagics'].progress_delay = 0")
    msg_id = kernel.kc.execute(f"%scalebox pip install ./{name}")
    kernel.reply(msg_id, timeout=120)
    outputs = kernel.outputs(msg_id)
    kinds = [m["msg_type"] for m in outputs]
    shown = [m for m in outputs if m["msg_type"] == "display_data"]
    assert shown and "application/vnd.jupyter.widget-view+json" in shown[0]["content"]["data"]
    assert "comm_close" in kinds[kinds.index("display_data") :]
    assert "Installed" in "".join(c["text"] for c in by_type(outputs, "stream"))


def click(kernel: KernelRun, comm_id: str) -> None:
    """What a frontend sends when a Button is clicked."""
    content = {"comm_id": comm_id, "data": {"method": "custom", "content": {"event": "click"}}}
    kernel.kc.shell_channel.send(kernel.kc.session.msg("comm_msg", content))


def panel_parts(outputs: list[dict[str, Any]]) -> tuple[dict[str, str], str]:
    """The status panel's buttons (label -> comm id) and the text of its labels, from a cell's comm_open messages."""
    opened = [m["content"] for m in outputs if m["msg_type"] == "comm_open"]
    buttons = {
        c["data"]["state"]["description"]: c["comm_id"]
        for c in opened
        if c["data"]["state"].get("_model_name") == "ButtonModel"
    }
    assert set(buttons) == {"Pause", "Resume", "Extend", "Kill", "Refresh"}
    return buttons, " ".join(str(c["data"]["state"].get("value", "")) for c in opened)


def wait_for(check: Any, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_kernel_status_panel_buttons(kernel: KernelRun) -> None:
    reply, _ = kernel.execute("%%scalebox --session panel\nclicks = 'kept'")
    assert reply["content"]["status"] == "ok"
    _, outputs = kernel.execute("%scalebox status panel")
    buttons, labels = panel_parts(outputs)
    magics_here = "get_ipython().magics_manager.registry['ScaleboxMagics']"
    _, outputs = kernel.execute(f"{magics_here}.sessions.named['panel'].session.session_id")
    sid = by_type(outputs, "execute_result")[0]["data"]["text/plain"].strip("'")
    assert sid in labels and "running" in labels and "time left" in labels
    sandbox = Sandbox.connect(sid)
    click(kernel, buttons["Pause"])
    assert wait_for(lambda: sandbox.get_info().state == "paused")
    click(kernel, buttons["Resume"])
    assert wait_for(lambda: sandbox.get_info().state == "running")
    before = sandbox.get_info().end_at
    click(kernel, buttons["Extend"])
    assert wait_for(lambda: (sandbox.get_info().end_at or before) > before)  # type: ignore[operator]
    reply, outputs = kernel.execute("%%scalebox --session panel\nprint(clicks)")
    assert by_type(outputs, "stream")[0]["text"] == "kept\n"
    click(kernel, buttons["Kill"])  # a first click only asks to confirm
    click(kernel, buttons["Kill"])
    assert wait_for(lambda: sid not in {info.sandbox_id for info in Sandbox.list()})


def test_configured_execution_timeout_interrupts_a_cell(shell: InteractiveShell) -> None:
    config = magics().sessions.config
    config.execution_timeout = 1.0
    try:
        result, captured = run(shell, "%%scalebox\nimport time\ntime.sleep(60)")
    finally:
        config.execution_timeout = 0.0
    assert type(result.error_in_exec).__name__ == "ExecutionTimeout"
    assert "longer than 1 s" in captured.stdout
    assert ok(shell, "%%scalebox\nprint('still here')").stdout == "still here\n"


def test_close_all_ends_every_session_here(shell: InteractiveShell) -> None:  # last: it closes them all
    ok(shell, "%%scalebox --session one\n1")
    ok(shell, "%%scalebox --session two\n2")
    ids = {sandbox_id("one"), sandbox_id("two")}
    with Sandbox.create() as theirs:  # someone else's sandbox, attached with `use`: let go, not killed
        ok(shell, f"%scalebox use {theirs.sandbox_id} --as theirs")
        said = ok(shell, "%scalebox close --all").stdout
        assert all(sandbox in said for sandbox in ids), said
        assert f"left running: theirs ({theirs.sandbox_id})" in said, said
        alive = {info.sandbox_id for info in Sandbox.list()}
        assert not ids & alive and theirs.sandbox_id in alive
    listing = ok(shell, "%scalebox list").stdout
    assert not any(sandbox in listing for sandbox in ids), listing
    failed, captured = run(shell, "%scalebox close one --all")
    assert "takes no session name" in captured.stdout + captured.stderr + str(failed.error_in_exec)
