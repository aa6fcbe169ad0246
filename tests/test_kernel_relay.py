"""The Scalebox kernel as a relay to the sandbox's kernel (its Jupyter endpoint), on real scalebox-local servers:
what only the full protocol carries (stdin, comms, clear_output, display updates, the sandbox's own counts and
completion), a WebSocket dropped mid-cell and made again, and the ExecutionService fallback with its notice."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import LocalServer
from kernel_support import CLEAR_AND_UPDATE, KernelRun, environ, install_kernelspecs, of_type, text_of
from proxy_support import DropProxy, free_port

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def kernelspecs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = str(install_kernelspecs(Path(tmp_path_factory.mktemp("kernelspecs"))))
    with environ({"JUPYTER_PATH": path}):
        yield path


@pytest.fixture
def kernel(local_server: LocalServer, kernelspecs: str) -> Iterator[KernelRun]:
    run = KernelRun(env=local_server.env())
    yield run
    run.shutdown()


def cell_messages(run: KernelRun, msg_id: str, until: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """iopub messages of one cell up to (and with) the first one `until` accepts."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        msg = run.kc.get_iopub_msg(timeout=max(deadline - time.monotonic(), 0.1))
        if msg["parent_header"].get("msg_id") == msg_id:
            seen.append(msg)
            if until(msg):
                return seen
    raise AssertionError(f"the cell never sent what was waited for; it sent {[m['msg_type'] for m in seen]}")


def test_the_full_protocol_reaches_the_sandbox_kernel(kernel: KernelRun) -> None:
    kernel.execute("1")  # opens the sandbox (its progress line is cleared with a clear_output of ours)
    reply, outputs = kernel.execute(CLEAR_AND_UPDATE)
    assert reply["content"]["status"] == "ok"
    assert [m["wait"] for m in of_type(outputs, "clear_output")] == [True] * 4
    assert of_type(outputs, "update_display_data")[0]["data"]["text/plain"] == "'second'"
    # completion in the sandbox's own kernel, with nothing imported yet
    assert "path" in kernel.request("complete", "import os; os.pa")["matches"]
    # input(): the prompt comes on stdin, the answer reaches the sandbox
    msg_id = kernel.kc.execute("name = input('who? ')\nprint('hello', name)", allow_stdin=True)
    prompt = kernel.kc.get_stdin_msg(timeout=30)
    assert prompt["msg_type"] == "input_request" and prompt["content"]["prompt"] == "who? "
    kernel.kc.input("ada")
    assert kernel.reply(msg_id)["content"]["status"] == "ok"
    assert text_of(kernel.outputs(msg_id)) == "hello ada\n"


def test_counts_are_the_sandbox_kernels_and_tracebacks_match_them(kernel: KernelRun) -> None:
    counts = [kernel.execute("x = 1")[0]["content"]["execution_count"] for _ in range(3)]
    assert counts == [counts[0], counts[0] + 1, counts[0] + 2]
    local, _ = kernel.execute("%scalebox info")  # handled here: it takes no number of the sandbox's
    reply, outputs = kernel.execute("1 / 0")
    count = reply["content"]["execution_count"]
    assert count == counts[-1] + 1 and local["content"]["execution_count"] == counts[-1]
    traceback = "\n".join(of_type(outputs, "error")[0]["traceback"])
    assert f"Cell In[{count}]" in traceback or f"In[{count}]" in traceback.replace("\x1b[", "")
    assert "channel" in text_of(kernel.execute("%scalebox info")[1]) and "Jupyter endpoint" in text_of(
        kernel.execute("%scalebox info")[1]
    )


def test_widgets_comms_travel_both_ways(kernel: KernelRun) -> None:
    reply, outputs = kernel.execute("import ipywidgets\nslider = ipywidgets.IntSlider(value=3)\nslider")
    assert reply["content"]["status"] == "ok", reply["content"]
    opens = [m for m in of_type(outputs, "comm_open") if m["data"]["state"].get("_model_name") == "IntSliderModel"]
    assert opens, [m["msg_type"] for m in outputs]
    comm_id = opens[0]["comm_id"]
    view = of_type(outputs, "execute_result")[0]["data"]["application/vnd.jupyter.widget-view+json"]
    assert view["model_id"] == comm_id
    # the frontend moves the slider: a comm_msg the sandbox's widget takes
    update = {"method": "update", "state": {"value": 42}, "buffer_paths": []}
    kernel.kc.session.send(kernel.kc.shell_channel.socket, "comm_msg", {"comm_id": comm_id, "data": update})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if text_of(kernel.execute("print(slider.value)")[1]) == "42\n":
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the sandbox's slider never took the frontend's value")


def test_a_dropped_connection_is_made_again_and_the_cell_goes_on(
    server_factory: Callable[..., LocalServer], kernelspecs: str
) -> None:
    port = free_port()
    proxy = DropProxy(port)
    server = server_factory(port=port, extra=[f"--ServerSettings.public_host=127.0.0.1:{proxy.port}"])
    with proxy:
        run = KernelRun(env=server.env())
        try:
            run.execute("1")  # opens the sandbox; the channel goes through the proxy
            msg_id = run.kc.execute("import time\nprint('before', flush=True)\ntime.sleep(3)\nprint('after')")
            seen = cell_messages(run, msg_id, lambda m: m["msg_type"] == "stream")
            assert text_of(seen) == "before\n"
            made = proxy.connections
            proxy.drop()
            reply = run.reply(msg_id)
            outputs = run.outputs(msg_id)
            assert reply["content"]["status"] == "ok"
            assert text_of(outputs) == "after\n"
            assert "dropped and was made again; nothing was lost" in text_of(outputs, "stderr")
            assert proxy.connections > made
            assert text_of(run.execute("print('and on')")[1]) == "and on\n"
        finally:
            run.shutdown()


def test_forced_fallback_says_so_once_and_runs_cells(local_server: LocalServer, kernelspecs: str) -> None:
    run = KernelRun(env={**local_server.env(), "SCALEBOX_CHANNEL": "execute"})
    try:
        reply, outputs = run.execute("print('over execute')")
        assert reply["content"]["status"] == "ok" and text_of(outputs) == "over execute\n"
        assert "SCALEBOX_CHANNEL=execute" in text_of(outputs, "stderr")
        _, outputs = run.execute("print('again')")
        assert text_of(outputs, "stderr") == ""
        assert "ExecutionService" in text_of(run.execute("%scalebox info")[1])
    finally:
        run.shutdown()


def test_a_back_end_without_the_endpoint_falls_back(
    server_factory: Callable[..., LocalServer], kernelspecs: str
) -> None:
    server = server_factory(extra=["--ServerSettings.jupyter_endpoint=False"])
    run = KernelRun(env=server.env())
    try:
        reply, outputs = run.execute("%scalebox info\nprint(6 * 7)")
        assert reply["content"]["status"] == "ok" and text_of(outputs).endswith("42\n"), reply["content"]
        assert "no Jupyter endpoint" in text_of(outputs, "stderr")
        assert "ExecutionService (the back end has no Jupyter endpoint)" in text_of(run.execute("%scalebox info")[1])
        _, outputs = run.execute("print('quiet')")
        assert text_of(outputs, "stderr") == ""
    finally:
        run.shutdown()
