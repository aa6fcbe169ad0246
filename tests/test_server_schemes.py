"""One port, both schemes: the default scalebox-local answers HTTP and HTTPS on its one port (issue 12), with the
certificate it made once in its data dir, and keeps serving whatever a connection opens with."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from client_support import access_token, config_for
from conftest import LocalServer
from jupyter_support import Frontend, of_type, ws_url

from scalebox_kernel.client import AsyncSandbox

REGIONS = "/v1/scalebox-regions"


def _https(server: LocalServer) -> str:
    return server.url.replace("http://", "https://", 1)


def _port(server: LocalServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _regions(base: str, server: LocalServer, **kwargs: Any) -> httpx.Response:
    with httpx.Client(base_url=base, headers={"X-API-KEY": server.api_key}, timeout=10, **kwargs) as http:
        return http.get(REGIONS)


def test_default_server_answers_both_schemes_with_its_certificate(local_server: LocalServer) -> None:
    assert local_server.url.startswith("http://127.0.0.1:")  # the default: no --tls
    assert local_server.certfile is not None
    cert = Path(local_server.certfile)
    assert cert.parent == local_server.data_dir / "tls" and cert.is_file()
    info = json.loads((local_server.runtime_dir / "scalebox-local.json").read_text())
    assert info["certfile"] == str(cert)  # the runtime file names it for SSL_CERT_FILE / NODE_EXTRA_CA_CERTS

    trusted = ssl.create_default_context(cafile=str(cert))
    assert _regions(local_server.url, local_server).status_code == 200
    assert _regions(_https(local_server), local_server, verify=trusted).status_code == 200
    # Alternating schemes on the port, each on a fresh connection, never confuses the two.
    for _ in range(5):
        assert _regions(_https(local_server), local_server, verify=trusted).status_code == 200
        assert _regions(local_server.url, local_server).status_code == 200


def test_curl_both_schemes(local_server: LocalServer) -> None:
    assert local_server.certfile
    header = f"X-API-KEY: {local_server.api_key}"  # curl reads -H @file only in newer versions; argv is ours here
    for base, extra in ((local_server.url, []), (_https(local_server), ["--cacert", local_server.certfile])):
        done = subprocess.run(
            ["curl", "-sS", "--max-time", "10", "-H", header, *extra, base + REGIONS],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["data"]["scalebox_regions"][0]["id"] == "local"
    # Without the certificate curl refuses the handshake, as it should.
    done = subprocess.run(
        ["curl", "-sS", "--max-time", "10", _https(local_server) + REGIONS], capture_output=True, text=True
    )
    assert done.returncode == 60, done.stderr


def test_untrusting_clients_and_odd_first_bytes_leave_the_server_serving(local_server: LocalServer) -> None:
    port = _port(local_server)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        _regions(_https(local_server), local_server)  # the system store does not know the self-signed cert
    sockets = []
    try:
        # Silent connections (a browser's spare ones), a broken handshake, garbage, and a half-closed socket.
        for _ in range(20):
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        for opening in (b"\x16\x03\x01\x00\x05hello", b"\x00\x01\x02garbage\r\n\r\n", b"\x16"):
            raw = socket.create_connection(("127.0.0.1", port), timeout=5)
            raw.sendall(opening)
            sockets.append(raw)
        closed = socket.create_connection(("127.0.0.1", port), timeout=5)
        closed.shutdown(socket.SHUT_WR)
        sockets.append(closed)
        started = time.monotonic()
        trusted = ssl.create_default_context(cafile=local_server.certfile)
        assert _regions(local_server.url, local_server).status_code == 200
        assert _regions(_https(local_server), local_server, verify=trusted).status_code == 200
        assert time.monotonic() - started < 5  # nothing above held the accept loop
        # The garbage got an HTTP 400 or a closed connection, never a hang.
        garbage = sockets[21]
        garbage.settimeout(10)
        answer = garbage.recv(100)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer
    finally:
        for sock in sockets:
            sock.close()


def test_plain_http_to_a_tls_only_client_fails_fast(local_server: LocalServer) -> None:
    """The reverse mistake: a TLS client pointed at the port gets TLS, a plain client gets plain; a plain request
    is never answered with TLS records (and so never looks like a hang)."""
    with socket.create_connection(("127.0.0.1", _port(local_server)), timeout=10) as raw:
        raw.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert raw.recv(12).startswith(b"HTTP/1.1 ")


async def test_https_sandbox_and_its_jupyter_channels_over_wss(local_server_tls: LocalServer) -> None:
    """A sandbox reached by https:// gets an https agent, and its Jupyter endpoint works over wss://."""
    assert local_server_tls.url.startswith("https://")
    async with await AsyncSandbox.create(config=config_for(local_server_tls)) as sbx:
        execution = await sbx.run_code("6 * 7")
        assert execution.text == "42"
        endpoint = sbx.jupyter()
        assert endpoint.base_url.startswith("https://")
        token = access_token(sbx)
        trusted = ssl.create_default_context(cafile=local_server_tls.certfile)
        async with httpx.AsyncClient(
            base_url=endpoint.base_url, headers={"Authorization": f"token {token}"}, verify=trusted, timeout=60
        ) as rest:
            kernel = (await rest.post("/api/kernels", json={"name": "python3"})).json()
        frontend = await Frontend.open(ws_url(endpoint.base_url, kernel["id"]), token, ssl=trusted)
        try:
            msg_id = await frontend.execute("print('over wss')")
            messages = await frontend.until(msg_id)
            assert any(m["content"].get("text") == "over wss\n" for m in of_type(messages, "stream"))
        finally:
            await asyncio.wait_for(frontend.close(), 10)


def _spki_sha256(certfile: str) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    cert = x509.load_pem_x509_certificate(Path(certfile).read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    return base64.b64encode(digest.finalize()).decode()


@pytest.mark.browser
def test_a_browser_gets_both_schemes(local_server: LocalServer) -> None:
    """Chromium, trusting exactly scalebox-local's key (not ignoring certificate errors), loads both schemes."""
    from browser_support import CHROMIUM, CHROMIUM_ARGS
    from playwright.sync_api import sync_playwright

    assert local_server.certfile
    trust = f"--ignore-certificate-errors-spki-list={_spki_sha256(local_server.certfile)}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, trust], timeout=60_000)
        try:
            page = browser.new_page(extra_http_headers={"X-API-KEY": local_server.api_key})
            for base in (_https(local_server), local_server.url):
                response = page.goto(base + REGIONS, timeout=30_000)
                assert response is not None and response.status == 200, base
                assert json.loads(response.text())["data"]["scalebox_regions"][0]["id"] == "local"
        finally:
            browser.close()
