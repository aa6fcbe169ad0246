"""A sandbox's own TCP ports through scalebox-local's one port (`get_host` / `get_url`): web servers started in a
real sandbox answer by the path form and the SDKs' Host form, token required; the token never reaches them; a
streamed response streams; WebSockets pass; pausing or killing the sandbox ends its forwarded connections; and
on a server without isolation, the limits (connections, idle time) hold."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from client_support import access_token, config_for
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from scalebox_kernel.client import AsyncSandbox, Sandbox
from scalebox_kernel.client.ports import port_host
from scalebox_kernel.errors import InvalidArgument

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

#: A tornado app (the sandbox's Python runtime has tornado): what reached it, a stream that waits for a marker file
#: between its two chunks, a handler that never answers, and a WebSocket echo.
APP = """
import asyncio, os, sys
import tornado.web, tornado.websocket

class Echo(tornado.web.RequestHandler):
    def get(self):
        self.write({"uri": self.request.uri, "headers": list(self.request.headers.get_all()),
                    "body": len(self.request.body)})
    post = get

class Stream(tornado.web.RequestHandler):
    async def get(self):
        self.write("first\\n")
        await self.flush()
        marker = self.get_argument("marker")
        while not os.path.exists(marker):
            await asyncio.sleep(0.05)
        self.write("second\\n")

class Silent(tornado.web.RequestHandler):
    async def get(self):
        await asyncio.sleep(3600)

class Ws(tornado.websocket.WebSocketHandler):
    def check_origin(self, origin):
        return True
    def select_subprotocol(self, subprotocols):
        return subprotocols[0] if subprotocols else None
    def on_message(self, message):
        self.write_message(message, binary=isinstance(message, bytes))

async def main():
    app = tornado.web.Application([(r"/echo.*", Echo), (r"/stream", Stream), (r"/silent", Silent), (r"/ws", Ws)])
    app.listen(int(sys.argv[1]), "127.0.0.1")
    print("listening", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""
HTTP_SERVER = 8000  # python -m http.server
APP_PORT = 8001  # the tornado app


def token_headers(sandbox: AsyncSandbox) -> dict[str, str]:
    return {"X-Access-Token": access_token(sandbox)}


async def wait_listening(sandbox: AsyncSandbox, port: int, path: str = "/") -> None:
    """Until the sandbox's server on `port` answers through scalebox-local (502 while nothing listens)."""
    async with httpx.AsyncClient(timeout=10) as http:
        for _ in range(300):
            response = await http.get(sandbox.get_url(port, path), headers=token_headers(sandbox))
            if response.status_code != 502:
                return
            await asyncio.sleep(0.1)
    raise AssertionError(f"nothing came to listen on port {port}: {response.text}")


async def start_servers(sandbox: AsyncSandbox, *, http_server: bool = True, app_port: int = APP_PORT) -> None:
    await sandbox.files.write("/home/user/app.py", APP)
    await sandbox.commands.run(f"python3 app.py {app_port}", background=True)  # in the home (also unisolated)
    if http_server:
        await sandbox.files.write("/home/user/site/hello.txt", "hello from the sandbox\n")
        await sandbox.files.make_dir("/home/user/site/sub")
        await sandbox.commands.run(f"cd site && python3 -m http.server {HTTP_SERVER} --bind 127.0.0.1", background=True)
        await wait_listening(sandbox, HTTP_SERVER)
    await wait_listening(sandbox, app_port, "/echo")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sandbox(local_server: Any) -> AsyncIterator[AsyncSandbox]:
    async with await AsyncSandbox.create(config=config_for(local_server)) as sbx:
        await start_servers(sbx)
        yield sbx


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def other(local_server: Any) -> AsyncIterator[AsyncSandbox]:
    async with await AsyncSandbox.create(config=config_for(local_server)) as sbx:
        yield sbx


# ---- addressing --------------------------------------------------------------------------------------------------


async def test_get_host_and_get_url_name_the_path_form(sandbox: AsyncSandbox, local_server: Any) -> None:
    server = httpx.URL(local_server.url)
    host = f"{server.host}:{server.port}"
    assert sandbox.get_host(8000) == f"{host}/sbx/{sandbox.sandbox_id}/port/8000"
    assert sandbox.get_url(8000, "/a?b=1") == f"http://{host}/sbx/{sandbox.sandbox_id}/port/8000/a?b=1"
    with_token = sandbox.get_url(8000, "a", token=True)  # a browser's: the port's own origin
    assert with_token == f"http://8000-{sandbox.sandbox_id}.localhost:{server.port}/a?token={access_token(sandbox)}"
    synchronous = Sandbox(sandbox)  # the sync spelling wraps the same object
    assert synchronous.get_host(8000) == sandbox.get_host(8000)
    assert synchronous.get_url(8000, "a", token=True) == with_token
    assert port_host("sbx-1.example.dev", 8000) == "8000-sbx-1.example.dev"  # a cloud's domain: getHost's form
    for bad in (0, 65536, "80", True):
        with pytest.raises(InvalidArgument, match="TCP port"):
            sandbox.get_host(bad)  # type: ignore[arg-type]


async def test_http_server_answers_by_path_form_and_host_form(sandbox: AsyncSandbox, local_server: Any) -> None:
    async with httpx.AsyncClient(timeout=10, headers=token_headers(sandbox)) as http:
        by_path = await http.get(sandbox.get_url(HTTP_SERVER, "/hello.txt"))
        assert by_path.status_code == 200 and by_path.text == "hello from the sandbox\n"
        # The SDKs' getHost(port) is `${port}-${sandboxDomain}`: that Host on the sandbox's own prefix.
        netloc = httpx.URL(local_server.url).netloc.decode()
        by_host = await http.get(
            f"{local_server.url}/sbx/{sandbox.sandbox_id}/hello.txt", headers={"Host": f"{HTTP_SERVER}-{netloc}"}
        )
        assert by_host.status_code == 200 and by_host.text == "hello from the sandbox\n"
        # http.server redirects a directory to its slash form with an absolute path: kept under the prefix.
        redirect = await http.get(sandbox.get_url(HTTP_SERVER, "/sub"))
        assert redirect.status_code == 301
        assert redirect.headers["location"] == f"/sbx/{sandbox.sandbox_id}/port/{HTTP_SERVER}/sub/"
        bare = await http.get(sandbox.get_url(HTTP_SERVER).rstrip("/"))
        assert bare.status_code == 307 and bare.headers["location"].endswith(f"/port/{HTTP_SERVER}/")


async def test_refused_without_the_sandboxes_token(
    sandbox: AsyncSandbox, other: AsyncSandbox, local_server: Any
) -> None:
    url = sandbox.get_url(HTTP_SERVER, "/hello.txt")
    netloc = httpx.URL(local_server.url).netloc.decode()
    host_form = f"{local_server.url}/sbx/{sandbox.sandbox_id}/hello.txt"
    async with httpx.AsyncClient(timeout=10) as http:
        missing = await http.get(url)
        assert missing.status_code == 401 and "missing token" in missing.json()["message"]
        assert (await http.get(host_form, headers={"Host": f"{HTTP_SERVER}-{netloc}"})).status_code == 401
        # `N-<a host that is not this server's>` is no Host form: a server named 10-0-0-5.example is not port 10.
        foreign = await http.get(
            host_form, headers={"Host": f"{HTTP_SERVER}-10-0-0-5.example", **token_headers(sandbox)}
        )
        assert foreign.status_code != 200 and "hello from the sandbox" not in foreign.text
        wrong = await http.get(url, headers={"X-Access-Token": "not-the-token"})
        assert wrong.status_code == 401 and "invalid token" in wrong.json()["message"]
        assert (await http.get(url, params={"token": "not-the-token"})).status_code == 401
        assert (await http.get(url, headers=token_headers(other))).status_code == 401
        # The other sandbox has its own network: its port 8000 is not this one's.
        elsewhere = await http.get(other.get_url(HTTP_SERVER, "/hello.txt"), headers=token_headers(other))
        assert elsewhere.status_code == 502 and "nothing listens" in elsewhere.json()["message"]
        unknown = await http.get(
            url.replace(sandbox.sandbox_id, "sbx-0000000000000000"), headers=token_headers(sandbox)
        )
        assert unknown.status_code == 404 and unknown.json()["code"] == "sandbox_not_found"


async def test_a_port_nothing_listens_on_is_a_quick_502(sandbox: AsyncSandbox) -> None:
    async with httpx.AsyncClient(timeout=10, headers=token_headers(sandbox)) as http:
        started = time.monotonic()
        response = await http.get(sandbox.get_url(8999, "/"))
        assert response.status_code == 502, response.text
        assert time.monotonic() - started < 2
        assert "nothing listens on port 8999" in response.json()["message"]
        assert (await http.get(sandbox.get_url(8000).replace("/8000/", "/70000/"))).status_code == 400


# ---- what reaches the sandbox's server ---------------------------------------------------------------------------


async def test_the_token_never_reaches_the_sandboxes_server(sandbox: AsyncSandbox, local_server: Any) -> None:
    token = access_token(sandbox)
    url = sandbox.get_url(APP_PORT, f"/echo/x%2Fy?token={token}&token=apps-own&x=1")
    headers = {"X-Access-Token": token, "Authorization": f"token {token}", "Cookie": "app=1"}
    async with httpx.AsyncClient(timeout=10) as http:
        seen = (await http.get(url, headers=headers)).json()
        assert seen["uri"] == "/echo/x%2Fy?token=apps-own&x=1"
        received = {name.lower(): value for name, value in seen["headers"]}
        assert token not in json.dumps(seen)
        assert "x-access-token" not in received and "authorization" not in received
        assert received["cookie"] == "app=1"
        assert received["host"] == httpx.URL(local_server.url).netloc.decode()
        assert received["x-forwarded-prefix"] == f"/sbx/{sandbox.sandbox_id}/port/{APP_PORT}"
        assert received["x-forwarded-proto"] == "http"
        # The app's own Authorization is the app's: it passes.
        mine = await http.get(
            sandbox.get_url(APP_PORT, "/echo"), headers={"X-Access-Token": token, "Authorization": "Bearer app"}
        )
        assert ["Authorization", "Bearer app"] in mine.json()["headers"]

        # A chunked upload arrives whole.
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(3):
                yield b"x" * 70000

        posted = await http.post(
            sandbox.get_url(APP_PORT, "/echo"), content=chunks(), headers={"X-Access-Token": token}
        )
        assert posted.status_code == 200 and posted.json()["body"] == 210000


def by_origin(sandbox: AsyncSandbox, port: int, path: str, *, token: bool = True) -> tuple[str, dict[str, str]]:
    """The URL and Host header of `get_url(port, path, token=True)` for a client that cannot resolve
    `*.localhost` (browsers do): the request goes to 127.0.0.1 with the origin's Host."""
    url = httpx.URL(sandbox.get_url(port, path, token=token))
    assert url.host.endswith(".localhost")
    return str(url.copy_with(host="127.0.0.1")), {"Host": f"{url.host}:{url.port}"}


async def test_a_token_url_sets_a_cookie_of_the_ports_own_origin_only(
    sandbox: AsyncSandbox, other: AsyncSandbox
) -> None:
    token = access_token(sandbox)
    async with httpx.AsyncClient(timeout=10) as http:
        url, host = by_origin(sandbox, APP_PORT, "/echo?x=1")
        first = await http.get(url, headers={**host, "Referer": f"http://elsewhere/?token={token}"})
        assert first.status_code == 307 and first.headers["location"] == "/echo?x=1"  # the token out of the URL
        cookie = first.headers["set-cookie"]
        assert "Path=/;" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
        name_value = cookie.split(";", 1)[0]
        base = url.split("/echo", 1)[0]
        later = await http.get(
            base + "/echo?x=1", headers={**host, "Cookie": f"{name_value}; app=2", "Referer": f"{base}/?token={token}"}
        )
        assert later.status_code == 200
        seen = later.json()
        assert seen["uri"] == "/echo?x=1"  # the origin is the app's: no prefix
        received = {name.lower(): value for name, value in seen["headers"]}
        assert received["cookie"] == "app=2" and "referer" not in received and "x-forwarded-prefix" not in received
        assert token not in json.dumps(seen)
        # Another sandbox's origin does not take this sandbox's cookie.
        _, other_host = by_origin(other, APP_PORT, "/echo")
        stolen = await http.get(base + "/echo", headers={**other_host, "Cookie": name_value})
        assert stolen.status_code == 401 and "invalid token" in stolen.json()["message"]
        # On the shared origin (the path form) a token URL works once, and sets no cookie.
        shared = await http.get(sandbox.get_url(APP_PORT, f"/echo?token={token}"))
        assert shared.status_code == 200 and "set-cookie" not in shared.headers


async def test_https_on_the_same_port(sandbox: AsyncSandbox, local_server_tls: Any) -> None:
    verify = ssl.create_default_context(cafile=local_server_tls.certfile)
    async with httpx.AsyncClient(timeout=10, verify=verify, headers=token_headers(sandbox)) as https:
        response = await https.get(sandbox.get_url(APP_PORT, "/echo").replace("http://", "https://", 1))
        assert response.status_code == 200
        assert ["X-Forwarded-Proto", "https"] in response.json()["headers"]
        url, host = by_origin(sandbox, APP_PORT, "/echo")
        visit = await https.get(url.replace("http://", "https://", 1), headers=host)
        assert visit.status_code == 307 and "; Secure" in visit.headers["set-cookie"]


async def test_a_streamed_response_arrives_chunk_by_chunk(sandbox: AsyncSandbox) -> None:
    marker = "/tmp/stream-go"
    url = sandbox.get_url(APP_PORT, f"/stream?marker={marker}")
    async with (
        httpx.AsyncClient(timeout=15, headers=token_headers(sandbox)) as http,
        http.stream("GET", url) as response,
    ):
        assert response.status_code == 200
        assert response.headers.get("transfer-encoding") == "chunked"
        chunks = response.aiter_raw()
        # The second chunk waits for the marker, which is written only once the first arrived: a buffering
        # forwarder would never deliver the first (and the read times out).
        assert await anext(chunks) == b"first\n"
        await sandbox.files.write(marker, "")
        rest = b"".join([chunk async for chunk in chunks])
        assert rest == b"second\n"


async def test_websocket_frames_pass_both_ways(sandbox: AsyncSandbox) -> None:
    url = sandbox.get_url(APP_PORT, "/ws").replace("http://", "ws://", 1)
    async with connect(url, additional_headers=token_headers(sandbox), subprotocols=["chat"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "chat"
        await ws.send("hello")
        assert await ws.recv() == "hello"
        await ws.send(b"\x00\x01binary")
        assert await ws.recv() == b"\x00\x01binary"
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url):
            pass
    assert refused.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as not_there:  # a plain HTTP answer is passed back as it came
        async with connect(url.replace("/ws", "/nowhere"), additional_headers=token_headers(sandbox)):
            pass
    assert not_there.value.response.status_code == 404


# ---- the sandbox's life ------------------------------------------------------------------------------------------


async def test_pause_and_kill_end_forwarded_connections(local_server: Any) -> None:
    sbx = await AsyncSandbox.create(config=config_for(local_server))
    try:
        await start_servers(sbx, http_server=False)
        async with httpx.AsyncClient(timeout=20, headers=token_headers(sbx)) as http:
            for end, status in ((sbx.pause, 409), (sbx.kill, 404)):
                async with http.stream("GET", sbx.get_url(APP_PORT, "/stream?marker=/tmp/never")) as response:
                    chunks = response.aiter_raw()
                    assert await anext(chunks) == b"first\n"
                    started = time.monotonic()
                    await end()
                    with pytest.raises(httpx.RemoteProtocolError):  # cut short, not a complete answer
                        async for _ in chunks:
                            pass
                    assert time.monotonic() - started < 10
                after = await http.get(sbx.get_url(APP_PORT, "/echo"))
                assert after.status_code == status, after.text
                if status == 409:
                    assert after.json()["code"] == "sandbox_paused"
                    await sbx.resume()
                    await wait_listening(sbx, APP_PORT, "/echo")
    finally:
        await sbx.close()


# ---- limits, and a server without isolation ----------------------------------------------------------------------


@pytest.mark.slow
async def test_limits_hold_and_unisolated_ports_are_the_hosts(server_factory: Any) -> None:
    server = server_factory(
        extra=["--no-isolation", "--ServerSettings.port_max_connections=2", "--ServerSettings.port_idle_timeout=2"]
    )
    with socket.socket() as probe:  # without isolation the sandbox's server listens on the host's loopback
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with await AsyncSandbox.create(config=config_for(server)) as sbx:
        await start_servers(sbx, http_server=False, app_port=port)
        async with httpx.AsyncClient(timeout=20, headers=token_headers(sbx)) as http:
            started = time.monotonic()
            silent = await http.get(sbx.get_url(port, "/silent"))
            assert silent.status_code == 504 and "no answer within 2 s" in silent.json()["message"]
            assert time.monotonic() - started < 6
            url = sbx.get_url(port, "/stream?marker=/tmp/never")
            async with http.stream("GET", url) as one, http.stream("GET", url) as two:
                assert one.status_code == two.status_code == 200
                third = await http.get(sbx.get_url(port, "/echo"))
                assert third.status_code == 503 and "port_max_connections" in third.json()["message"]
            # The clients left: their slots come back as soon as the server has seen them go.
            for _ in range(50):
                if (await http.get(sbx.get_url(port, "/echo"))).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the slots of closed connections were not given back")
