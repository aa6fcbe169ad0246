"""Code execution on scalebox-local through the wire (both codecs): real ipykernel contexts behind Execute."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from agent_support import CODEC_IDS, CODECS, EXECUTE, Box, results_of, stderr_of, stdout_of
from conftest import LocalServer

from scalebox_kernel.protocol import connect, pb
from scalebox_kernel.server.agent.runtimes import default_registry

CREATE = "sandboxagent.ContextService/CreateContext"
DESTROY = "sandboxagent.ContextService/DestroyContext"


@pytest.fixture(scope="module")
def box(local_server: LocalServer, http: httpx.Client) -> Iterator[Box]:
    sandbox = Box(local_server, http, env_vars={"SANDBOX_GREETING": "hello"})
    yield sandbox
    sandbox.kill()


@pytest.mark.parametrize("codec", CODECS, ids=CODEC_IDS)
def test_print_streams_while_the_cell_runs(box: Box, codec: connect.Codec) -> None:
    code = "import time\nprint('first', flush=True)\ntime.sleep(1.5)\nprint('second')"
    with box.open(EXECUTE, pb.ExecuteRequest(code=code), pb.ExecuteResponse, codec) as frames:
        arrivals = {f.message.stdout.content: f.at for f in frames if f.message.HasField("stdout")}
        assert frames.ended and frames.error is None
    assert set(arrivals) == {"first\n", "second\n"}
    assert arrivals["second\n"] - arrivals["first\n"] > 1.0  # the first line came while the cell still slept


@pytest.mark.parametrize("codec", CODECS, ids=CODEC_IDS)
def test_expression_result_with_execution_count(box: Box, codec: connect.Codec) -> None:
    first = results_of(box.execute("40 + 2", codec))
    second = results_of(box.execute("'abc'", codec))
    assert [r.text for r in first] == ["42"] and first[0].is_main_result
    assert second[0].text == "'abc'"  # text/plain as the kernel sent it, quotes and all
    assert first[0].execution_count > 0 and second[0].execution_count == first[0].execution_count + 1


def test_state_is_kept_across_cells_and_sandbox_envs_apply(box: Box) -> None:
    box.execute("import os\ncounter = 41")
    assert results_of(box.execute("counter + 1"))[0].text == "42"
    assert results_of(box.execute("os.environ['SANDBOX_GREETING']"))[0].text == "'hello'"
    assert results_of(box.execute("os.getcwd().endswith('/home/user')"))[0].text == "True"


def test_the_kernel_collects_garbage_once_it_serves(box: Box) -> None:
    """The collector is off only while the kernel starts: cells run with it on, and what the start made is frozen
    (so never scanned again), while cycles a cell makes are still collected."""
    code = (
        "import gc, weakref\n"
        "class Node: pass\n"
        "a, b = Node(), Node(); a.b, b.a = b, a; probe = weakref.ref(a); del a, b\n"
        "gc.collect()\n"
        "(gc.isenabled(), gc.get_freeze_count() > 10000, probe() is None)"
    )
    assert results_of(box.execute(code))[0].text == "(True, True, True)"


def test_matplotlib_plot_is_a_png_display(box: Box) -> None:
    code = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.show()"
    reply = box.execute(code)
    assert reply.error is None and not any(m.HasField("error") for m in reply.messages)
    pngs = [r for r in results_of(reply) if r.png]
    assert len(pngs) == 1 and not pngs[0].is_main_result
    assert base64.b64decode(pngs[0].png).startswith(b"\x89PNG\r\n\x1a\n")


def test_html_display_and_json_placement(box: Box) -> None:
    reply = box.execute("from IPython.display import HTML, display\ndisplay(HTML('<b>bold</b>'))")
    [html] = results_of(reply)
    assert html.html == "<b>bold</b>" and not html.is_main_result and html.text

    code = "from IPython.display import JSON\nJSON({'a': [1, 2]})"
    [proto_result] = results_of(box.execute(code, connect.PROTO))
    # Never Result.json for proto clients: the official Python SDK 1.0.10 crashes on it (PROTOCOL.md 5.5).
    assert proto_result.json == "" and json.loads(proto_result.extra["application/json"]) == {"a": [1, 2]}
    [json_result] = results_of(box.execute(code, connect.JSON))
    assert json.loads(json_result.json) == {"a": [1, 2]}


def test_pager_output_is_a_display(box: Box) -> None:
    [page] = results_of(box.execute("len?"))
    assert not page.is_main_result and "Return the number of items" in re.sub(r"\x1b\[[0-9;]*m", "", page.text)


@pytest.mark.parametrize("codec", CODECS, ids=CODEC_IDS)
def test_error_has_name_value_and_traceback(box: Box, codec: connect.Codec) -> None:
    reply = box.execute("def f():\n    return 1 / 0\nf()", codec)
    [error] = [m.error for m in reply.messages if m.HasField("error")]
    assert error.name == "ZeroDivisionError" and error.value == "division by zero"
    plain = re.sub(r"\x1b\[[0-9;]*m", "", error.traceback)  # tracebacks keep their colours, as Jupyter sends them
    assert "\x1b[" in error.traceback and "ZeroDivisionError" in plain and "return 1 / 0" in plain
    assert reply.error is None  # a failing cell is output, not a failed call


def test_env_vars_apply_to_one_cell_only(box: Box) -> None:
    code = "import os\nos.environ.get('CELL_ONLY', 'unset')"
    assert results_of(box.execute(code, env_vars={"CELL_ONLY": "yes"}))[0].text == "'yes'"
    assert results_of(box.execute(code))[0].text == "'unset'"


def test_keepalive_frames_on_a_quiet_cell(box: Box) -> None:
    request = pb.ExecuteRequest(code="import time\ntime.sleep(2.6)\n'done'")
    with box.open(EXECUTE, request, pb.ExecuteResponse, **{"Keepalive-Ping-Interval": "1"}) as frames:
        messages = [f.message for f in frames]
    keepalives = [m for m in messages if m.WhichOneof("event") is None]
    assert len(keepalives) >= 2 and messages[-1].result.text == "'done'"


def test_disconnect_interrupts_the_cell_and_keeps_state(box: Box) -> None:
    box.execute("kept = 'still here'")
    request = pb.ExecuteRequest(code="print('spinning', flush=True)\nwhile True:\n    pass")
    with box.open(EXECUTE, request, pb.ExecuteResponse) as frames:
        assert frames.next().message.stdout.content == "spinning\n"
    started = time.monotonic()  # the client is gone: the kernel must be interrupted, not left spinning
    assert results_of(box.execute("kept"))[0].text == "'still here'"
    assert time.monotonic() - started < 5


def test_one_cell_at_a_time_per_context(box: Box) -> None:
    request = pb.ExecuteRequest(code="import time\nprint('a', flush=True)\ntime.sleep(1)\na_done = True")
    with box.open(EXECUTE, request, pb.ExecuteResponse) as frames:
        assert frames.next().message.stdout.content == "a\n"
        # A second cell on the same context waits for the first one instead of interleaving with it.
        assert results_of(box.execute("a_done"))[0].text == "True"
        assert list(frames) == [] and frames.ended and frames.error is None  # the first cell had ended


@pytest.mark.parametrize("codec", CODECS, ids=CODEC_IDS)
def test_contexts_are_created_used_and_destroyed(box: Box, codec: connect.Codec) -> None:
    context = box.ok(CREATE, pb.CreateContextRequest(language="python3", cwd="/tmp"), pb.Context, codec)
    assert context.id and context.language == "python" and context.cwd == "/tmp"
    assert context.created_at.seconds > 0
    reply = box.execute("import os\nsecret = 1\nos.getcwd()", codec, context_id=context.id)
    assert results_of(reply)[0].text.endswith("/tmp'")
    # Contexts do not share state with each other or with the default context.
    assert "NameError" in [m.error.name for m in box.execute("secret").messages if m.HasField("error")]
    # A context's own language wins when the request names another.
    assert results_of(box.execute("secret + 1", codec, context_id=context.id, language="r"))[0].text == "2"

    done = box.ok(DESTROY, pb.DestroyContextRequest(context_id=context.id), pb.DestroyContextResponse, codec)
    assert done.success
    reply = box.execute("1", codec, context_id=context.id)
    assert reply.error is not None and reply.error.code == "not_found" and context.id in reply.error.message
    status, body = box.unary(DESTROY, pb.DestroyContextRequest(context_id=context.id), pb.DestroyContextResponse)
    assert status == 404 and body["code"] == "not_found"


def test_unknown_context_and_languages_are_clear_errors(box: Box) -> None:
    reply = box.execute("1", context_id="python-doesnotexist")
    assert reply.error is not None and reply.error.code == "not_found"
    assert reply.error.message == "context python-doesnotexist not found"

    # Which languages run depends on what `jupyter scalebox runtimes install` put on this machine.
    available = default_registry().available()
    reply = box.execute("1", language="cobol")
    assert reply.error is not None and reply.error.code == "invalid_argument"
    assert reply.error.message == f"unknown language 'cobol'; available: {', '.join(available)}"
    for language, name in (("r", "r"), ("JavaScript", "nodejs"), ("deno", "typescript"), ("ijava", "java")):
        if name not in available:
            reply = box.execute("1", language=language)
            assert reply.error is not None and reply.error.code == "invalid_argument"
            assert "is not available on this scalebox-local (" in reply.error.message
            assert f"; available: {', '.join(available)}" in reply.error.message
    status, body = box.unary(CREATE, pb.CreateContextRequest(language="cobol"), pb.Context)
    assert status == 400 and "available: python" in body["message"]
    status, body = box.unary(CREATE, pb.CreateContextRequest(cwd="/no/such/dir"), pb.Context)
    assert status == 400 and "/no/such/dir" in body["message"]
    # Aliases of the one installed language all reach the default context.
    for language in ("", "python", "Python3"):
        assert results_of(box.execute("6 * 7", language=language))[0].text == "42"


def test_kernel_death_is_reported_and_the_context_restarts(box: Box) -> None:
    context = box.ok(CREATE, pb.CreateContextRequest(), pb.Context)
    box.execute("before = 1", context_id=context.id)
    reply = box.execute("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", context_id=context.id)
    [error] = [m.error for m in reply.messages if m.HasField("error")]
    assert error.name == "KernelDied" and "restarted; state was lost" in error.value
    after = box.execute("'before' in globals()", context_id=context.id)
    assert results_of(after)[0].text == "False"
    box.ok(DESTROY, pb.DestroyContextRequest(context_id=context.id), pb.DestroyContextResponse)


def test_a_restarted_server_says_kernel_state_was_lost(server_factory: Callable[..., LocalServer]) -> None:
    server = server_factory()
    with server.client() as http:
        http.timeout = httpx.Timeout(60)
        sandbox = Box(server, http)
        sandbox.execute("x = 1")
        context = sandbox.ok(CREATE, pb.CreateContextRequest(), pb.Context)
    server.stop()
    again = server_factory(data_dir=server.data_dir, api_key=server.api_key)
    with again.client() as http:
        http.timeout = httpx.Timeout(60)
        sandbox.http = http
        sandbox.base = sandbox.base.replace(server.url, again.url)
        reply = sandbox.execute("'x' in globals()")
        assert "restarted (scalebox-local restarted)" in stderr_of(reply)
        assert results_of(reply)[0].text == "False"
        assert stderr_of(sandbox.execute("1")) == ""  # said once
        # A context id from before the restart comes back, empty, and says so too.
        reply = sandbox.execute("1 + 1", context_id=context.id)
        assert "variables from earlier cells are gone" in stderr_of(reply) and results_of(reply)[0].text == "2"
        assert stdout_of(sandbox.execute("print('alive')")) == "alive\n"
        sandbox.kill()
    again.stop()
