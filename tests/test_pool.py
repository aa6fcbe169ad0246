"""The warm pool (issue 15): sandboxes started ahead of time, handed to the creates they can honour.

A taken sandbox honours metadata, timeout, env vars and limits as a cold one does, two takes share nothing, the
pool refills, stays within its memory budget, and a server restart neither leaks nor double-counts its sandboxes.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from client_support import config_for
from conftest import LocalServer

from scalebox_kernel.client import Sandbox
from scalebox_kernel.server.isolation import capabilities
from scalebox_kernel.server.isolation.cgroups import CPU_SHARES, CPU_WEIGHT
from scalebox_kernel.server.isolation.detect import GROUP_DIR

CAPS = capabilities()
pytestmark = pytest.mark.skipif(not CAPS.namespaces, reason="no isolation here: " + "; ".join(CAPS.problems))


def sandbox_dirs(server: LocalServer) -> set[str]:
    return set(os.listdir(server.data_dir / "sandboxes"))


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., LocalServer]) -> LocalServer:
    return server_factory(extra=["--ServerSettings.pool_size=2"])


OPTIONS: dict[str, Any] = {
    "metadata": {"team": "blue", "run": "42"},
    "timeout": 123,
    "envs": {"GREETING": "hello from the create", "PYTHONDONTWRITEBYTECODE": "1"},
    "cpu_count": 1,
    "memory_mb": 700,
}


def observed(sandbox: Sandbox) -> dict[str, Any]:
    """What a user can see of a sandbox's options: through get_info, a cell and a command."""
    info = sandbox.get_info()
    cell = sandbox.run_code("import os, sys\n(os.environ.get('GREETING'), sys.flags.dont_write_bytecode)")
    assert cell.error is None, cell.error
    command = sandbox.commands.run("echo $GREETING")
    return {
        "metadata": info.metadata,
        "timeout": info.timeout,
        "cpu_count": info.cpu_count,
        "memory_mb": info.memory_mb,
        "limits": {k: v for k, v in (info.isolation or {}).get("limits", {}).items()},
        "cell": cell.text,
        "command": command.stdout.split("\n")[0],
        "template": info.template_id,
    }


def test_a_taken_sandbox_honours_every_option_as_a_cold_one_does(server: LocalServer) -> None:
    server.wait_pool(2)
    warm = Sandbox.create(config=config_for(server), **OPTIONS)
    # No internet makes it cold: the pool's sandboxes all have internet access. Everything else is the same.
    cold = Sandbox.create(config=config_for(server), **OPTIONS, allow_internet_access=False)
    try:
        assert warm.get_info().raw["warm"] is True and cold.get_info().raw["warm"] is False
        seen_warm, seen_cold = observed(warm), observed(cold)
        assert seen_warm == seen_cold
        assert seen_warm["metadata"] == OPTIONS["metadata"] and seen_warm["timeout"] == 123
        assert seen_warm["cell"] == "('hello from the create', 1)"  # set before the kernel started: sys.flags too
        assert seen_warm["command"] == "hello from the create"
        assert seen_warm["limits"]["memory_mb"] == 700 and seen_warm["limits"]["cpu_count"] == 1
        assert seen_warm["memory_mb"] == 700 and seen_warm["cpu_count"] == 1
    finally:
        warm.kill()
        cold.kill()


def test_two_takes_share_nothing_and_the_pool_refills(server: LocalServer) -> None:
    server.wait_pool(2)
    made_before = server.pool()["made"]
    first = Sandbox.create(config=config_for(server))
    second = Sandbox.create(config=config_for(server))
    try:
        assert first.get_info().raw["warm"] and second.get_info().raw["warm"]
        assert first.sandbox_id != second.sandbox_id
        assert first.run_code("secret = 'mine'\nopen('/workspace/left.txt', 'w').write('x')").error is None
        probe = "import os\n(globals().get('secret'), os.path.exists('/workspace/left.txt'), os.getuid())"
        theirs = second.run_code(probe).text or ""
        mine = first.run_code(probe).text or ""
        assert theirs.startswith("(None, False,") and mine.startswith("('mine', True,")
        assert theirs.split(",")[-1] != mine.split(",")[-1]  # each its own uid
        # Nothing of the pool shows in a list: only the two taken sandboxes are there.
        assert server.sandbox_ids() == {first.sandbox_id, second.sandbox_id}
        status = server.wait_pool(2)
        assert status["made"] >= made_before + 2 and status["taken"] >= 2
    finally:
        first.kill()
        second.kill()


def cpu_weight(sandbox_id: str) -> tuple[int, dict[bool, int]]:
    """A sandbox's CPU weight in its cgroup (v1 `cpu.shares`, else v2 `cpu.weight`), and the scale it is on."""
    layout = CAPS.cgroups
    if "cpu" in layout.v1:
        return int((layout.v1["cpu"] / GROUP_DIR / sandbox_id / "cpu.shares").read_text()), CPU_SHARES
    assert layout.v2 is not None
    return int((layout.v2 / GROUP_DIR / sandbox_id / "cpu.weight").read_text()), CPU_WEIGHT


@pytest.mark.skipif(not CAPS.cgroups.has("cpu"), reason="no CPU cgroup controller here")
def test_the_pool_starts_on_spare_cpu_and_a_taken_sandbox_gets_the_full_weight(server: LocalServer) -> None:
    server.wait_pool(2)
    pooled = sandbox_dirs(server) - server.sandbox_ids()
    assert len(pooled) == 2
    for sandbox_id in pooled:
        weight, scale = cpu_weight(sandbox_id)
        assert weight == scale[True]  # the least: what sandboxes in use leave over
    with Sandbox.create(config=config_for(server)) as taken:
        assert taken.sandbox_id in pooled
        weight, scale = cpu_weight(taken.sandbox_id)
        assert weight == scale[False]
        taken.kill()


def test_a_killed_taken_sandbox_never_returns_to_the_pool(server: LocalServer) -> None:
    server.wait_pool(2)
    taken = Sandbox.create(config=config_for(server))
    taken_id = taken.sandbox_id
    taken.kill()
    server.wait_pool(2)
    again = [Sandbox.create(config=config_for(server)) for _ in range(2)]
    try:
        assert taken_id not in {s.sandbox_id for s in again}
        assert taken_id not in sandbox_dirs(server)
    finally:
        for sandbox in again:
            sandbox.kill()


def test_the_pool_stays_within_its_memory_budget(
    server: LocalServer, server_factory: Callable[..., LocalServer]
) -> None:
    one = server.wait_pool(2)["memory_mb"] / 2  # what a pooled sandbox takes here
    budget = int(one * 2.5)
    tight = server_factory(extra=["--ServerSettings.pool_size=4", f"--ServerSettings.pool_memory_mb={budget}"])
    deadline = time.monotonic() + 90
    status = tight.pool()
    while (status["starting"] or status["ready"] == 0) and time.monotonic() < deadline:
        time.sleep(0.3)
        status = tight.pool()
    time.sleep(2)  # would it grow on?
    status = tight.pool()
    assert 1 <= status["ready"] < 4, status
    assert status["memory_mb"] <= budget, status
    none = server_factory(extra=["--ServerSettings.pool_size=2", "--ServerSettings.pool_memory_mb=0"])
    time.sleep(1)
    assert none.pool()["ready"] == 0
    with Sandbox.create(config=config_for(none)) as sandbox:
        assert sandbox.get_info().raw["warm"] is False  # made cold
        sandbox.kill()


def test_a_restart_neither_leaks_nor_double_counts_pooled_sandboxes(
    server_factory: Callable[..., LocalServer],
) -> None:
    first = server_factory(extra=["--ServerSettings.pool_size=2"])
    first.wait_pool(2)
    kept = Sandbox.create(config=config_for(first), timeout=600)
    first.wait_pool(2)
    pooled_before = sandbox_dirs(first) - {kept.sandbox_id}
    assert len(pooled_before) == 2
    kept.close()
    first.process.send_signal(signal.SIGKILL)  # a crash: the pool's directories stay behind
    first.process.wait(15)
    second = server_factory(data_dir=first.data_dir, extra=["--ServerSettings.pool_size=2"])
    second.wait_pool(2)
    after = sandbox_dirs(second)
    assert not pooled_before & after  # the crashed server's pool is gone, not taken over
    assert len(after - {kept.sandbox_id}) == 2  # only the new pool
    with second.client() as http:
        listed = [s["sandbox_id"] for s in http.get("/v1/sandboxes").json()["data"]["sandboxes"]]
    assert listed == [kept.sandbox_id]
    again = Sandbox.connect(kept.sandbox_id, config=config_for(second))
    assert again.run_code("1 + 1").text == "2"
    again.kill()
    again.close()
    second.stop()  # a clean stop removes the pool
    assert sandbox_dirs(second) == set()


def test_the_first_context_takes_over_the_kernel_started_ahead_and_shares_nothing_with_the_default(
    server: LocalServer,
) -> None:
    server.wait_pool(2)
    with Sandbox.create(config=config_for(server)) as sandbox:
        context = sandbox.create_code_context("python", cwd="/workspace")
        cwd = sandbox.run_code("import os\nos.getcwd()", context=context)
        assert cwd.text == "'/workspace'", cwd
        kernels = "pgrep -fc '[i]pykernel_launcher' || true"  # the bracket keeps pgrep's own shell out
        assert sandbox.commands.run(kernels).stdout.strip() == "1"  # the pooled kernel, moved: no second one
        assert sandbox.run_code("mine = 'default'").error is None  # the default context: a kernel of its own
        assert sandbox.commands.run(kernels).stdout.strip() == "2"
        separate = sandbox.run_code("'mine' in globals()", context=context)
        assert separate.text == "False"
        home = sandbox.run_code("import os\nos.getcwd()")
        assert home.text == "'/home/user'"
        sandbox.kill()
