"""Each sandbox's Jupyter endpoint on a real scalebox-local: the kernels REST API, the WebSocket channels in both
framings, one state shared with run_code, messages passed unchanged, auth, a dropped client resumed, and the
socket closed with a reason when the sandbox is killed."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from client_support import access_token, config_for
from jupyter_support import Frontend, of_type, stdout, ws_url
from websockets.exceptions import ConnectionClosed, InvalidStatus

from scalebox_kernel.client import AsyncSandbox
from scalebox_kernel.protocol import jupyter_ws
from scalebox_kernel.protocol.jupyter_ws import WireMessage

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sandbox(local_server: Any) -> AsyncIterator[AsyncSandbox]:
    async with await AsyncSandbox.create(config=config_for(local_server)) as sbx:
        yield sbx


def rest(sandbox: AsyncSandbox, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"token {token if token is not None else access_token(sandbox)}"}
    return httpx.AsyncClient(base_url=sandbox.jupyter().base_url, headers=headers, timeout=60)


async def python_kernel(sandbox: AsyncSandbox) -> str:
    context = await sandbox.create_code_context("python")
    return context.id


# ---- REST ------------------------------------------------------------------------------------------------------------


async def test_kernelspecs_and_kernel_lifecycle(sandbox: AsyncSandbox) -> None:
    async with rest(sandbox) as http:
        specs = (await http.get("/api/kernelspecs")).json()
        assert specs["default"] == "python" and "python" in specs["kernelspecs"]
        assert specs["kernelspecs"]["python"]["spec"]["language"] == "python"
        created = await http.post("/api/kernels", json={"name": "python3"})
        assert created.status_code == 201, created.text
        model = created.json()
        assert model["name"] == "python" and model["execution_state"] in ("idle", "starting", "busy")
        kernel_id = model["id"]
        assert kernel_id in [k["id"] for k in (await http.get("/api/kernels")).json()]
        assert (await http.get(f"/api/kernels/{kernel_id}")).json()["id"] == kernel_id
        assert (await http.post(f"/api/kernels/{kernel_id}/interrupt")).status_code == 204
        assert (await http.post(f"/api/kernels/{kernel_id}/restart")).status_code == 200
        assert (await http.delete(f"/api/kernels/{kernel_id}")).status_code == 204
        missing = await http.get(f"/api/kernels/{kernel_id}")
        assert missing.status_code == 404 and missing.json()["code"] == "kernel_not_found"
        unknown = await http.post("/api/kernels", json={"name": "cobol"})
        assert unknown.status_code == 404 and "cobol" in unknown.json()["message"]
        bad = await http.post("/api/kernels", content=b"{nope")
        assert bad.status_code == 400


async def test_only_this_sandboxes_token_is_accepted(sandbox: AsyncSandbox, local_server: Any) -> None:
    async with await AsyncSandbox.create(config=config_for(local_server)) as other:
        http = rest(sandbox, token=access_token(other))
        assert (await http.get("/api/kernels")).status_code == 403
        await http.aclose()
    async with httpx.AsyncClient(base_url=sandbox.jupyter().base_url) as http:
        host = httpx.URL(sandbox.jupyter().base_url).netloc.decode()
        as_the_sdks_name_it = {"Host": f"32000-{host}", "Authorization": f"token {access_token(sandbox)}"}
        assert (await http.get("/api/kernels", headers=as_the_sdks_name_it)).status_code == 200
        missing = await http.get("/api/kernels")
        assert missing.status_code == 401 and "token" in missing.json()["message"]
        by_query = await http.get("/api/kernels", params={"token": access_token(sandbox)})
        assert by_query.status_code == 200
    kernel_id = await python_kernel(sandbox)
    with pytest.raises(InvalidStatus) as refused:
        await Frontend.open(ws_url(sandbox.jupyter().base_url, kernel_id), token="wrong")
    assert refused.value.response.status_code == 403
    frontend = await Frontend.open(ws_url(sandbox.jupyter().base_url, kernel_id, token=access_token(sandbox)))
    await frontend.close()
    assert access_token(sandbox) not in local_server.log_text()  # the URL with ?token= is never logged as it is


# ---- channels -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v1", [True, False], ids=["v1", "default-framing"])
async def test_one_state_whichever_door(sandbox: AsyncSandbox, v1: bool) -> None:
    context = await sandbox.create_code_context("python")
    frontend = await Frontend.open(ws_url(sandbox.jupyter().base_url, context.id), access_token(sandbox), v1=v1)
    try:
        assert frontend.subprotocol == (jupyter_ws.V1_SUBPROTOCOL if v1 else None)
        await frontend.until(await frontend.execute("from_notebook = 41"))
        execution = await sandbox.run_code("from_notebook + 1", context=context)
        assert execution.text == "42"
        await sandbox.run_code("from_sdk = 'sdk'", context=context)
        messages = await frontend.until(await frontend.execute("print(from_sdk)"))
        assert stdout(messages) == "sdk\n"
        reply = of_type(messages, "execute_reply")[0]["content"]
        assert reply["status"] == "ok" and reply["execution_count"] >= 3  # the kernel's own count, both doors
    finally:
        await frontend.close()


async def test_messages_pass_unchanged(sandbox: AsyncSandbox) -> None:
    kernel_id = await python_kernel(sandbox)
    frontend = await Frontend.open(ws_url(sandbox.jupyter().base_url, kernel_id), access_token(sandbox))
    try:
        code = (
            "from IPython.display import display, clear_output\n"
            "for i in range(3):\n    clear_output(wait=True)\n    print(i)\n"
            "h = display('a', display_id=True)\nh.update('b')\n"
        )
        messages = await frontend.until(await frontend.execute(code))
        assert len(of_type(messages, "clear_output")) == 3
        update = of_type(messages, "update_display_data")[0]["content"]
        assert update["data"]["text/plain"] == "'b'" and update["transient"]["display_id"]
        complete = await frontend.until(
            await frontend.send("shell", "complete_request", {"code": "import os; os.pa", "cursor_pos": 16})
        )
        assert "path" in of_type(complete, "complete_reply")[0]["content"]["matches"]  # before `import os` ran
        info = await frontend.until(await frontend.send("shell", "kernel_info_request", {}))
        assert of_type(info, "kernel_info_reply")[0]["content"]["language_info"]["name"] == "python"
        # stdin: the kernel asks, the frontend answers on the stdin channel
        ask = await frontend.execute("answer = input('name? ')\nprint('hi', answer)", allow_stdin=True)
        request = None
        for _ in range(50):
            message = await frontend.receive()
            if message["channel"] == "stdin":
                request = message
                break
        assert request is not None and request["content"]["prompt"] == "name? "
        await frontend.send("stdin", "input_reply", {"value": "ada"})
        assert stdout(await frontend.until(ask)) == "hi ada\n"
        # comms with binary buffers, both ways
        setup = (
            "def target(comm, msg):\n"
            "    @comm.on_msg\n"
            "    def echo(msg):\n"
            "        comm.send({'n': len(msg['buffers'][0])}, buffers=[bytes(msg['buffers'][0])[::-1]])\n"
            "get_ipython().kernel.comm_manager.register_target('echo', target)\n"
        )
        await frontend.until(await frontend.execute(setup))
        await frontend.until(
            await frontend.send("shell", "comm_open", {"comm_id": "c1", "target_name": "echo", "data": {}}), reply=False
        )
        sent = await frontend.send("shell", "comm_msg", {"comm_id": "c1", "data": {}}, buffers=[b"\x00\x01\x02\xff"])
        echoed = of_type(await frontend.until(sent, reply=False), "comm_msg")
        assert echoed[0]["content"]["data"] == {"n": 4} and echoed[0]["buffers"] == [b"\xff\x02\x01\x00"]
    finally:
        await frontend.close()


async def test_a_dropped_client_gets_what_the_kernel_said_meanwhile(sandbox: AsyncSandbox) -> None:
    kernel_id = await python_kernel(sandbox)
    url = ws_url(sandbox.jupyter().base_url, kernel_id, session_id="resume-me")
    first = await Frontend.open(url, access_token(sandbox))
    cell = await first.execute("import time\nprint('before', flush=True)\ntime.sleep(1.5)\nprint('after')")
    while stdout([await first.receive()]) != "before\n":
        pass
    first.ws.transport.abort()  # no close handshake: as a network blip looks to the server
    await asyncio.sleep(2.5)  # the cell ends while nobody listens
    second = await Frontend.open(url, access_token(sandbox))
    try:
        messages = await second.until(cell)
        assert "after\n" in stdout(messages)
        assert of_type(messages, "execute_reply")[0]["content"]["status"] == "ok"
    finally:
        await second.close()


async def test_kill_closes_the_socket_with_a_reason(local_server: Any) -> None:
    sandbox = await AsyncSandbox.create(config=config_for(local_server))
    kernel_id = await python_kernel(sandbox)
    frontend = await Frontend.open(ws_url(sandbox.jupyter().base_url, kernel_id), access_token(sandbox))
    await sandbox.kill()
    with pytest.raises(ConnectionClosed) as closed:
        for _ in range(100):
            await frontend.receive(timeout=30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4004
    assert "killed" in closed.value.rcvd.reason
    await sandbox.close()


async def test_bad_frames_are_dropped_and_the_socket_keeps_serving(sandbox: AsyncSandbox) -> None:
    kernel_id = await python_kernel(sandbox)
    frontend = await Frontend.open(ws_url(sandbox.jupyter().base_url, kernel_id), access_token(sandbox))
    try:
        for junk in (
            b"",
            b"\xff" * 100,
            struct.pack("<Q", 10**6),
            jupyter_ws.encode_v1(WireMessage("iopub", [b"{}"] * 4)),
        ):
            await frontend.ws.send(junk)
        await frontend.ws.send("not a v1 frame")
        assert stdout(await frontend.until(await frontend.execute("print('still here')"))) == "still here\n"
    finally:
        await frontend.close()
