"""scalebox-local's control plane (/v1) against a real server: shapes, status codes, timeouts, persistence."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import uvicorn
import wire
from conftest import LocalServer
from cryptography import x509
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from scalebox_kernel.protocol import pb
from scalebox_kernel.server.app import CatchAll
from scalebox_kernel.server.metrics import sandbox_processes
from scalebox_kernel.server.store import SandboxStore
from scalebox_kernel.server.tls import ensure_self_signed

PY_CREATE_BODY = {
    "template": "code-interpreter",
    "allow_internet_access": True,
    "auto_pause": False,
    "env_vars": {},
    "metadata": {},
    "secure": False,
    "timeout": 300,
    "object_storage": None,
    "net_proxy_country": None,
}


def create(http: httpx.Client, **fields: Any) -> dict[str, Any]:
    r = http.post("/v1/sandboxes", json={**PY_CREATE_BODY, **fields})
    assert r.status_code == 201, r.text
    return r.json()["data"]


def status_of(http: httpx.Client, sandbox_id: str) -> str:
    r = http.get(f"/v1/sandboxes/{sandbox_id}")
    assert r.status_code == 200, r.text
    return r.json()["data"]["status"]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def assert_error(r: httpx.Response, status: int, *needles: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body["error"], str) and body["message"] == body["error"]
    for needle in needles:
        assert needle in body["error"], body
    return body


def test_regions_and_api_key(local_server: LocalServer, http: httpx.Client) -> None:
    r = http.get("/v1/scalebox-regions")
    assert r.status_code == 200
    assert r.json() == {"success": True, "data": {"scalebox_regions": [{"id": "local", "name": "scalebox-local"}]}}
    with httpx.Client(base_url=local_server.url) as anon:
        assert_error(anon.get("/v1/scalebox-regions"), 401, "X-API-KEY or as Authorization: Bearer")
        assert_error(anon.get("/v1/sandboxes", headers={"X-API-KEY": "wrong"}), 401, "invalid API key")
        # The JS SDK sends SCALEBOX_ACCESS_TOKEN as a bearer token when it has no API key.
        bearer = anon.get("/v1/sandboxes", headers={"Authorization": f"Bearer {local_server.api_key}"})
        assert bearer.status_code == 200, bearer.text
        assert_error(anon.get("/v1/sandboxes", headers={"Authorization": "Bearer wrong"}), 401, "Authorization")
        assert_error(anon.get("/v1/sandboxes", headers={"Authorization": f"Basic {local_server.api_key}"}), 401)
        # The Python SDK's instance calls add `Authorization: Bearer root`: never a substitute for the key.
        assert_error(anon.get("/v1/sandboxes", headers={"Authorization": "Bearer root"}), 401)
        # A wrong X-API-KEY is not rescued by a right bearer token.
        both = {"X-API-KEY": "wrong", "Authorization": f"Bearer {local_server.api_key}"}
        assert_error(anon.get("/v1/sandboxes", headers=both), 401, "X-API-KEY")
        ok = anon.get("/v1/sandboxes", headers={"Authorization": "Bearer root", "X-API-KEY": local_server.api_key})
        assert ok.status_code == 200
    assert_error(http.get("/v1/no-such-thing"), 404, "no such endpoint")
    assert http.get("/health").status_code == 200


def test_create_get_list_kill(local_server: LocalServer, http: httpx.Client) -> None:
    tag = secrets.token_hex(4)
    data = create(http, metadata={"tag": tag, "who": "a b=c&d"}, env_vars={"GREETING": "hi"})
    sid = data["sandbox_id"]
    assert data["template_id"] == "code-interpreter"
    assert data["sandbox_domain"] == f"{local_server.url.split('://')[1]}/sbx/{sid}"
    assert len(data["envd_access_token"]) >= 32
    assert data["status"] == "running" and data["envdVersion"] and data["clientID"]
    assert data["timeout"] == 300 and data["metadata"] == {"tag": tag, "who": "a b=c&d"}
    assert data["env_vars"] == {"GREETING": "hi"}
    assert data["cpu_count"] >= 1 and data["memory_mb"] >= 1
    assert isinstance(data["isolation"], dict) and "mode" in data["isolation"]
    created, end = datetime.fromisoformat(data["created_at"]), datetime.fromisoformat(data["end_at"])
    assert 299 <= (end - created).total_seconds() <= 301
    assert (local_server.data_dir / "sandboxes" / sid / "root").is_dir()

    got = http.get(f"/v1/sandboxes/{sid}").json()
    assert got["data"]["sandbox_id"] == sid and got["data"]["envd_access_token"] == data["envd_access_token"]
    assert got["metadata"] == {"tag": tag, "who": "a b=c&d"}  # where the Python SDK reads it
    assert got["data"]["status"] == "running" and isinstance(got["data"]["uptime"], int)

    # The Python SDK url-encodes the metadata filter into one parameter.
    listed = http.get("/v1/sandboxes", params={"status": "running", "metadata": urlencode({"who": "a b=c&d"})}).json()
    assert [s["sandbox_id"] for s in listed["data"]["sandboxes"]] == [sid]
    item = listed["data"]["sandboxes"][0]
    assert {"sandbox_id", "template_id", "status", "cpu_count", "memory_mb", "started_at"} <= item.keys()
    assert listed["data"]["pagination"]["total"] == 1
    none = http.get("/v1/sandboxes", params={"metadata": urlencode({"tag": tag, "who": "x"})}).json()
    assert none["data"]["sandboxes"] == []

    r = http.delete(f"/v1/sandboxes/{sid}", params={"force": "true"})
    assert r.status_code == 200 and r.json()["data"]["status"] == "terminated"
    assert not (local_server.data_dir / "sandboxes" / sid).exists()
    body = assert_error(http.get(f"/v1/sandboxes/{sid}"), 404, sid, "not found")
    assert "expired" not in body["error"]
    assert_error(http.delete(f"/v1/sandboxes/{sid}"), 404)
    assert_error(http.get("/v1/sandboxes/sbx-unknown"), 404, "sandbox sbx-unknown not found")
    running = http.get("/v1/sandboxes", params={"metadata": f"tag={tag}"}).json()["data"]["sandboxes"]
    assert running == []
    gone = http.get("/v1/sandboxes", params={"status": "terminated", "metadata": f"tag={tag}"}).json()
    assert [s["status"] for s in gone["data"]["sandboxes"]] == ["terminated"]


def test_pagination(http: httpx.Client) -> None:
    tag = secrets.token_hex(4)
    ids = [create(http, metadata={"page-tag": tag})["sandbox_id"] for _ in range(3)]
    try:
        meta = f"page-tag={tag}"

        def page(**params: Any) -> dict[str, Any]:
            r = http.get("/v1/sandboxes", params={"metadata": meta, **params})
            assert r.status_code == 200, r.text
            return r.json()["data"]

        first = page(limit=2, page=1)
        assert [s["sandbox_id"] for s in first["sandboxes"]] == ids[:2]
        assert first["pagination"] == {"page": 1, "limit": 2, "total": 3, "total_pages": 2, "offset": 0}
        second = page(page_size=2, page=2)
        assert [s["sandbox_id"] for s in second["sandboxes"]] == ids[2:]
        assert second["pagination"]["offset"] == 2 and second["pagination"]["page"] == 2
        assert [s["sandbox_id"] for s in page(limit=1, offset=1)["sandboxes"]] == [ids[1]]
        assert [s["sandbox_id"] for s in page(limit=1, skip=2)["sandboxes"]] == [ids[2]]
        assert page(limit=5, page=3)["sandboxes"] == []
        assert_error(http.get("/v1/sandboxes", params={"page": "0"}), 400, "page")
        assert_error(http.get("/v1/sandboxes", params={"limit": "x"}), 400, "limit")
        assert_error(http.get("/v1/sandboxes", params={"status": "sleeping"}), 400, "sleeping")
    finally:
        for sid in ids:
            http.delete(f"/v1/sandboxes/{sid}")


def test_timeout_extends_shortens_and_expires(local_server: LocalServer, http: httpx.Client) -> None:
    sid = create(http, timeout=2)["sandbox_id"]
    r = http.post(f"/v1/sandboxes/{sid}/timeout", json={"timeout": 30})
    assert r.status_code == 200 and r.json()["data"]["timeout"] == 30
    time.sleep(2.5)
    assert status_of(http, sid) == "running"  # extended past its first 2 s
    r = http.put(f"/v1/sandboxes/{sid}/timeout", json={"timeout": 1})  # OpenAPI's PUT works too
    assert r.status_code == 200
    wait_for(lambda: http.get(f"/v1/sandboxes/{sid}").status_code == 404)
    body = assert_error(http.get(f"/v1/sandboxes/{sid}"), 404, "expired at", "its state is gone")
    assert body["code"] == "sandbox_expired"
    wait_for(lambda: not (local_server.data_dir / "sandboxes" / sid).exists())  # expired at once, cleaned soon
    assert_error(http.post(f"/v1/sandboxes/{sid}/timeout", json={"timeout": 10}), 404, "expired")
    assert_error(http.post(f"/v1/sandboxes/{sid}/connect", json={"timeout": 10}), 404, "expired")


def test_pause_connect_and_auto_pause(http: httpx.Client) -> None:
    sid = create(http, timeout=60)["sandbox_id"]
    try:
        assert http.post(f"/v1/sandboxes/{sid}/pause").status_code == 200
        assert status_of(http, sid) == "paused"
        assert_error(http.post(f"/v1/sandboxes/{sid}/pause"), 409, "already paused")
        # While paused the clock does not run out.
        assert http.post(f"/v1/sandboxes/{sid}/timeout", json={"timeout": 1}).status_code == 200
        time.sleep(1.5)
        assert status_of(http, sid) == "paused"
        r = http.post(f"/v1/sandboxes/{sid}/connect", json={"timeout": 120})
        assert r.status_code == 200 and r.json()["data"]["status"] == "running"
        assert r.json()["data"]["envd_access_token"] and r.json()["data"]["timeout"] == 120
        # A running sandbox: a shorter timeout changes nothing, a longer one extends it; JS sends no body.
        assert http.post(f"/v1/sandboxes/{sid}/connect", json={"timeout": 5}).json()["data"]["timeout"] == 120
        assert http.post(f"/v1/sandboxes/{sid}/connect", json={"timeout": 200}).json()["data"]["timeout"] == 200
        assert http.post(f"/v1/sandboxes/{sid}/connect").status_code == 200
        assert http.post(f"/v1/sandboxes/{sid}/pause", json={"is_async": True}).status_code == 200
        r = http.post(f"/v1/sandboxes/{sid}/resume")  # the deprecated alias of connect
        assert r.status_code == 200 and r.json()["data"]["status"] == "running"
    finally:
        http.delete(f"/v1/sandboxes/{sid}")
    assert_error(http.post("/v1/sandboxes/sbx-nope/pause"), 404)
    assert_error(http.post("/v1/sandboxes/sbx-nope/connect", json={"timeout": 10}), 404)

    auto = create(http, timeout=1, auto_pause=True)["sandbox_id"]
    try:
        wait_for(lambda: status_of(http, auto) == "paused")
        r = http.post(f"/v1/sandboxes/{auto}/connect", json={"timeout": 30})
        assert r.status_code == 200 and status_of(http, auto) == "running"
    finally:
        http.delete(f"/v1/sandboxes/{auto}")


def test_metrics_are_measured(local_server: LocalServer, http: httpx.Client) -> None:
    data = create(http)
    sid = data["sandbox_id"]
    try:
        blob = local_server.data_dir / "sandboxes" / sid / "root" / "home" / "user" / "blob.bin"
        blob.write_bytes(secrets.token_bytes(2 * 1024 * 1024))
        base = wire.agent_base(local_server.url, data["sandbox_domain"])
        code = "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass\nprint('spun')"
        with httpx.Client(timeout=60) as agent_http:
            reply = wire.stream(
                agent_http,
                base,
                "sandboxagent.ExecutionService/Execute",
                pb.ExecuteRequest(code=code, language="python"),
                pb.ExecuteResponse,
                data["envd_access_token"],
            )
        assert reply.error is None and any(m.stdout.content == "spun\n" for m in reply.messages)
        body = http.get(f"/v1/sandboxes/{sid}/metrics").json()["data"]
        sample = body["metrics"][0]
        for key in ("cpu_count", "cpu_used_pct", "disk_total", "disk_used", "mem_total", "mem_used", "timestamp"):
            assert body[key] == sample[key]  # JS reads the flat fields, Python the list
        assert sample["cpu_count"] == data["cpu_count"]
        assert sample["mem_total"] == data["memory_mb"] * 1024 * 1024
        assert sample["mem_used"] > 10 * 1024 * 1024  # the Python kernel that just ran
        assert 2 * 1024 * 1024 <= sample["disk_used"] < sample["disk_total"]
        assert 0 <= sample["cpu_used_pct"] <= 100
        datetime.fromisoformat(sample["timestamp"])
    finally:
        http.delete(f"/v1/sandboxes/{sid}")


def test_bad_input_is_rejected_and_server_keeps_serving(local_server: LocalServer, http: httpx.Client) -> None:
    json_headers = {"Content-Type": "application/json"}
    assert_error(http.post("/v1/sandboxes", content=b"{not json", headers=json_headers), 400, "not valid JSON")
    assert_error(http.post("/v1/sandboxes", json=[1, 2]), 400, "JSON object")
    assert_error(http.post("/v1/sandboxes", json={"timeout": "long"}), 400, "timeout")
    assert_error(http.post("/v1/sandboxes", json={"timeout": 0}), 400, "timeout")
    assert_error(http.post("/v1/sandboxes", json={"timeout": 10**9}), 400, "timeout")
    assert_error(http.post("/v1/sandboxes", json={"metadata": {"n": 1}}), 400, "metadata.n")
    assert_error(http.post("/v1/sandboxes", json={"env_vars": "A=1"}), 400, "env_vars")
    assert_error(http.post("/v1/sandboxes", json={"auto_pause": "yes"}), 400, "auto_pause")
    assert_error(http.post("/v1/sandboxes", json={"template": 7}), 400, "template")
    assert_error(http.post("/v1/sandboxes", json={"object_storage": [{"uri": "s3://b"}]}), 400, "object_storage")
    big = b'{"metadata": {"k": "' + b"x" * (2 * 1024 * 1024) + b'"}}'
    assert_error(http.post("/v1/sandboxes", content=big, headers=json_headers), 413, "larger than")

    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"x" * 65536

    assert_error(http.post("/v1/sandboxes", content=chunks(), headers=json_headers), 413)  # chunked, no length

    sid = create(http)["sandbox_id"]
    try:
        assert_error(http.post(f"/v1/sandboxes/{sid}/timeout", content=b"]", headers=json_headers), 400, "JSON")
        assert_error(http.post(f"/v1/sandboxes/{sid}/timeout", json={}), 400, "timeout is required")
        assert_error(http.post(f"/v1/sandboxes/{sid}/timeout", json={"timeout": -5}), 400, "timeout")
        assert_error(http.post(f"/v1/sandboxes/{sid}/connect", json={"timeout": "soon"}), 400, "timeout")
        assert status_of(http, sid) == "running"  # none of that changed anything
    finally:
        http.delete(f"/v1/sandboxes/{sid}")
    assert_error(http.delete("/v1/sandboxes"), 405)
    assert http.get("/v1/scalebox-regions").status_code == 200
    assert local_server.process.poll() is None
    assert local_server.api_key not in local_server.log_text()


@pytest.mark.timeout(120)
def test_sandboxes_survive_a_restart(server_factory: Callable[..., LocalServer], tmp_path: Path) -> None:
    data_dir = tmp_path / "restart"
    api_key = "restart-" + secrets.token_hex(8)
    first = server_factory(data_dir=data_dir, api_key=api_key)
    with first.client() as http:
        kept = create(http, metadata={"role": "kept"})
        paused = create(http, metadata={"role": "paused"})
        short = create(http, timeout=3)
        base = wire.agent_base(first.url, kept["sandbox_domain"])
        r = http.post(
            f"{base}/upload",
            files={"file": ("/home/user/keep.txt", b"still here")},
            data={"path": "/home/user/keep.txt"},
            headers={"X-Access-Token": kept["envd_access_token"], "Authorization": "Bearer root"},
        )
        assert r.status_code < 300, r.text
        assert http.post(f"/v1/sandboxes/{paused['sandbox_id']}/pause").status_code == 200
    first.stop()
    assert first.process.returncode == 0
    for box in (kept, paused):  # SIGTERM stopped every kernel and command of every sandbox
        assert sandbox_processes(data_dir / "sandboxes" / box["sandbox_id"] / "root") == {}
    time.sleep(3)  # `short` runs out while the server is down

    second = server_factory(data_dir=data_dir, api_key=api_key)
    assert second.url != first.url or second.process.pid != first.process.pid
    with second.client() as http:
        listed = {s["sandbox_id"]: s["status"] for s in http.get("/v1/sandboxes").json()["data"]["sandboxes"]}
        assert listed == {kept["sandbox_id"]: "running", paused["sandbox_id"]: "paused"}
        again = http.get(f"/v1/sandboxes/{kept['sandbox_id']}").json()["data"]
        assert again["envd_access_token"] == kept["envd_access_token"]
        assert_error(http.get(f"/v1/sandboxes/{short['sandbox_id']}"), 404, "expired")
        base = wire.agent_base(second.url, again["sandbox_domain"])
        headers = {"X-Access-Token": kept["envd_access_token"], "Authorization": "Bearer root"}
        r = http.get(f"{base}/download/home/user/keep.txt", headers=headers)
        assert r.status_code == 200 and r.content == b"still here"
        with httpx.Client(timeout=60) as agent_http:
            reply = wire.stream(
                agent_http,
                base,
                "sandboxagent.ExecutionService/Execute",
                pb.ExecuteRequest(code="print('after restart')"),
                pb.ExecuteResponse,
                kept["envd_access_token"],
            )
        stderr = "".join(m.stderr.content for m in reply.messages)
        assert "scalebox-local restarted" in stderr and "gone" in stderr
        assert any(m.stdout.content == "after restart\n" for m in reply.messages)
        r = http.post(f"/v1/sandboxes/{paused['sandbox_id']}/connect", json={"timeout": 60})
        assert r.status_code == 200 and r.json()["data"]["status"] == "running"
        for sid in (kept["sandbox_id"], paused["sandbox_id"]):
            assert http.delete(f"/v1/sandboxes/{sid}").status_code == 200
    second.stop()


def test_serve_refuses_public_address_without_key_and_never_prints_generated_key(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "scalebox_kernel", "serve", "--port", "0", "--data-dir", str(tmp_path / "d")]
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
    refused = subprocess.run([*base, "--ip", "0.0.0.0"], env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "--api-key" in refused.stderr
    assert not (tmp_path / "runtime" / "scalebox-local.json").exists()

    proc = subprocess.Popen([*base, "--ip", "127.0.0.1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        runtime = tmp_path / "runtime" / "scalebox-local.json"
        wait_for(runtime.exists, timeout=60)
        info = json.loads(runtime.read_text())
        assert info["pid"] == proc.pid and info["url"].startswith("http://127.0.0.1:") and len(info["api_key"]) >= 32
        assert oct(runtime.stat().st_mode & 0o777) == "0o600"
        with httpx.Client(base_url=info["url"], headers={"X-API-KEY": info["api_key"]}) as client:
            assert client.get("/v1/scalebox-regions").status_code == 200
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0
    assert info["url"] in output and "isolation" in output and str(runtime) in output
    assert info["api_key"] not in output
    assert not runtime.exists()  # removed on shutdown


def test_self_signed_certificate(tmp_path: Path) -> None:
    cert_path, key_path = ensure_self_signed(tmp_path)
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    loopback = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    assert set(san.get_values_for_type(x509.IPAddress)) == loopback
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert ensure_self_signed(tmp_path) == (cert_path, key_path)
    assert x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number == cert.serial_number  # reused


# ---- validation at the edge, errors on a kept connection, the reaper's back-off ---------------------------------


class OneConnection:
    """An HTTP client held to one connection, counting every new one it had to open."""

    def __init__(self, server: LocalServer) -> None:
        self.opened = 0
        self.http = httpx.Client(
            base_url=server.url,
            headers={"X-API-KEY": server.api_key},
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            timeout=httpx.Timeout(60),
        )

    def _trace(self, event: str, info: Any) -> None:
        if event == "connection.connect_tcp.complete":
            self.opened += 1

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.http.request(method, url, extensions={"trace": self._trace}, **kwargs)


def _sandbox_dirs(server: LocalServer) -> set[str]:
    root = server.data_dir / "sandboxes"
    return set(os.listdir(root)) if root.exists() else set()


def _listed(http: httpx.Client) -> set[str]:
    sandboxes = http.get("/v1/sandboxes", params={"status": "running,paused"}).json()["data"]["sandboxes"]
    return {s["sandbox_id"] for s in sandboxes}


DEEP = b"[" * 100_000 + b"]" * 100_000
#: (create body, the words the 400 must have): each was a 500, an orphan or accepted before.
BAD_CREATES: list[tuple[Any, tuple[str, ...]]] = [
    ({"memory_mb": -5}, ("memory_mb", "64")),
    (b'{"memory_mb": 1e23}', ("memory_mb",)),
    ({"memory_mb": 2**63}, ("memory_mb",)),
    ({"memory_mb": 10**15}, ("memory_mb",)),
    ({"memory_mb": 63}, ("memory_mb",)),
    ({"cpu_count": 10**30}, ("cpu_count",)),
    ({"cpu_count": -3}, ("cpu_count",)),
    ({"cpu_count": 1.5}, ("cpu_count", "integer")),
    ({"timeout": 2**63}, ("timeout",)),
    (b'{"timeout": 1e23}', ("timeout",)),
    (b'{"timeout": NaN}', ("timeout", "integer")),
    ({"disk_mb": 8}, ("disk_mb", "16")),
    ({"storage_gb": 10**6}, ("storage_gb",)),
    ({"storage_gb": 1, "disk_mb": 2048}, ("disk_mb or storage_gb",)),
    ({"env_vars": {"A-B": "1"}}, ("A-B", "environment variable name")),
    ({"env_vars": {"A B": "1"}}, ("environment variable name",)),
    ({"env_vars": {"A": "x\x00"}}, ("env_vars.A", "NUL")),
    ({"env_vars": {"__SCALEBOX_ENV_0": "x"}}, ("reserved",)),
    ({"metadata": {"k": "v\x00"}}, ("metadata.k", "NUL")),
    ({"metadata": {str(i): "v" for i in range(300)}}, ("metadata", "256")),
    ({"template": "t" * 200}, ("template",)),
    ({"secure": 1}, ("secure", "true or false")),
    ({"auto_pause": "true"}, ("auto_pause",)),
    ({"is_async": "no"}, ("is_async",)),
    ({"locality": "local"}, ("locality",)),
    (b'{"metadata": {"k": "\\ud800"}}', ("Unicode",)),
    (b'{"metadata": ' + DEEP + b"}", ("deeper than 32",)),
    (DEEP, ("deeper than 32",)),
]


def test_create_fields_are_checked_before_anything_is_created(local_server: LocalServer, http: httpx.Client) -> None:
    dirs, listed = _sandbox_dirs(local_server), _listed(http)
    for body, needles in BAD_CREATES:
        if isinstance(body, bytes):
            r = http.post("/v1/sandboxes", content=body, headers={"Content-Type": "application/json"})
        else:
            r = http.post("/v1/sandboxes", json=body)
        assert_error(r, 400, *needles)
    assert_error(http.post("/v1/sandboxes", json={"locality": {"force": True, "region": "mars"}}), 409, "mars")
    assert _sandbox_dirs(local_server) == dirs and _listed(http) == listed  # no orphan, not even a directory

    sid = create(http)["sandbox_id"]
    try:
        for suffix in ("connect", "timeout"):
            assert_error(http.post(f"/v1/sandboxes/{sid}/{suffix}", content=DEEP), 400, "deeper than 32")
            assert_error(http.post(f"/v1/sandboxes/{sid}/{suffix}", json={"timeout": 2**63}), 400, "timeout")
        assert_error(http.get("/v1/sandboxes", params={"limit": "9" * 5000}), 400, "limit")
        assert_error(http.get("/v1/sandboxes", params={"page": "²"}), 400, "page")
        assert status_of(http, sid) == "running"
    finally:
        http.delete(f"/v1/sandboxes/{sid}")
    assert "Traceback" not in local_server.log_text()


def test_disk_mb_and_its_alias_storage_gb_are_carried_and_shown(http: httpx.Client) -> None:
    by_alias = create(http, storage_gb=1, memory_mb=256.0)  # a JSON 256.0 is the integer 256
    by_name = create(http, disk_mb=64, cpu_count=1)
    try:
        assert by_alias["disk_mb"] == 1024 and by_alias["memory_mb"] == 256
        assert by_name["disk_mb"] == 64 and by_name["cpu_count"] == 1
        assert http.get(f"/v1/sandboxes/{by_name['sandbox_id']}").json()["data"]["disk_mb"] == 64
        listed = http.get("/v1/sandboxes").json()["data"]["sandboxes"]
        shown = {s["sandbox_id"]: (s["disk_mb"], s["problem"]) for s in listed}
        assert shown[by_alias["sandbox_id"]] == (1024, None) and shown[by_name["sandbox_id"]] == (64, None)
    finally:
        for data in (by_alias, by_name):
            http.delete(f"/v1/sandboxes/{data['sandbox_id']}")


def test_older_databases_get_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "scalebox-local.db"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE sandboxes (sandbox_id TEXT PRIMARY KEY, template TEXT NOT NULL, token TEXT NOT NULL, "
        "created_at REAL NOT NULL, timeout INTEGER NOT NULL, end_at REAL NOT NULL, state TEXT NOT NULL, "
        "metadata TEXT NOT NULL DEFAULT '{}', envs TEXT NOT NULL DEFAULT '{}', auto_pause INTEGER NOT NULL DEFAULT 0, "
        "allow_internet_access INTEGER NOT NULL DEFAULT 1, secure INTEGER NOT NULL DEFAULT 0, "
        "cpu_count INTEGER NOT NULL DEFAULT 2, memory_mb INTEGER NOT NULL DEFAULT 2048, "
        "reason TEXT NOT NULL DEFAULT '', paused_at REAL, ended_at REAL)"
    )
    old.execute(
        "INSERT INTO sandboxes (sandbox_id, template, token, created_at, timeout, end_at, state) "
        "VALUES ('sbx-old', 'base', 't', 1.0, 300, 301.0, 'paused')"
    )
    old.commit()
    old.close()
    store = SandboxStore(path)
    (record,) = store.load_all()
    assert (record.sandbox_id, record.disk_mb, record.problem) == ("sbx-old", None, "")
    record.disk_mb, record.problem = 512, "could not expire it"
    store.save(record)
    store.close()
    again = SandboxStore(path)  # opening twice adds nothing twice
    (reloaded,) = again.load_all()
    assert (reloaded.disk_mb, reloaded.problem) == (512, "could not expire it")
    again.close()


def test_errors_keep_the_keep_alive_connection(local_server: LocalServer) -> None:
    client = OneConnection(local_server)
    with client.http:
        failures = [
            ("POST", "/v1/sandboxes", {"content": DEEP}),  # was a 500 that dropped the connection
            ("POST", "/v1/sandboxes", {"content": b'{"memory_mb": 1e23}'}),
            ("POST", "/v1/sandboxes/sbx-missing/timeout", {"content": DEEP}),
            ("GET", "/v1/sandboxes/sbx-missing/metrics", {}),
            ("GET", "/v1/no-such-thing", {}),
            ("DELETE", "/v1/sandboxes", {}),
            ("POST", "/v1/sandboxes", {"content": b"x" * (2 * 1024 * 1024)}),
        ]
        for method, url, kwargs in failures:
            r = client.request(method, url, **kwargs)
            assert 400 <= r.status_code < 500 and "error" in r.json(), r.text
            assert client.request("GET", "/v1/scalebox-regions").status_code == 200
    assert client.opened == 1


def test_an_unexpected_exception_is_a_json_500_that_keeps_the_connection() -> None:
    """The catch-all middleware of the server's app, on a real uvicorn, with handlers that fail."""
    secret = "/srv/secret/host/path token=s3cr3t"

    async def boom(request: Request) -> Response:
        raise RuntimeError(secret)

    async def half(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"first part"
            raise RuntimeError(secret)

        return StreamingResponse(body())

    async def ok(request: Request) -> Response:
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[Route("/boom", boom), Route("/half", half), Route("/ok", ok)], middleware=[Middleware(CatchAll)]
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off", http="h11", ws="none"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started)
        opened: list[str] = []
        trace = {"trace": lambda event, info: opened.append(event) if event.endswith("connect_tcp.complete") else None}
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with httpx.Client(base_url=base, limits=httpx.Limits(max_connections=1)) as c:
            r = c.get("/boom", extensions=trace)
            assert r.status_code == 500 and "RuntimeError" in r.json()["error"]
            assert "secret" not in r.text and "/srv" not in r.text
            assert c.get("/ok", extensions=trace).json() == {"ok": True}
            r = c.get("/half", extensions=trace)  # a body half sent cannot become an error: it ends there
            assert r.status_code == 200 and r.content == b"first part"
            assert c.get("/ok", extensions=trace).json() == {"ok": True}
        assert len(opened) == 1
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _immutable(path: Path, on: bool) -> None:
    subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True, capture_output=True)


@pytest.mark.timeout(150)
def test_a_failing_expiry_or_kill_backs_off_logs_once_and_shows_its_problem(
    server_factory: Callable[..., LocalServer],
) -> None:
    """An immutable file in a sandbox's directory (root can set one; the server cannot remove it) makes its
    removal fail: the kill says so, the reaper retries with a growing delay, and both heal once it is gone."""
    server = server_factory()
    stuck: list[Path] = []
    with server.client() as http:
        http.timeout = httpx.Timeout(60)
        expiring = create(http, timeout=2)["sandbox_id"]
        killed = create(http)["sandbox_id"]
        try:
            for sid in (expiring, killed):
                path = server.data_dir / "sandboxes" / sid / "stuck"
                path.write_text("cannot go")
                _immutable(path, True)
                stuck.append(path)

            def problem(sid: str) -> str | None:
                r = http.get(f"/v1/sandboxes/{sid}")
                return r.json()["data"]["problem"] if r.status_code == 200 else None

            body = assert_error(http.delete(f"/v1/sandboxes/{killed}"), 500, "could not be killed", "not permitted")
            assert str(server.data_dir) not in body["error"]
            info = http.get(f"/v1/sandboxes/{killed}").json()["data"]
            assert info["status"] == "terminated" and "Operation not permitted" in info["problem"]
            wait_for(lambda: bool(problem(expiring)), timeout=30)
            assert http.get(f"/v1/sandboxes/{expiring}").json()["data"]["status"] == "terminated"
            listed = http.get("/v1/sandboxes", params={"status": "terminated"}).json()["data"]["sandboxes"]
            assert {s["sandbox_id"] for s in listed if s["problem"]} == {expiring, killed}
            assert _listed(http) == set()  # neither reads as running any more

            time.sleep(4)  # retries happen meanwhile: 0.5 s, then 1, 2, 4... apart, never several a second
            for sid in (expiring, killed):
                tried = problem(sid) or ""
                attempts = int(tried.split("tried ")[1].split(" times")[0]) if " times" in tried else 1
                assert 1 <= attempts <= 6, tried
            log = server.log_text()
            assert log.count(f"could not expire sandbox {expiring}") == 1
            assert log.count(f"could not terminate sandbox {killed}") == 1
            assert http.get("/v1/scalebox-regions").status_code == 200  # serving all along
        finally:
            for path in stuck:
                _immutable(path, False)
        # A kill is tried again at once (unless the reaper's retry got there first); the expiry heals by itself.
        assert http.delete(f"/v1/sandboxes/{killed}").status_code in (200, 404)
        assert_error(http.get(f"/v1/sandboxes/{killed}"), 404, "killed")
        wait_for(lambda: http.get(f"/v1/sandboxes/{expiring}").status_code == 404, timeout=60)
        assert_error(http.get(f"/v1/sandboxes/{expiring}"), 404, "expired")
        for sid in (expiring, killed):
            assert not (server.data_dir / "sandboxes" / sid).exists()
        assert "done after" in server.log_text()
    server.stop()


def test_a_server_near_its_open_file_limit_refuses_new_sandboxes_clearly(
    server_factory: Callable[..., LocalServer],
) -> None:
    """Before it runs out of file descriptors (where a library would fail in its own words, half-way through a
    sandbox), scalebox-local refuses a new sandbox with a 503 that says what to do, and its warm pool stops
    refilling a sandbox early (the last room is a create's, which the pool may not be able to serve); what runs
    keeps running, and a kill makes room again."""
    import resource

    from scalebox_kernel.server.metrics import SANDBOX_FDS, SERVING_FDS

    server = server_factory(extra=["--ServerSettings.pool_size=1"])
    pid = server.process.pid
    server.wait_pool(1)
    with server.client() as http:
        http.timeout = httpx.Timeout(60)
        used = len(os.listdir(f"/proc/{pid}/fd"))
        hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]
        # Room for one more sandbox (one takes about 40), not for two.
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (used + SANDBOX_FDS + SERVING_FDS + 10, hard))
        first = create(http)  # the pooled one; the pool does not refill, keeping the room for a create
        assert first["warm"] is True
        time.sleep(2)
        assert server.pool()["ready"] == 0, "the pool filled into the room kept for creates"
        second = create(http)  # made cold in that room; now there is none
        assert second["warm"] is False
        assert_error(http.post("/v1/sandboxes", json=PY_CREATE_BODY), 503, "file descriptors", "ulimit -n")
        assert {status_of(http, first["sandbox_id"]), status_of(http, second["sandbox_id"])} == {"running"}
        assert len(os.listdir(f"/proc/{pid}/fd")) < resource.prlimit(pid, resource.RLIMIT_NOFILE)[0]
        for made in (first, second):
            assert http.delete(f"/v1/sandboxes/{made['sandbox_id']}").status_code == 200
        wait_for(lambda: len(os.listdir(f"/proc/{pid}/fd")) <= used, timeout=30)
        third = create(http)
        assert http.delete(f"/v1/sandboxes/{third['sandbox_id']}").status_code == 200
    assert "Traceback" not in server.log_text()
