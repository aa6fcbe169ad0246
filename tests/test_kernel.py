"""The Scalebox kernel driven through jupyter_client against a real scalebox-local: rich output, interrupt,
restart, re-attach, expiry, shutdown, silent cells, introspection, %scalebox lines (named sessions, the status
widget), %%scalebox cells and the kernelspec installer."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from client_support import config_for
from conftest import LocalServer
from kernel_support import KernelRun, of_type, scalebox_kernels, text_of
from test_magics import click, panel_parts, wait_for
from test_session import tiny_npm_package

from scalebox_kernel.client import Sandbox
from scalebox_kernel.session import Session


@pytest.fixture(scope="module", autouse=True)
def scalebox_env(local_server: LocalServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with scalebox_kernels(local_server, tmp_path_factory):
        yield


@pytest.fixture(scope="module")
def kernel() -> Iterator[KernelRun]:
    """One Scalebox (Python) kernel shared by the tests that do not need a fresh one."""
    run = KernelRun()
    yield run
    run.shutdown()


def live_sandboxes(server: LocalServer) -> set[str]:
    return {i.sandbox_id for i in Sandbox.list(config=config_for(server)) if i.state in ("running", "paused")}


def test_installer_writes_and_removes_kernelspecs(tmp_path: Path) -> None:
    prefix = tmp_path / "env"
    argv = [sys.executable, "-m", "scalebox_kernel", "install", "--prefix", str(prefix)]
    done = subprocess.run([*argv, "--language", "python", "--language", "bash"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    kernels = prefix / "share" / "jupyter" / "kernels"
    assert sorted(p.name for p in kernels.iterdir()) == ["scalebox-bash", "scalebox-python"]
    spec = json.loads((kernels / "scalebox-python" / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable and Path(spec["argv"][0]).is_absolute()
    assert spec["argv"][1:5] == ["-m", "scalebox_kernel.kernel", "-f", "{connection_file}"]
    assert spec["display_name"] == "Scalebox (Python)" and spec["language"] == "python"
    assert spec["interrupt_mode"] == "message"
    assert {"logo-32x32.png", "logo-64x64.png", "logo-svg.svg"} <= {
        p.name for p in (kernels / "scalebox-bash").iterdir()
    }
    assert json.loads((kernels / "scalebox-bash" / "kernel.json").read_text())["display_name"] == "Scalebox (Bash)"

    listed = subprocess.run(
        [sys.executable, "-m", "jupyter", "kernelspec", "list", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "JUPYTER_PATH": str(prefix / "share" / "jupyter")},
    )
    assert {"scalebox-python", "scalebox-bash"} <= set(json.loads(listed.stdout)["kernelspecs"])

    bad = subprocess.run([*argv, "--language", "cobol"], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown language 'cobol'" in bad.stderr and "python" in bad.stderr

    removed = subprocess.run([*argv, "--uninstall"], capture_output=True, text=True)
    assert removed.returncode == 0 and "Removed scalebox-python" in removed.stdout
    assert not any(kernels.iterdir())


def test_kernel_info_is_local_and_the_sandbox_opens_lazily(local_server: LocalServer) -> None:
    before = live_sandboxes(local_server)
    run = KernelRun()
    try:
        info = run.request("kernel_info")
        assert info["language_info"]["name"] == "python" and info["language_info"]["file_extension"] == ".py"
        assert info["implementation"] == "scalebox_kernel"
        assert live_sandboxes(local_server) == before, "kernel_info must not open a sandbox"
        reply, _ = run.execute("1 + 1")
        assert reply["content"]["status"] == "ok"
        sandbox_id = run.sandbox_id()
        assert sandbox_id in live_sandboxes(local_server) - before
    finally:
        run.shutdown()
    assert sandbox_id not in live_sandboxes(local_server), "shutdown (not kept) must kill the sandbox"


#: What only running cells needs: none of it may be imported by a kernel process before its first cell.
CELL_ONLY_MODULES = (
    "scalebox_kernel.session",
    "scalebox_kernel.client",
    "scalebox_kernel.subcommands",
    "scalebox_kernel.protocol",
    "scalebox_kernel.kernel.channel",
    "httpx",
    "google.protobuf",
    "websockets",
)


@contextlib.contextmanager
def importtime_kernel(tmp_path: Path, *options: str) -> Iterator[tuple[Any, Callable[[], set[str]]]]:
    """A kernel process started with `-X importtime` (Python writes each import to stderr as it finishes): a
    client on it, ready, and what of CELL_ONLY_MODULES it has imported so far."""
    from jupyter_client import BlockingKernelClient
    from jupyter_client.connect import write_connection_file

    connection, _ = write_connection_file(str(tmp_path / "kernel.json"), ip="127.0.0.1")
    log = tmp_path / "kernel.stderr"

    def cell_only() -> set[str]:
        lines = log.read_text().splitlines()
        found = {m.group(1) for line in lines if (m := re.match(r"import time:\s+\d+ \|\s+\d+ \|\s*(\S+)", line))}
        assert "scalebox_kernel.kernel.kernel" in found  # the log is this kernel's
        return {name for name in found if name.startswith(CELL_ONLY_MODULES)}

    argv = [sys.executable, "-X", "importtime", "-m", "scalebox_kernel.kernel", "-f", connection, *options]
    with open(log, "wb") as err:
        proc = subprocess.Popen([*argv, "--language", "python"], stdout=err, stderr=err)
    client = BlockingKernelClient()
    client.load_connection_file(connection)
    try:
        client.start_channels()
        client.wait_for_ready(timeout=60)
        yield client, cell_only
        client.shutdown()  # kills the sandbox a cell opened
        proc.wait(30)
    finally:
        client.stop_channels()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kernel_info_comes_before_anything_that_runs_cells_is_imported(tmp_path: Path) -> None:
    """Without the preload, the kernel answers kernel_info having imported none of the session, client, protocol
    or relay; its first cell then imports them (which shows that the check reads this process's imports)."""
    with importtime_kernel(tmp_path, "--ScaleboxKernel.preload=False") as (client, cell_only):
        assert cell_only() == set(), "imported before the first cell"
        reply = client.execute_interactive("1 + 1", output_hook=lambda msg: None, timeout=120)
        assert reply["content"]["status"] == "ok", reply["content"]
        assert {"scalebox_kernel.session", "scalebox_kernel.client", "httpx"} <= cell_only()


def test_what_runs_cells_is_imported_after_kernel_info_before_any_cell(
    tmp_path: Path, local_server: LocalServer
) -> None:
    """By default, once kernel_info is answered, a thread imports what runs cells while the user types: no cell
    and no sandbox needed (none is made). The first cell then runs as ever."""
    before = local_server.sandbox_ids()
    with importtime_kernel(tmp_path) as (client, cell_only):
        wanted = {"scalebox_kernel.session", "scalebox_kernel.client", "scalebox_kernel.kernel.channel", "httpx"}
        deadline = time.monotonic() + 30
        while not wanted <= cell_only() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert wanted <= cell_only()
        assert local_server.sandbox_ids() == before
        reply = client.execute_interactive("6 * 7", output_hook=lambda msg: None, timeout=120)
        assert reply["content"]["status"] == "ok", reply["content"]


def test_output_is_relayed_in_order_with_the_kernels_count(kernel: KernelRun) -> None:
    code = (
        "import sys\nfrom IPython.display import HTML, display\n"
        "print('one', flush=True)\ndisplay(HTML('<i>two</i>'))\nprint('three', file=sys.stderr, flush=True)\n40 + 2"
    )
    msg_id = kernel.kc.execute(code)
    reply = kernel.reply(msg_id)
    outputs = kernel.outputs(msg_id)
    kinds = [(m["msg_type"], m["content"].get("name")) for m in outputs]
    assert kinds == [("stream", "stdout"), ("display_data", None), ("stream", "stderr"), ("execute_result", None)]
    assert outputs[1]["content"]["data"]["text/html"] == "<i>two</i>"
    count = reply["content"]["execution_count"]
    assert outputs[3]["content"] == {"execution_count": count, "data": {"text/plain": "42"}, "metadata": {}}
    again, _ = kernel.execute("None")
    assert again["content"]["execution_count"] == count + 1


def test_matplotlib_plot_arrives_as_png(kernel: KernelRun) -> None:
    reply, outputs = kernel.execute("import matplotlib.pyplot as plt\nplt.plot([1, 4, 9])\nplt.show()")
    assert reply["content"]["status"] == "ok"
    images = [d["data"]["image/png"] for d in of_type(outputs, "display_data") if "image/png" in d["data"]]
    assert len(images) == 1
    assert base64.b64decode(images[0]).startswith(b"\x89PNG\r\n\x1a\n")


def test_html_and_full_bundles_arrive_intact(kernel: KernelRun) -> None:
    reply, outputs = kernel.execute("from IPython.display import HTML, display\ndisplay(HTML('<b>bold</b>'))")
    assert of_type(outputs, "display_data")[0]["data"]["text/html"] == "<b>bold</b>"
    bundle = {
        "text/plain": "plain",
        "text/html": "<p>html</p>",
        "text/markdown": "**md**",
        "text/latex": "$x^2$",
        "image/svg+xml": "<svg xmlns='http://www.w3.org/2000/svg'/>",
        "image/png": base64.b64encode(b"\x89PNG fake").decode(),
        "image/jpeg": base64.b64encode(b"\xff\xd8 fake").decode(),
        "application/pdf": base64.b64encode(b"%PDF-1.4").decode(),
        "application/json": {"a": [1, 2], "b": None},
        "application/javascript": "console.log(1)",
        "application/vnd.custom+json": {"k": "v"},
        "text/x-custom": "custom",
    }
    reply, outputs = kernel.execute(f"display({bundle!r}, raw=True)")
    assert reply["content"]["status"] == "ok"
    assert of_type(outputs, "display_data")[0]["data"] == bundle


def test_error_is_one_message_and_the_reply_matches(kernel: KernelRun) -> None:
    reply, outputs = kernel.execute("def f():\n    return 1 / 0\nf()")
    assert [m["msg_type"] for m in outputs] == ["error"]
    error = outputs[0]["content"]
    assert error["ename"] == "ZeroDivisionError" and error["evalue"] == "division by zero"
    assert isinstance(error["traceback"], list) and all(isinstance(line, str) for line in error["traceback"])
    assert len(error["traceback"]) > 3 and any("f()" in line for line in error["traceback"])
    content = reply["content"]
    assert content["status"] == "error"
    assert (content["ename"], content["evalue"], content["traceback"]) == (
        error["ename"],
        error["evalue"],
        error["traceback"],
    )


def test_interrupt_stops_the_cell_and_keeps_state(kernel: KernelRun) -> None:
    kernel.execute("kept = 41")
    msg_id = kernel.kc.execute("print('looping', flush=True)\nwhile True:\n    pass")
    while True:  # wait until the loop really runs in the sandbox
        msg = kernel.kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            break
    time.sleep(0.3)
    started = time.monotonic()
    kernel.km.interrupt_kernel()  # interrupt_mode "message": an interrupt_request on the control channel
    reply = kernel.reply(msg_id, timeout=30)
    took = time.monotonic() - started
    print(f"interrupt returned in {took:.3f} s")
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
    assert took < 5
    assert of_type(kernel.outputs(msg_id), "error")[0]["ename"] == "KeyboardInterrupt"
    reply, outputs = kernel.execute("kept + 1")
    assert of_type(outputs, "execute_result")[0]["data"]["text/plain"] == "42"


def test_silent_cells_show_nothing_and_do_not_count(kernel: KernelRun) -> None:
    first, _ = kernel.execute("None")
    count = first["content"]["execution_count"]
    reply, outputs = kernel.execute("quiet = 5\nprint('printed')\nquiet", silent=True)
    # As in ipykernel: a silent cell's prints still show, but it has no result and no number.
    assert reply["content"]["status"] == "ok" and not of_type(outputs, "execute_result")
    assert text_of(outputs) == "printed\n"
    reply, outputs = kernel.execute("quiet * 2")
    assert reply["content"]["execution_count"] == count + 1
    assert of_type(outputs, "execute_result")[0]["data"]["text/plain"] == "10"
    # VS Code's hidden helpers run silently in the sandbox once it is open.
    reply, outputs = kernel.execute("import sys as _VSCODE_sys", silent=True)
    assert reply["content"]["status"] == "ok" and outputs == []


def test_completion_inspection_history_in_the_sandbox(kernel: KernelRun) -> None:
    kernel.execute("remote_only_variable = {'k': 1}")
    done = kernel.request("complete", "remote_only_v")
    assert done["status"] == "ok" and done["matches"] == ["remote_only_variable"]
    assert (done["cursor_start"], done["cursor_end"]) == (0, len("remote_only_v"))
    code = "remote_only_variable.ke"
    done = kernel.request("complete", code)
    completed = {code[: done["cursor_start"]] + match + code[done["cursor_end"] :] for match in done["matches"]}
    assert "remote_only_variable.keys" in completed
    found = kernel.request("inspect", "remote_only_variable", 20)
    assert found["found"] is True and "dict" in found["data"]["text/plain"]
    missing = kernel.request("inspect", "no_such_name_here", 17)
    assert missing == {"status": "ok", "found": False, "data": {}, "metadata": {}}
    history = kernel.request("history", hist_access_type="tail", n=1, output=False, raw=True)
    assert history["history"][-1][2] == "remote_only_variable = {'k': 1}"
    assert kernel.request("is_complete", "for i in range(3):") == {"status": "incomplete", "indent": "    "}


def test_scalebox_lines_run_in_the_kernel(kernel: KernelRun, tmp_path: Path) -> None:
    reply, outputs = kernel.execute("%scalebox help")
    assert "%scalebox info" in text_of(outputs)
    reply, outputs = kernel.execute("%scalebox timeout 10m\n%scalebox info\nprint('after')")
    text = text_of(outputs)
    assert "now lives 9m" in text or "now lives 10m" in text
    assert "sandbox:" in text and text.endswith("after\n")
    kernel.execute("%scalebox env GREETING=hello")
    reply, outputs = kernel.execute("%scalebox run echo $GREETING from $PWD")
    assert text_of(outputs).startswith("hello from /") and text_of(outputs).strip().endswith("/workspace")
    local = tmp_path / "data.txt"
    local.write_text("payload")
    # The context's working directory is the sandbox's /workspace (the same path inside once it is isolated).
    reply, outputs = kernel.execute(f"%scalebox upload {local} /workspace/data.txt\nprint(open('data.txt').read())")
    assert text_of(outputs).endswith("payload\n")
    reply, outputs = kernel.execute("%scalebox ls")
    assert "data.txt" in text_of(outputs)
    reply, outputs = kernel.execute("print(1)\n%scalebox info")
    assert reply["content"]["status"] == "error" and "top of the cell" in reply["content"]["evalue"]
    for line, expected in (
        ("%scalebox frobnicate", "unknown subcommand 'frobnicate'"),
        ("%scalebox timeout soon", "not a duration"),
        ("%scalebox new --frob", "unrecognized arguments: --frob"),
        ("%scalebox use nope", "no session named 'nope'"),
    ):
        reply, outputs = kernel.execute(line)
        assert reply["content"]["status"] == "error" and expected in reply["content"]["evalue"]
        assert reply["content"]["ename"] == "UsageError" and [m["msg_type"] for m in outputs] == ["error"]
    reply, _ = kernel.execute("1 + 1")
    assert reply["content"]["status"] == "ok", "the kernel keeps working after bad commands"


def test_named_sessions_use_list_and_close(kernel: KernelRun, local_server: LocalServer) -> None:
    kernel.execute("notebook_var = 'notebook'")
    notebook_id = kernel.sandbox_id()
    reply, outputs = kernel.execute("%scalebox new side")
    assert reply["content"]["status"] == "ok" and "Session side: sandbox" in text_of(outputs)
    side_id = kernel.sandbox_id()  # `info` describes the current session: now side's sandbox
    assert side_id != notebook_id and side_id in live_sandboxes(local_server)
    _, outputs = kernel.execute("side_var = 'side'\nprint('notebook_var' in globals())")
    assert text_of(outputs) == "False\n"
    listing = text_of(kernel.execute("%scalebox list")[1])
    assert f"* side         {side_id}" in listing and f"  default      {notebook_id}" in listing
    _, outputs = kernel.execute("%scalebox use default\nprint(notebook_var)")
    assert text_of(outputs).endswith("notebook\n")
    _, outputs = kernel.execute(f"%scalebox use {side_id}\nprint(side_var)")  # by sandbox id, too
    assert text_of(outputs) == f"Using session side ({side_id}).\nside\n"

    # Attach by id to a sandbox someone else made: cells run there; closing with --keep only lets go of it.
    elsewhere = str(Session.run("made = 'elsewhere'", keep_alive=True).session_id)
    _, outputs = kernel.execute(f"%scalebox use {elsewhere} --as other\nprint(made)")
    assert text_of(outputs) == f"Using session other: sandbox {elsewhere} (attached).\nelsewhere\n"
    _, outputs = kernel.execute("%scalebox close other --keep")
    assert "forgotten" in text_of(outputs) and "current session is now default" in text_of(outputs)
    assert Session.get(elsewhere).status == "running"
    Session.close(elsewhere)

    _, outputs = kernel.execute("%scalebox close side\nprint(notebook_var)")
    assert text_of(outputs) == f"Session side closed: sandbox {side_id}.\nnotebook\n"
    assert side_id not in live_sandboxes(local_server)

    # Closing the notebook's own sandbox kills it; the next cell opens a fresh one and says so.
    _, outputs = kernel.execute("%scalebox close")
    assert f"Session default closed: sandbox {notebook_id}." in text_of(outputs)
    assert notebook_id not in live_sandboxes(local_server)
    reply, outputs = kernel.execute("print('notebook_var' in globals())")
    assert reply["content"]["status"] == "ok" and text_of(outputs) == "False\n"
    fresh = kernel.sandbox_id()
    assert fresh != notebook_id and notebook_id in text_of(outputs, "stderr") and fresh in text_of(outputs, "stderr")


def test_scalebox_cells_run_other_languages_and_sessions(kernel: KernelRun) -> None:
    kernel.execute("shared = 21")
    reply, outputs = kernel.execute(
        "%%scalebox --language python --env EXTRA=yes\nimport os\nshared * 2, os.environ['EXTRA']"
    )
    assert reply["content"]["status"] == "ok"
    assert of_type(outputs, "execute_result")[0]["data"]["text/plain"] == "(42, 'yes')"  # the same context
    reply, outputs = kernel.execute("%%scalebox --language bash\necho from bash in $PWD")
    if reply["content"]["status"] == "ok":
        assert text_of(outputs).strip().startswith("from bash in /") and text_of(outputs).strip().endswith("workspace")
    else:  # until scalebox-local has a Bash runtime: the server's clear error, in the cell
        assert "bash" in reply["content"]["evalue"] and "not available" in reply["content"]["evalue"]
    reply, outputs = kernel.execute("%%scalebox --session aside\nprint('shared' in globals())")
    assert reply["content"]["status"] == "ok" and text_of(outputs) == "False\n"
    kernel.execute("%scalebox close aside")
    for cell, expected in (
        ("%%scalebox -i shared\n1", "-i/-o move values"),
        ("%%scalebox --frob\n1", "unrecognized arguments: --frob"),
        ("x = 1\n%%scalebox\n1", "first line of the cell"),
    ):
        reply, outputs = kernel.execute(cell)
        assert reply["content"]["ename"] == "UsageError" and expected in reply["content"]["evalue"]
    assert text_of(kernel.execute("print(shared)")[1]) == "21\n"


def widget_values_until(kernel: KernelRun, wanted: Callable[[str], bool], timeout: float) -> list[str]:
    """The `value` of every widget update on iopub (from any cell, a panel's background refresh included) until
    one is `wanted` or `timeout` s pass."""
    values: list[str] = []
    deadline = time.monotonic() + timeout
    while not any(map(wanted, values)) and time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            msg = kernel.kc.get_iopub_msg(timeout=1)
            if msg["msg_type"] == "comm_msg":
                values.append(str(msg["content"]["data"].get("state", {}).get("value", "")))
    return values


def test_status_panel_is_a_widget_with_working_buttons(kernel: KernelRun) -> None:
    kernel.execute("kept_by_panel = 'kept'")
    sid = kernel.sandbox_id()
    reply, outputs = kernel.execute("%scalebox status")
    assert reply["content"]["status"] == "ok"
    views = [d for d in of_type(outputs, "display_data") if "application/vnd.jupyter.widget-view+json" in d["data"]]
    assert len(views) == 1
    buttons, labels = panel_parts(outputs)
    assert sid in labels and "running" in labels and "time left" in labels
    sandbox = Sandbox.connect(sid)
    click(kernel, buttons["Pause"])
    assert wait_for(lambda: sandbox.get_info().state == "paused")
    assert kernel.request("complete", "kept_by_p")["matches"] == [], "completion must not resume a paused sandbox"
    click(kernel, buttons["Resume"])
    assert wait_for(lambda: sandbox.get_info().state == "running")
    before = sandbox.get_info().end_at
    click(kernel, buttons["Extend"])
    assert wait_for(lambda: (sandbox.get_info().end_at or before) > before)  # type: ignore[operator]
    assert text_of(kernel.execute("print(kept_by_panel)")[1]) == "kept\n"
    # Paused from the panel, resumed by a cell: the panel reads its state again and shows it running.
    click(kernel, buttons["Pause"])
    assert wait_for(lambda: sandbox.get_info().state == "paused")
    msg_id = kernel.kc.execute("print(kept_by_panel)")
    updates = widget_values_until(kernel, lambda value: "running" in value, 20)
    assert any("paused" not in u and "running" in u for u in updates), updates
    kernel.reply(msg_id)
    # Kill asks for a second click, then the panel says the sandbox is killed (no client error).
    click(kernel, buttons["Kill"])
    time.sleep(1.5)
    assert sid in {info.sandbox_id for info in Sandbox.list()}, "one click does not kill"
    click(kernel, buttons["Kill"])
    assert wait_for(lambda: sid not in {info.sandbox_id for info in Sandbox.list()})
    texts = widget_values_until(kernel, lambda value: "killed" in value, 10)
    assert any("killed" in t for t in texts) and not any("client has been closed" in t for t in texts), texts
    _, outputs = kernel.execute("print('kept_by_panel' in globals())")
    assert text_of(outputs) == "False\n" and sid in text_of(outputs, "stderr"), [o["content"] for o in outputs]


def test_restart_clears_state_in_the_same_sandbox(kernel: KernelRun) -> None:
    kernel.execute("before_restart = 1")
    sandbox_id = kernel.sandbox_id()
    kernel.km.restart_kernel(now=False)
    kernel.kc.wait_for_ready(timeout=60)
    reply, _outputs = kernel.execute("before_restart")
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "NameError"
    assert kernel.sandbox_id() == sandbox_id


def test_reattach_keeps_state_across_kernel_processes(local_server: LocalServer) -> None:
    env = {"JPY_SESSION_NAME": "/notebooks/reattach.ipynb"}
    first = KernelRun(env=env)
    reply, outputs = first.execute("%scalebox keep\nwidth = 7")
    assert "will be kept" in text_of(outputs)
    sandbox_id = first.sandbox_id()
    first.shutdown()  # asked to keep: the sandbox lives on
    assert sandbox_id in live_sandboxes(local_server)

    second = KernelRun(env=env)  # reopening the notebook
    reply, outputs = second.execute("width * 6")
    assert reply["content"]["status"] == "ok"
    assert of_type(outputs, "execute_result")[0]["data"]["text/plain"] == "42"
    assert text_of(outputs, "stderr") == ""
    assert second.sandbox_id() == sandbox_id
    second.shutdown(now=True)  # the kernel process dies without a word

    third = KernelRun(env=env)
    _reply, outputs = third.execute("width")
    assert of_type(outputs, "execute_result")[0]["data"]["text/plain"] == "7"
    third.execute("%scalebox keep off")
    third.shutdown()
    assert sandbox_id not in live_sandboxes(local_server)


def test_expired_or_killed_sandbox_is_announced(local_server: LocalServer) -> None:
    run = KernelRun(env={"SCALEBOX_PROGRESS_DELAY": "0"})
    try:
        reply, outputs = run.execute("lost = 1")
        # Opening took longer than the (zero) delay: a progress line was shown, then cleared, and nothing is left.
        kinds = [m["msg_type"] for m in outputs]
        assert kinds[0] == "display_data" and "Opening a sandbox" in outputs[0]["content"]["data"]["text/plain"]
        assert outputs[0]["content"]["transient"]["display_id"]
        assert "clear_output" in kinds
        sandbox_id = run.sandbox_id()
        # The sandbox expires a second from now; set on the server, so that its replacement gets the usual lifetime
        # (`%scalebox timeout 1s` would give it one second too, a race with its first cell).
        Sandbox.set_timeout(sandbox_id, 1, config=config_for(local_server))
        deadline = time.monotonic() + 30
        while sandbox_id in live_sandboxes(local_server) and time.monotonic() < deadline:
            time.sleep(0.5)
        reply, outputs = run.execute("print('still here?', 'lost' in globals())")
        assert reply["content"]["status"] == "ok", (reply["content"], [o["content"] for o in outputs])
        notice = text_of(outputs, "stderr")
        assert sandbox_id in notice and "expired" in notice and "gone" in notice, [o["content"] for o in outputs]
        assert re.search(r"expired at \d\d:\d\d:\d\d;", notice), "the notice says when it expired"
        assert text_of(outputs).strip() == "still here? False"
        assert outputs.index(next(m for m in outputs if m["content"].get("name") == "stderr")) < outputs.index(
            next(m for m in outputs if m["content"].get("name") == "stdout")
        ), "the notice comes before the cell's output"

        replaced = run.sandbox_id()
        run.execute("%scalebox timeout 5m")
        Sandbox.kill_by_id(replaced, config=config_for(local_server))
        _reply, outputs = run.execute("print('after kill')")
        assert replaced in text_of(outputs, "stderr") and text_of(outputs) == "after kill\n"
    finally:
        run.shutdown()


def test_unreachable_server_is_an_error_in_the_cell_not_a_hang() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once the socket closes
    secret = "sk-unreachable-secret-123456"
    run = KernelRun(env={"SCALEBOX_API_URL": f"http://127.0.0.1:{port}", "SCALEBOX_API_KEY": secret})
    try:
        started = time.monotonic()
        reply, outputs = run.execute("1 + 1", timeout=120)
        took = time.monotonic() - started
        print(f"unreachable server reported after {took:.1f} s")
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "ServerUnavailable"
        assert took < 60
        assert secret not in json.dumps([reply["content"], *[m["content"] for m in outputs]])
        assert run.request("complete", "pri")["matches"] == ["print"]  # still answers, from the builtins
        assert run.request("inspect", "print", 5)["found"] is False
    finally:
        run.shutdown()


def test_a_language_the_sandbox_lacks_says_so_in_the_cell() -> None:
    run = KernelRun("scalebox-r")
    try:
        info = run.request("kernel_info")
        assert info["language_info"]["name"] == "R" and info["language_info"]["file_extension"] == ".r"
        assert run.request("is_complete", "f <- function(")["status"] == "unknown"
        reply, outputs = run.execute("1 + 1")
        if reply["content"]["status"] == "error":  # until scalebox-local has an R runtime
            assert "python" in reply["content"]["evalue"] and [m["msg_type"] for m in outputs] == ["error"]
        else:
            assert of_type(outputs, "execute_result") or of_type(outputs, "display_data")
    finally:
        run.shutdown()


def test_an_npm_install_in_a_nodejs_notebook_says_what_it_installed_and_a_failure_fails(tmp_path: Path) -> None:
    from language_support import skip_reason

    why = skip_reason("nodejs")
    if why:
        pytest.skip(why)
    name, tarball = tiny_npm_package("tinyk", "0.3.0")
    (tmp_path / name).write_bytes(tarball)
    run = KernelRun("scalebox-nodejs")
    try:
        reply, _ = run.execute(f"%scalebox upload {tmp_path / name}", timeout=120)
        assert reply["content"]["status"] == "ok", reply["content"]
        reply, outputs = run.execute(f"%scalebox install ./{name}\nconsole.log(require('tinyk'))", timeout=120)
        said = text_of(outputs) + text_of(outputs, "stderr")
        assert reply["content"]["status"] == "ok", reply["content"]
        assert "installed: tinyk@0.3.0" in said and "hello from tinyk 0.3.0" in said, said
        reply, outputs = run.execute("%scalebox install ./no-such-package.tgz\nconsole.log('never')", timeout=120)
        said = text_of(outputs) + text_of(outputs, "stderr") + json.dumps(reply["content"])
        assert reply["content"]["status"] == "error" and "ENOENT" in said, said
        assert "never" not in text_of(outputs) and "Installed" not in text_of(outputs), said
    finally:
        run.shutdown()


def test_a_kernel_on_loopback_does_not_warn_of_plain_tcp(tmp_path: Path) -> None:
    """ipykernel's "running over TCP without encryption" warning is noise for a loopback kernel: ours does not log
    it (plain ipykernel, started the same way, does: the check can fail)."""
    from jupyter_client import BlockingKernelClient
    from jupyter_client.connect import write_connection_file

    def stderr_of(module: str) -> str:
        connection, _ = write_connection_file(str(tmp_path / f"{module}.json"), ip="127.0.0.1", transport="tcp")
        log = tmp_path / f"{module}.stderr"
        with open(log, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", module, "-f", connection], stdout=err, stderr=err)
        client = BlockingKernelClient()
        client.load_connection_file(connection)
        try:
            client.start_channels()
            client.wait_for_ready(timeout=60)  # its sockets are made: any warning of theirs is written
        finally:
            client.stop_channels()
            proc.terminate()
            proc.wait(30)
        return log.read_text()

    assert "without encryption" in stderr_of("ipykernel_launcher")
    assert "without encryption" not in stderr_of("scalebox_kernel.kernel")


def _state(server: LocalServer, sandbox_id: str) -> str:
    return Sandbox.get_info(sandbox_id, config=config_for(server)).state


def test_an_idle_notebooks_sandbox_is_paused_not_killed_and_the_next_cell_resumes_it(
    local_server: LocalServer,
) -> None:
    run = KernelRun(env={"SCALEBOX_IDLE_PAUSE": "3"})
    try:
        reply, _ = run.execute("kept = 41")
        assert reply["content"]["status"] == "ok", reply["content"]
        sandbox_id = run.sandbox_id()
        _, outputs = run.execute("%scalebox info")
        info = text_of(outputs)
        assert "idle pause" in info and "after 3 s without a cell" in info and "while this kernel runs" in info
        # A cell that runs longer than the idle time is not idle: the sandbox stays running under it.
        msg_id = run.kc.execute("import time\ntime.sleep(7)\nprint('slept')")
        states = []
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            states.append(_state(local_server, sandbox_id))
            time.sleep(0.5)
        assert set(states) == {"running"}, states
        run.reply(msg_id, timeout=30)
        assert text_of(run.outputs(msg_id)) == "slept\n"
        # Then idle: paused (not killed), and the next cell finds its variables, told once.
        deadline = time.monotonic() + 30
        while _state(local_server, sandbox_id) != "paused" and time.monotonic() < deadline:
            time.sleep(0.3)
        assert _state(local_server, sandbox_id) == "paused"
        reply, outputs = run.execute("print(kept + 1)")
        assert reply["content"]["status"] == "ok", reply["content"]
        assert text_of(outputs) == "42\n"
        notice = text_of(outputs, "stderr")
        assert sandbox_id in notice and "was paused at" in notice and "variables and files kept" in notice
        assert _state(local_server, sandbox_id) == "running"
        _, outputs = run.execute("print('again')")
        assert text_of(outputs, "stderr") == ""  # said once
    finally:
        run.shutdown()


def test_the_sandbox_outlives_its_timeout_while_the_kernel_runs(local_server: LocalServer) -> None:
    run = KernelRun(env={"SCALEBOX_SANDBOX_TIMEOUT": "4", "SCALEBOX_IDLE_PAUSE": "0"})
    try:
        run.execute("kept = 'yes'")
        sandbox_id = run.sandbox_id()
        time.sleep(10)  # more than twice its lifetime, with no cell
        assert _state(local_server, sandbox_id) == "running"
        _, outputs = run.execute("print(kept)")
        assert text_of(outputs) == "yes\n" and text_of(outputs, "stderr") == ""
    finally:
        run.shutdown()


def test_exit_and_quit_end_the_kernel_as_ipykernel_does(local_server: LocalServer) -> None:
    run = KernelRun()
    try:
        run.execute("x = 1")
        sandbox_id = run.sandbox_id()
        reply, _ = run.execute("exit(keep_kernel=True)")
        payload = reply["content"]["payload"]
        assert {"source": "ask_exit", "keepkernel": True} in payload  # the frontend may exit; the kernel stays
        assert run.execute("print(x)")[1] and run.km.is_alive()
        reply, _ = run.execute("exit")
        assert reply["content"]["status"] == "ok"
        assert {"source": "ask_exit", "keepkernel": False} in reply["content"]["payload"]
        deadline = time.monotonic() + 30
        while run.km.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not run.km.is_alive(), "the kernel process ends, as ipykernel's does"
        assert sandbox_id not in live_sandboxes(local_server)  # let go of as at shutdown: killed (not kept)
    finally:
        run.shutdown(now=True)


def test_named_kernelspecs_side_by_side_with_their_own_environment(tmp_path: Path) -> None:
    prefix = tmp_path / "env"
    secrets_file = tmp_path / "cloud.env"
    secrets_file.write_text("SCALEBOX_API_KEY=sk-from-a-file\n")
    base = [sys.executable, "-m", "scalebox_kernel", "install", "--prefix", str(prefix), "--language", "python"]
    done = subprocess.run(
        [
            *base,
            "--name",
            "scalebox-cloud",
            "--display-name",
            "Scalebox (cloud)",
            "--env",
            "SCALEBOX_API_URL=https://api.example.invalid",
            "--env-file",
            str(secrets_file),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert subprocess.run(base, capture_output=True, text=True, timeout=60).returncode == 0  # the plain one beside it
    kernels = prefix / "share" / "jupyter" / "kernels"
    assert sorted(p.name for p in kernels.iterdir()) == ["scalebox-cloud", "scalebox-python"]
    cloud = kernels / "scalebox-cloud" / "kernel.json"
    spec = json.loads(cloud.read_text())
    assert spec["display_name"] == "Scalebox (cloud)" and spec["argv"][-1] == "python"
    assert spec["env"] == {"SCALEBOX_API_URL": "https://api.example.invalid", "SCALEBOX_API_KEY": "sk-from-a-file"}
    assert cloud.stat().st_mode & 0o077 == 0  # it holds a key: its owner's only
    refused = subprocess.run(
        [*base, "--env", "SCALEBOX_API_KEY=sk-on-the-command-line"], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2 and "--env-file" in refused.stderr and "sk-on-the" not in refused.stderr
    for bad in ("..", ".", "-x", "A/b"):  # never a name whose folder is kernels/.. (jupyter_client would rmtree it)
        named = subprocess.run([*base, "--name", bad], capture_output=True, text=True, timeout=60)
        assert named.returncode == 2, (bad, named.stderr)
    removed = subprocess.run(
        [
            sys.executable,
            "-m",
            "scalebox_kernel",
            "install",
            "--prefix",
            str(prefix),
            "--name",
            "scalebox-cloud",
            "--uninstall",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert removed.returncode == 0 and sorted(p.name for p in kernels.iterdir()) == ["scalebox-python"]


def test_a_notebooks_own_sandbox_is_set_up_before_it_starts(local_server: LocalServer) -> None:
    """`%scalebox new default --cpu … --memory … --env …` as the first cell shapes the notebook's own sandbox."""
    run = KernelRun()
    try:
        reply, outputs = run.execute("%scalebox new default --cpu 1 --memory 256 --env COLOUR=teal", timeout=120)
        assert reply["content"]["status"] == "ok", reply["content"]
        found = re.search(r"sandbox (\S+) \(", text_of(outputs))
        assert found, text_of(outputs)
        info = Sandbox.get_info(found.group(1), config=config_for(local_server))
        assert (info.cpu_count, info.memory_mb) == (1, 256), info
        _, outputs = run.execute("import os\nprint(os.environ['COLOUR'])")
        assert text_of(outputs) == "teal\n"
    finally:
        run.shutdown()
