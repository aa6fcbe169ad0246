"""The client's own HTTP/1.1 transport (client/http11.py, h11 on asyncio) against a loopback peer
that answers with exact bytes: keep-alive reuse, every way a response body can be delimited, bytes split anywhere,
flow control on big bodies, TLS, and the malformed answers it must refuse (as the httpx errors the client already
handles) rather than misread or hang on."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import psutil
import pytest
from client_support import config_for
from conftest import LocalServer

from scalebox_kernel.client import Sandbox
from scalebox_kernel.client.http11 import MAX_HEAD, Http11Transport
from scalebox_kernel.server.tls import ensure_self_signed

Answer = Callable[[bytes], bytes | list[bytes]]


class Peer:
    """A loopback server reading whole requests and answering each with `answer(request)`: bytes, or a list of
    pieces written one by one with a pause between them (so they arrive as separate reads)."""

    def __init__(self, answer: Answer, *, close_after: bool = False) -> None:
        self.answer = answer
        self.close_after = close_after
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()  # a client connection ended (EOF from the client)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed.set()
                    return
                request = head + await _read_body(reader, head)
                self.requests.append(request)
                reply = self.answer(request)
                for piece in reply if isinstance(reply, list) else [reply]:
                    writer.write(piece)
                    await writer.drain()
                    if isinstance(reply, list):
                        await asyncio.sleep(0.01)
                if self.close_after:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed.set()
        except asyncio.CancelledError:  # the test is over; asyncio would log a cancelled handler as an error
            pass
        finally:
            writer.close()


async def _read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    lower = head.lower()
    if b"content-length:" in lower:
        return await reader.readexactly(int(lower.split(b"content-length:")[1].split(b"\r\n")[0]))
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            line = await reader.readuntil(b"\r\n")
            body += line
            size = int(line.split(b";")[0], 16)
            body += await reader.readexactly(size + 2)
            if size == 0:
                return body
    return b""


@asynccontextmanager
async def peer(
    answer: Answer, *, close_after: bool = False, tls: tuple[Path, Path] | None = None
) -> AsyncIterator[tuple[Peer, httpx.AsyncClient, str]]:
    """A Peer on a free port (HTTPS with the `tls` certificate and key), and a client trusting that certificate."""
    server = Peer(answer, close_after=close_after)
    server_tls = client_tls = None
    if tls is not None:
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(*tls)
        client_tls = ssl.create_default_context(cafile=str(tls[0]))
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=server_tls)
    port = listener.sockets[0].getsockname()[1]
    client = httpx.AsyncClient(transport=Http11Transport(client_tls or ssl.create_default_context()), timeout=5.0)
    try:
        yield server, client, f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        await client.aclose()
        listener.close()
        await listener.wait_closed()


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return ensure_self_signed(tmp_path_factory.mktemp("tls"))


def ok(body: bytes, *headers: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\n"
        + b"".join(h + b"\r\n" for h in headers)
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


def chunked(*chunks: bytes, trailer: bytes = b"") -> bytes:
    body = b"".join(b"%x;ext=1\r\n" % len(c) + c + b"\r\n" for c in chunks)
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n" + trailer + b"\r\n"


async def test_keep_alive_reuses_one_connection_and_sends_one_write() -> None:
    async with peer(lambda request: ok(b"hello")) as (server, client, url):
        for _ in range(5):
            response = await client.post(url + "/x", content=b"abc", headers={"X-Token": "t"})
            assert response.status_code == 200 and response.content == b"hello"
            assert response.http_version == "HTTP/1.1" and response.reason_phrase == "OK"
    assert server.connections == 1
    assert server.requests[0].startswith(b"POST /x HTTP/1.1\r\n") and server.requests[0].endswith(b"\r\n\r\nabc")
    assert b"\r\nX-Token: t\r\n" in server.requests[0] and b"\r\nContent-Length: 3\r\n" in server.requests[0]


async def test_chunked_body_with_extensions_and_trailers_split_byte_by_byte() -> None:
    whole = chunked(b"first ", b"second", b"x" * 70000, trailer=b"X-Trailer: 1\r\n")
    async with peer(lambda request: [whole[i : i + 1] for i in range(200)] + [whole[200:]]) as (server, client, url):
        response = await client.get(url)
        assert response.content == b"first second" + b"x" * 70000
        assert (await client.get(url)).content == response.content
    assert server.connections == 1


async def test_body_until_close_and_connection_close_are_not_reused() -> None:
    async with peer(lambda request: b"HTTP/1.1 200 OK\r\n\r\nto the end", close_after=True) as (server, client, url):
        assert (await client.get(url)).content == b"to the end"
        assert (await client.get(url)).content == b"to the end"
    assert server.connections == 2
    async with peer(lambda request: ok(b"bye", b"Connection: close"), close_after=True) as (server, client, url):
        assert (await client.get(url)).content == b"bye"
        assert (await client.get(url)).content == b"bye"
    assert server.connections == 2


async def test_bodiless_answers_and_informational_responses() -> None:
    def answer(request: bytes) -> bytes:
        if request.startswith(b"HEAD"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"  # the length of what GET would send
        if b"/empty" in request:
            return b"HTTP/1.1 204 No Content\r\n\r\n"
        return b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"after 100")

    async with peer(answer) as (server, client, url):
        head = await client.head(url)
        assert head.status_code == 200 and head.content == b""
        assert (await client.get(url + "/empty")).status_code == 204
        response = await client.get(url)
        assert response.status_code == 200 and response.content == b"after 100"
    assert server.connections == 1


async def test_chunked_request_body() -> None:
    async def parts() -> AsyncIterator[bytes]:
        for part in (b"one", b"", b"two"):
            yield part

    async with peer(lambda request: ok(b"")) as (server, client, url):
        await client.post(url, content=parts())
    assert server.requests[0].endswith(b"\r\n\r\n3\r\none\r\n3\r\ntwo\r\n0\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in server.requests[0]


async def test_big_body_arrives_whole_while_reading_slowly() -> None:
    body = bytes(range(256)) * 40000  # 10 MB, far above what a connection buffers
    async with peer(lambda request: ok(body)) as (server, client, url):
        received = bytearray()
        async with client.stream("GET", url) as response:
            async for piece in response.aiter_raw():
                received += piece
                await asyncio.sleep(0)
        assert bytes(received) == body
        assert (await client.get(url)).content == body
    assert server.connections == 1


async def test_a_response_closed_early_drops_its_connection() -> None:
    async with peer(lambda request: chunked(b"a")[:-5]) as (server, client, url):  # the last chunk never comes
        async with client.stream("GET", url) as response:
            async for _ in response.aiter_raw():
                break
        await asyncio.wait_for(server.closed.wait(), 5)  # the server saw the client go (an interrupt, for the agent)


@pytest.mark.parametrize("loop_saw_it", [True, False])
async def test_idle_connection_closed_by_the_server_is_not_reused(loop_saw_it: bool) -> None:
    async with peer(lambda request: ok(b"once"), close_after=True) as (server, client, url):
        assert (await client.get(url)).content == b"once"
        # The server closes its end while the connection sits in the pool; the loop either handles that first,
        # or is busy (a blocking sleep) and has not, so only the socket knows.
        await asyncio.sleep(0.2) if loop_saw_it else time.sleep(0.2)
        assert (await client.get(url)).content == b"once"
    assert server.connections == 2


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (b"", "Server disconnected without sending a response"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "in the middle of the response head"),
        (b"SPDY/3 200 OK\r\n\r\n", "illegal status line"),
        (b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n", "illegal header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\nabc", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "Transfer-Encoding: chunked is supported"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "illegal chunk header"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n", "malformed chunk footer"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "without sending complete message body"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "received 3 bytes, expected 10"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "SWITCH_UPGRADE"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"x" * (3 * MAX_HEAD) + b"\r\n\r\n", "Receive buffer too long"),
    ],
    ids=[
        "nothing",
        "half-a-head",
        "not-http",
        "space-in-name",
        "two-lengths",
        "gzip-transfer",
        "bad-chunk-size",
        "chunk-too-long",
        "cut-chunk",
        "cut-body",
        "upgrade",
        "huge-head",
    ],
)
async def test_malformed_answers_are_protocol_errors(reply: bytes, expected: str) -> None:
    async with peer(lambda request: reply, close_after=True) as (_, client, url):
        with pytest.raises(httpx.RemoteProtocolError) as caught:
            await client.get(url)
    assert expected in str(caught.value), caught.value


async def test_a_header_that_would_split_the_request_is_refused_unsent() -> None:
    async with peer(lambda request: ok(b"")) as (server, client, url):
        with pytest.raises(httpx.LocalProtocolError):
            await client.get(url, headers={"X-Token": "a\r\nX-Injected: 1"})
    assert server.requests == []


async def test_read_and_connect_failures_are_httpx_errors() -> None:
    async with peer(lambda request: [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", b""]) as (_, client, url):
        with pytest.raises(httpx.ReadTimeout):
            await client.get(url, timeout=httpx.Timeout(5.0, read=0.3))
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    async with httpx.AsyncClient(transport=Http11Transport(ssl.create_default_context())) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}")


async def test_https_reuses_its_connection_and_checks_the_certificate(tls_pair: tuple[Path, Path]) -> None:
    async with peer(lambda request: chunked(b"secure"), tls=tls_pair) as (server, client, url):
        for _ in range(3):
            assert (await client.get(url)).content == b"secure"
    assert server.connections == 1
    async with peer(lambda request: ok(b""), tls=tls_pair) as (_, _client, url):
        untrusting = httpx.AsyncClient(transport=Http11Transport(ssl.create_default_context()))
        async with untrusting:
            with pytest.raises(httpx.ConnectError) as caught:
                await untrusting.get(url)
        assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)


async def test_a_closed_transport_keeps_nothing_and_sends_nothing() -> None:
    async with peer(lambda request: ok(b"late")) as (server, client, url):
        async with client.stream("GET", url) as response:
            await client.aclose()  # while the response is still being read
            assert await response.aread() == b"late"
        await asyncio.wait_for(server.closed.wait(), 5)  # its connection was dropped, not put back in the pool
        with pytest.raises(RuntimeError, match="has been closed"):
            await client.get(url)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_run_code_reuses_one_connection(local_server: LocalServer, scheme: str) -> None:
    """Each cell's stream is read to its end, so the next cell goes out on the same kept-alive connection (a new
    TCP and TLS handshake per cell used to cost a third of a trivial cell)."""
    url = local_server.url.replace("http://", f"{scheme}://", 1)
    port = int(url.rsplit(":", 1)[1])
    sandbox = Sandbox.create(config=config_for(dataclasses.replace(local_server, url=url)))

    def to_server() -> set[int]:
        return {c.laddr.port for c in psutil.Process().net_connections("tcp") if c.raddr and c.raddr.port == port}

    try:
        assert sandbox.run_code("1 + 1").text == "2"
        first = to_server()
        for _ in range(5):
            assert sandbox.run_code("1 + 1").text == "2"
        assert len(first) == 1 and to_server() == first
    finally:
        sandbox.kill()
        sandbox.close()


async def test_an_early_answer_to_a_big_upload_is_read() -> None:
    """A server may refuse a body it will not take (413) before reading it, and close: that answer is the
    response, not a write error."""

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big!")
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(transport=Http11Transport(ssl.create_default_context()), timeout=10) as client:
            response = await client.post(f"http://127.0.0.1:{port}/upload", content=b"x" * (64 * 1024 * 1024))
        assert response.status_code == 413 and response.content == b"too big!"
    finally:
        listener.close()
        await listener.wait_closed()
