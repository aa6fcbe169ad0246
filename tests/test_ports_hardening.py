"""What a sandbox's server cannot do through the shared origin of the port route, and what forwarding does not let
through: cookies and service workers stay under the port's prefix; a WebSocket message over the forwarding limit
closes that WebSocket with 1009 and nothing else; a body framed both by chunks and a Content-Length goes on by its
chunks; a connection made while the sandbox pauses does not outlive the pause; and a signed file URL means one
path, one operation and one user."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from client_support import access_token, config_for
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from scalebox_kernel.client import AsyncSandbox
from scalebox_kernel.protocol.signature import sign
from scalebox_kernel.server.isolation import JailError
from scalebox_kernel.server.isolation.sandbox import SandboxIsolation
from scalebox_kernel.server.port_proxy import WS_MAX_MESSAGE
from scalebox_kernel.server.settings import ServerSettings

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

APP_PORT = 8101  # tornado: cookies, a service worker script, an echo of the request, WebSockets
RAW_PORT = 8102  # a raw server whose answer has both Transfer-Encoding and Content-Length
BIG = WS_MAX_MESSAGE + 1024

APP = f"""
import asyncio, json
import tornado.web, tornado.websocket

class Cookies(tornado.web.RequestHandler):
    def get(self):
        self.add_header("Set-Cookie", "wide=1; Domain=localhost; Path=/; HttpOnly")
        self.add_header("Set-Cookie", "app=2; Path=/app")
        self.add_header("Set-Cookie", "plain=3")
        self.set_header("Service-Worker-Allowed", "/")
        self.write("ok")

class Worker(tornado.web.RequestHandler):
    def get(self):
        self.set_header("Content-Type", "text/javascript")
        self.write("self.addEventListener('fetch', () => {{}});")

class Echo(tornado.web.RequestHandler):
    def post(self):
        self.write({{"body": self.request.body.decode(), "headers": list(self.request.headers.get_all())}})

class Ws(tornado.websocket.WebSocketHandler):
    def check_origin(self, origin):
        return True
    def on_message(self, message):
        if message == "big":
            self.write_message(b"x" * {BIG}, binary=True)
        else:
            self.write_message(message, binary=isinstance(message, bytes))

async def raw(reader, writer):
    await reader.readuntil(b"\\r\\n\\r\\n")
    writer.write(b"HTTP/1.1 200 OK\\r\\nTransfer-Encoding: chunked\\r\\nContent-Length: 3\\r\\n"
                 b"Connection: close\\r\\n\\r\\nb\\r\\nhello world\\r\\n0\\r\\n\\r\\n")
    await writer.drain()
    writer.close()

async def main():
    app = tornado.web.Application([(r"/cookies", Cookies), (r"/sw.js", Worker), (r"/echo", Echo), (r"/ws", Ws)],
                                  websocket_max_message_size={2 * BIG})
    app.listen({APP_PORT}, "127.0.0.1")
    await asyncio.start_server(raw, "127.0.0.1", {RAW_PORT})
    await asyncio.Event().wait()

asyncio.run(main())
"""


def token_headers(sandbox: AsyncSandbox) -> dict[str, str]:
    return {"X-Access-Token": access_token(sandbox)}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sandbox(local_server: Any) -> AsyncIterator[AsyncSandbox]:
    async with await AsyncSandbox.create(config=config_for(local_server)) as sbx:
        await sbx.files.write("/home/user/hardening.py", APP)
        await sbx.commands.run("python3 hardening.py", background=True)
        async with httpx.AsyncClient(timeout=10, headers=token_headers(sbx)) as http:
            for _ in range(300):
                if (await http.get(sbx.get_url(APP_PORT, "/cookies"))).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the sandbox's app did not come to listen")
        yield sbx


# ---- 1. the shared origin -------------------------------------------------------------------------------------


async def test_cookies_and_service_workers_stay_under_the_ports_prefix(sandbox: AsyncSandbox) -> None:
    prefix = f"/sbx/{sandbox.sandbox_id}/port/{APP_PORT}"
    async with httpx.AsyncClient(timeout=10, headers=token_headers(sandbox)) as http:
        response = await http.get(sandbox.get_url(APP_PORT, "/cookies"))
        assert response.status_code == 200
        assert "service-worker-allowed" not in response.headers
        cookies = {c.split("=", 1)[0]: c for c in response.headers.get_list("set-cookie")}
        assert cookies["wide"] == f"wide=1; HttpOnly; Path={prefix}"  # no Domain, and not the whole origin
        assert cookies["app"] == f"app=2; Path={prefix}/app"  # the app's own path, under the prefix
        assert cookies["plain"] == f"plain=3; Path={prefix}"

        # A service worker's scope would be the whole origin, every sandbox's ports included.
        worker = await http.get(sandbox.get_url(APP_PORT, "/sw.js"), headers={"Service-Worker": "script"})
        assert worker.status_code == 403
        message = worker.json()["message"]
        assert "service worker" in message and "every sandbox" in message
        assert f"get_url({APP_PORT}, token=True)" in message
        assert (await http.get(sandbox.get_url(APP_PORT, "/sw.js"))).status_code == 200  # a plain fetch of it


async def test_a_sandboxs_own_origin_keeps_its_headers(sandbox: AsyncSandbox) -> None:
    """On the port's own origin (`<port>-<id>.localhost`, what a browser is given) the app's cookies and
    service workers are its own: nothing is rewritten."""
    url = httpx.URL(sandbox.get_url(APP_PORT, "/cookies", token=True))
    host = {"Host": f"{url.host}:{url.port}"}
    async with httpx.AsyncClient(timeout=10, headers=token_headers(sandbox)) as http:
        response = await http.get(str(url.copy_with(host="127.0.0.1", query=None)), headers=host)
        assert response.status_code == 200
        cookies = {c.split("=", 1)[0]: c for c in response.headers.get_list("set-cookie")}
        assert cookies["wide"] == "wide=1; Domain=localhost; Path=/; HttpOnly"
        assert cookies["app"] == "app=2; Path=/app" and cookies["plain"] == "plain=3"
        assert response.headers.get("service-worker-allowed") == "/"
        worker = await http.get(
            str(url.copy_with(host="127.0.0.1", path="/sw.js", query=None)),
            headers={**host, "Service-Worker": "script"},
        )
        assert worker.status_code == 200


# ---- 2. WebSocket messages over the limit -------------------------------------------------------------------------


async def test_a_websocket_message_over_the_limit_closes_with_1009(sandbox: AsyncSandbox) -> None:
    url = sandbox.get_url(APP_PORT, "/ws").replace("http://", "ws://", 1)
    headers = token_headers(sandbox)
    async with connect(url, additional_headers=headers, max_size=None) as ws:
        await ws.send("small")
        assert await ws.recv() == "small"
        await ws.send("big")  # the sandbox answers with a message over the limit
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    async with connect(url, additional_headers=headers, max_size=None) as ws:  # the other way round
        await ws.send(b"y" * BIG)
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    async with connect(url, additional_headers=headers) as ws:  # the server and the sandbox's app go on
        await ws.send("again")
        assert await ws.recv() == "again"


# ---- 3. conflicting lengths ---------------------------------------------------------------------------------------


async def test_chunks_win_over_a_content_length_both_ways(sandbox: AsyncSandbox, local_server: Any) -> None:
    url = httpx.URL(local_server.url)
    request = (
        f"POST /sbx/{sandbox.sandbox_id}/port/{APP_PORT}/echo HTTP/1.1\r\n"
        f"Host: {url.host}:{url.port}\r\nX-Access-Token: {access_token(sandbox)}\r\n"
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        "b\r\nhello world\r\n0\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 20)
    finally:
        writer.close()
    head, _, _ = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b'"body": "hello world"' in answer
    assert b'"Content-Length", "5"' not in answer  # the app never heard of the conflicting length

    async with httpx.AsyncClient(timeout=10, headers=token_headers(sandbox)) as http:
        response = await http.get(sandbox.get_url(RAW_PORT, "/"))
        assert response.status_code == 200 and response.text == "hello world"
        assert response.headers.get("content-length") in (None, "11")


# ---- 4. a connection under way while the sandbox pauses -----------------------------------------------------------


async def test_a_connection_in_flight_at_a_pause_does_not_survive_it(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    isolation = SandboxIsolation(
        ServerSettings(isolation="none"), sandbox_id="sbx-test", root=tmp_path / "root", private_dir=tmp_path / "p"
    )
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        # Fill the accept queue: the next connect waits for its SYN to be retried, i.e. stays under way.
        waiting = [socket.create_connection(("127.0.0.1", port), timeout=5)]  # backlog 0 holds one
        try:
            connecting = asyncio.create_task(isolation.connect_port(port, 10))
            await asyncio.sleep(0.2)
            assert not connecting.done()
            await isolation.freeze()
            for _ in waiting:  # room again: the retried SYN gets through
                listener.settimeout(5)
                listener.accept()[0].close()
            with pytest.raises(JailError, match="pausing or stopping"):
                await connecting
            with pytest.raises(JailError):  # and none while paused
                await isolation.connect_port(port, 5)
            listener.accept()[0].close()  # the one that was under way came through, and was closed at once
            await isolation.thaw()
            sock = await isolation.connect_port(port, 5)
            sock.close()
        finally:
            for other in waiting:
                other.close()


# ---- 5. signed file URLs ------------------------------------------------------------------------------------------


async def test_a_signed_url_is_for_one_path_operation_and_user(sandbox: AsyncSandbox) -> None:
    token = access_token(sandbox)
    await sandbox.files.write("/home/user/etc/app.conf", "the relative one\n")
    async with httpx.AsyncClient(timeout=10) as http:
        upload = httpx.URL(sandbox.upload_url("/d/x"))
        # A read signature for "/d/x:write:eve" as a write of "/d/x" by "eve:read:root": the same signed text.
        forged = upload.copy_with(
            params={
                "path": "/d/x",
                "username": "eve:read:root",
                "signature": sign("/d/x:write:eve", "read", "root", token),
            }
        )
        refused = await http.post(forged, files={"file": ("x", b"owned")})
        assert refused.status_code == 401 and "cannot contain ':'" in refused.json()["message"]
        assert not await sandbox.files.exists("/d/x")
        fine = await http.post(sandbox.upload_url("/home/user/up.txt"), files={"file": ("up.txt", b"up")})
        assert fine.status_code == 200, fine.text

        # A signature for /etc/app.conf does not read etc/app.conf (that is /home/user/etc/app.conf).
        download = httpx.URL(sandbox.download_url("/etc/app.conf"))
        relative = download.copy_with(params={**dict(download.params), "path": "etc/app.conf"})
        assert (await http.get(relative)).status_code == 401
        # The URLs the SDK makes still work: the URL path drops the slash of the absolute path it signed.
        assert (await http.get(download)).status_code != 401
        relative_url = await http.get(sandbox.download_url("etc/app.conf"))
        assert relative_url.status_code == 200 and relative_url.text == "the relative one\n"
        absolute = httpx.URL(sandbox.download_url("/home/user/etc/app.conf"))
        assert (await http.get(absolute)).text == "the relative one\n"
