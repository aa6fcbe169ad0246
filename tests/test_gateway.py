"""jupyter_server's own gateway client against a sandbox's Jupyter endpoint: a real `jupyter server
--gateway-url=<the sandbox's endpoint>` whose kernels are the sandbox's, cells, interrupt and restart included."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from client_support import access_token, config_for
from jupyter_support import Frontend, of_type, stdout, ws_url
from proxy_support import free_port

from scalebox_kernel.client import AsyncSandbox

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sandbox(local_server: Any) -> AsyncIterator[AsyncSandbox]:
    async with await AsyncSandbox.create(config=config_for(local_server)) as sbx:
        yield sbx


@pytest.fixture(scope="module")
def gateway(sandbox: AsyncSandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A jupyter server on loopback whose kernels live in the sandbox; its URL and token (both secrets go in the
    environment, not on the command line)."""
    root = tmp_path_factory.mktemp("gateway")
    token = secrets.token_hex(16)
    port = free_port()
    env = {
        **os.environ,
        "JUPYTER_TOKEN": token,
        "JUPYTER_GATEWAY_URL": sandbox.jupyter().base_url,
        "JUPYTER_GATEWAY_AUTH_TOKEN": access_token(sandbox),
        "JUPYTER_CONFIG_DIR": str(root / "config"),
        "JUPYTER_DATA_DIR": str(root / "data"),
        "JUPYTER_RUNTIME_DIR": str(root / "runtime"),
    }
    argv = [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1"]
    argv.append(f"--port={port}")
    argv.append(f"--ServerApp.root_dir={root}")
    log = (root / "server.log").open("wb")
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/api/status", headers={"Authorization": f"token {token}"}).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, (root / "server.log").read_text()
            time.sleep(0.2)
        yield url, token
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
        assert access_token(sandbox) not in (root / "server.log").read_text()


async def sandbox_kernels(sandbox: AsyncSandbox) -> set[str]:
    """The kernels (contexts) of the sandbox, asked of its own endpoint."""
    headers = {"Authorization": f"token {access_token(sandbox)}"}
    async with httpx.AsyncClient(base_url=sandbox.jupyter().base_url, headers=headers) as http:
        return {kernel["id"] for kernel in (await http.get("/api/kernels")).json()}


async def test_a_gateway_runs_cells_in_the_sandbox(gateway: tuple[str, str], sandbox: AsyncSandbox) -> None:
    url, token = gateway
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"token {token}"}, timeout=60) as http:
        specs = (await http.get("/api/kernelspecs")).json()
        assert "python" in specs["kernelspecs"], specs
        started = await http.post("/api/kernels", json={"name": "python"})
        assert started.status_code == 201, started.text
        kernel_id = started.json()["id"]
        # the gateway's kernel is one of the sandbox's contexts: one state with run_code
        frontend = await Frontend.open(ws_url(url, kernel_id), token)
        try:
            await frontend.until(await frontend.execute("through_gateway = 6 * 7"))
            assert kernel_id in await sandbox_kernels(sandbox)
            assert stdout(await frontend.until(await frontend.execute("print(through_gateway)"))) == "42\n"
            # interrupt
            cell = await frontend.execute("import time\nprint('sleeping', flush=True)\ntime.sleep(60)")
            while "sleeping" not in stdout(frontend.inbox):
                await frontend.receive()
            assert (await http.post(f"/api/kernels/{kernel_id}/interrupt")).status_code == 204
            messages = await frontend.until(cell)
            assert of_type(messages, "execute_reply")[0]["content"]["ename"] == "KeyboardInterrupt"
        finally:
            await frontend.close()
        # restart: same kernel, fresh state
        assert (await http.post(f"/api/kernels/{kernel_id}/restart")).status_code == 200
        frontend = await Frontend.open(ws_url(url, kernel_id), token)
        try:
            for _ in range(3):  # the first request after a restart may race the new process's channels
                msg_id = await frontend.execute("print('through_gateway' in globals())")
                try:
                    messages = await asyncio.wait_for(frontend.until(msg_id), 20)
                    break
                except TimeoutError:
                    continue
            assert stdout(messages) == "False\n"
        finally:
            await frontend.close()
        assert (await http.delete(f"/api/kernels/{kernel_id}")).status_code == 204
        assert kernel_id not in await sandbox_kernels(sandbox)


async def test_no_token_on_any_command_line(gateway: tuple[str, str], sandbox: AsyncSandbox) -> None:
    token = access_token(sandbox)
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            assert token.encode() not in cmdline
