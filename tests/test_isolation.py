"""Escape suite (issue 6): code in one sandbox tries to get out; every attempt fails and everything keeps serving.

One scalebox-local with isolation on; a victim sandbox with a secret file, kernel state and a running command;
an attacker sandbox without internet and with a small memory limit that tries, from its Python kernel and its
shell: host files, the victim's files, the server's key and database, other processes, the victim's kernel
sockets, the network, memory past its limit and processes past its limit.
"""

from __future__ import annotations

import json
import site
import socket
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from client_support import PLOT, config_for
from conftest import LocalServer

from scalebox_kernel.client import Sandbox, SyncCommandHandle
from scalebox_kernel.server.isolation import capabilities

CAPS = capabilities()
pytestmark = pytest.mark.skipif(not CAPS.namespaces, reason="no sandboxing here: " + "; ".join(CAPS.problems))

MEMORY_MB = 256
MAX_PROCESSES = 96


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., LocalServer]) -> LocalServer:
    return server_factory(extra=[f"--ServerSettings.max_processes={MAX_PROCESSES}"])


def create(server: LocalServer, **body: Any) -> Sandbox:
    """A sandbox created with fields our client does not send (memory_mb, ...), then attached to."""
    with server.client() as http:
        response = http.post("/v1/sandboxes", json={"template": "code-interpreter", "timeout": 600, **body})
    assert response.status_code in (200, 201), response.text
    return Sandbox.connect(response.json()["data"]["sandbox_id"], config=config_for(server))


@pytest.fixture(scope="module")
def victim(server: LocalServer) -> Iterator[tuple[Sandbox, SyncCommandHandle]]:
    sandbox = create(server)
    sandbox.files.write("/home/user/secret.txt", "victim's secret")
    assert sandbox.run_code("state = 'kept'").error is None
    command = sandbox.commands.run("sleep 600", background=True)
    assert isinstance(command, SyncCommandHandle)
    yield sandbox, command
    sandbox.kill()
    sandbox.close()


@pytest.fixture(scope="module")
def attacker(server: LocalServer) -> Iterator[Sandbox]:
    sandbox = create(server, allow_internet_access=False, memory_mb=MEMORY_MB)
    yield sandbox
    sandbox.kill()
    sandbox.close()


@pytest.fixture(scope="module")
def host_listener() -> Iterator[int]:
    """A TCP listener on the host's loopback: what "the network" is here (nothing leaves the machine)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    yield listener.getsockname()[1]
    listener.close()


TRY = """
import json, os, signal, socket
def tried(action):
    try:
        result = action()
        return "SUCCEEDED: " + repr(result)[:200]
    except BaseException as exc:
        return type(exc).__name__
"""


def attempt(sandbox: Sandbox, code: str) -> dict[str, Any]:
    """Run Python in the sandbox; it prints one JSON object that says what each attempt got."""
    execution = sandbox.run_code(TRY + textwrap.dedent(code), timeout=120)
    assert execution.error is None, execution.error
    return json.loads("".join(execution.logs.stdout))


def test_isolation_is_reported(attacker: Sandbox, victim: tuple[Sandbox, SyncCommandHandle]) -> None:
    info = attacker.get_info().isolation
    assert info is not None and info["mode"] == "bwrap" and info["network"] == "none"
    assert info["limits"]["memory_mb"] == MEMORY_MB and info["limits"]["processes"] == MAX_PROCESSES
    assert victim[0].get_info().isolation["uid"] != info["uid"]  # type: ignore[index]


def test_host_files_and_the_servers_secrets_are_out_of_reach(
    attacker: Sandbox, victim: tuple[Sandbox, SyncCommandHandle], server: LocalServer
) -> None:
    victim_root = server.data_dir / "sandboxes" / victim[0].sandbox_id / "root"
    paths = {
        "repo": str(server.data_dir.parent),  # somewhere on the host, outside every sandbox
        "runtime file": str(server.runtime_dir / "scalebox-local.json"),
        "database": str(server.data_dir / "scalebox-local.db"),
        "victim tree": str(victim_root / "home" / "user" / "secret.txt"),
        "shadow": "/etc/shadow",
    }
    got = attempt(
        attacker,
        f"""
        paths = {paths!r}
        read = lambda p: open(p).read() if os.path.isfile(p) else os.listdir(p)
        found = {{name: tried(lambda p=p: read(p)) for name, p in paths.items()}}
        found["own home"] = tried(lambda: open("/home/user/secret.txt").read())
        key = {server.api_key!r}
        def scan():
            hits = []
            for pid in filter(str.isdigit, os.listdir("/proc")):
                for name in ("environ", "cmdline"):
                    try:
                        if key in open(f"/proc/{{pid}}/{{name}}", errors="replace").read():
                            hits.append(pid)
                    except OSError:
                        pass
            return hits
        found["key in /proc"] = scan()
        found["key in env"] = any(key in value for value in os.environ.values())
        print(json.dumps(found))
        """,
    )
    for name in paths:
        assert not got[name].startswith("SUCCEEDED"), (name, got[name])
    assert got["own home"] == "FileNotFoundError"  # the victim's file is not in the attacker's home either
    assert got["key in /proc"] == [] and got["key in env"] is False


def test_nothing_of_the_servers_own_environment_is_inside(attacker: Sandbox) -> None:
    """The server's interpreter, its packages and this package's source are not in a sandbox (issue 12): only the
    runtimes the kernels need are bound."""
    import scalebox_kernel

    package = Path(scalebox_kernel.__file__).resolve().parent
    server_env = {
        "prefix": sys.prefix,
        "base prefix": sys.base_prefix,
        "interpreter": sys.executable,
        "package source": str(package),
        **{f"site {i}": path for i, path in enumerate(site.getsitepackages())},
    }
    # Paths under a system directory (a Debian-installed server) are only checked for our package's presence.
    system = ("/usr", "/etc", "/opt", "/bin", "/sbin", "/lib")
    checked = {name: path for name, path in server_env.items() if not path.startswith(system)}
    got = attempt(
        attacker,
        f"""
        paths = {checked!r}
        found = {{name: os.path.lexists(p) for name, p in paths.items()}}
        import importlib.util
        found["scalebox_kernel importable"] = importlib.util.find_spec("scalebox_kernel") is not None
        print(json.dumps(found))
        """,
    )
    assert got == {**dict.fromkeys(checked, False), "scalebox_kernel importable": False}
    # The runtimes still work: the attempt above ran on the runtimes' python, and so does a shell.
    assert attacker.commands.run("python3 -c 'import ipykernel; print(1)'").stdout.strip() == "1"


def test_other_processes_cannot_be_seen_or_signalled(
    attacker: Sandbox, victim: tuple[Sandbox, SyncCommandHandle], server: LocalServer
) -> None:
    got = attempt(
        attacker,
        f"""
        found = {{
            "server": tried(lambda: os.kill({server.process.pid}, signal.SIGKILL)),
            "victim command": tried(lambda: os.kill({victim[1].pid}, signal.SIGKILL)),
            "init": tried(lambda: os.kill(1, signal.SIGKILL)),
            "processes": [open(f"/proc/{{p}}/cmdline").read() for p in os.listdir("/proc") if p.isdigit()],
        }}
        print(json.dumps(found))
        """,
    )
    assert got["server"] == "ProcessLookupError" and got["victim command"] == "ProcessLookupError"
    assert got["init"] in ("PermissionError", "SUCCEEDED: None")  # pid 1 of a PID namespace ignores it
    seen = "\n".join(got["processes"])
    assert "ipykernel" in seen and "infinity" in seen  # its own kernel, and its namespaces' holder
    assert "sleep\x00600" not in seen and "scalebox_kernel\x00serve" not in seen  # none of the others'
    assert len(got["processes"]) < 10
    assert server.process.poll() is None
    assert victim[0].commands.list()  # the victim's command still runs


def test_the_victims_kernel_cannot_be_reached(
    attacker: Sandbox, victim: tuple[Sandbox, SyncCommandHandle], server: LocalServer, host_listener: int
) -> None:
    victim_dir = server.data_dir / "sandboxes" / victim[0].sandbox_id
    connection_files = sorted((victim_dir / "kernels").glob("kernel-*.json"))  # the server's root-only copies
    assert connection_files, "the victim's kernel should be running"
    info = json.loads(connection_files[0].read_text())
    assert info["transport"] == "ipc" and connection_files[0].stat().st_mode & 0o077 == 0
    name = info["ip"].rsplit("/", 1)[1] + f"-{info['shell_port']}"
    socket_path = f"/run/scalebox-local/{victim[0].sandbox_id}/{name}"  # where the server connects to it
    kernel_copy = victim_dir / "root" / "run" / "scalebox" / connection_files[0].name  # the kernel's own copy
    assert kernel_copy.stat().st_mode & 0o077 == 0
    got = attempt(
        attacker,
        f"""
        def unix(path):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
        def tcp(host, port):
            socket.create_connection((host, port), timeout=3).close()
        found = {{
            "connection file": tried(lambda: open({str(connection_files[0])!r}).read()),
            "kernel's connection file": tried(lambda: open({str(kernel_copy)!r}).read()),
            "kernel socket (host path)": tried(lambda: unix({socket_path!r})),
            "kernel socket (sandbox path)": tried(lambda: unix({"/run/scalebox/" + name!r})),
            "host loopback": tried(lambda: tcp("127.0.0.1", {host_listener})),
            "server": tried(lambda: tcp("127.0.0.1", {int(server.url.rsplit(":", 1)[1])})),
            "interfaces": [name for _, name in socket.if_nameindex()],
        }}
        print(json.dumps(found))
        """,
    )
    for name in (
        "connection file",
        "kernel's connection file",
        "kernel socket (host path)",
        "kernel socket (sandbox path)",
    ):
        assert got[name] in ("FileNotFoundError", "PermissionError"), (name, got[name])
    assert Path(socket_path).exists()  # the socket is real: only the attacker cannot see it
    assert got["host loopback"] == "ConnectionRefusedError" and got["server"] == "ConnectionRefusedError"
    assert got["interfaces"] == ["lo"]


def test_memory_past_the_limit_fails_the_cell_not_the_sandbox(attacker: Sandbox) -> None:
    assert attacker.run_code("before = 1").error is None
    execution = attacker.run_code(f"block = bytearray({MEMORY_MB * 2} * 1024 * 1024)", timeout=120)
    assert execution.error is not None
    assert f"ran out of memory (limit {MEMORY_MB} MiB)" in execution.error.value
    after = attacker.run_code("1 + 1")
    assert after.error is None and after.text == "2"


def test_processes_past_the_limit_fail(attacker: Sandbox) -> None:
    got = attempt(
        attacker,
        """
        import json, subprocess
        children, error = [], None
        try:
            for _ in range(500):
                children.append(subprocess.Popen(["sleep", "30"]))
        except OSError as exc:
            error = type(exc).__name__
        for child in children:
            child.kill()
            child.wait()
        print(json.dumps({"started": len(children), "error": error}))
        """,
    )
    assert got["error"] == "BlockingIOError" and got["started"] < MAX_PROCESSES
    assert attacker.commands.run("echo still serving").stdout == "still serving\n"


def test_the_victim_is_unaffected(victim: tuple[Sandbox, SyncCommandHandle]) -> None:
    sandbox, command = victim
    assert sandbox.files.read("/home/user/secret.txt") == "victim's secret"
    assert sandbox.run_code("state").text == "'kept'"
    assert any(process.pid == command.pid for process in sandbox.commands.list())


def test_paths_agree_inside_and_out(victim: tuple[Sandbox, SyncCommandHandle]) -> None:
    sandbox = victim[0]
    execution = sandbox.run_code("open('/workspace/out.csv', 'w').write('a,b\\n1,2\\n')")
    assert execution.error is None
    assert sandbox.files.read("/workspace/out.csv") == "a,b\n1,2\n"
    sandbox.files.write("/workspace/in.txt", "from the API\n")
    assert sandbox.commands.run("cat /workspace/in.txt && echo more >> /workspace/in.txt").exit_code == 0
    assert sandbox.files.read("/workspace/in.txt") == "from the API\nmore\n"


def test_without_isolation_no_internet_is_refused(server_factory: Callable[..., LocalServer]) -> None:
    plain = server_factory(extra=["--no-isolation"])
    with plain.client() as http:
        refused = http.post("/v1/sandboxes", json={"allow_internet_access": False})
        assert refused.status_code == 400 and "network isolation" in refused.json()["message"]
        created = http.post("/v1/sandboxes", json={}).json()["data"]
        info = http.get(f"/v1/sandboxes/{created['sandbox_id']}").json()["data"]
        http.delete(f"/v1/sandboxes/{created['sandbox_id']}")
    assert info["isolation"]["mode"] == "none" and "namespaces" in info["isolation"]["missing"]
    assert "isolation: none" in plain.log_text()


def test_plots_work_inside_with_a_private_font_cache(victim: tuple[Sandbox, SyncCommandHandle]) -> None:
    execution = victim[0].run_code(PLOT, timeout=120)
    assert execution.error is None and any(result.png for result in execution.results)
    assert "Matplotlib" not in "".join(execution.logs.stderr)  # its cache directory is writable inside
