"""The isolation package on its own, with real processes: bwrap namespaces, the sandbox uid, cgroups, the relay."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.connect import write_connection_file
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from traitlets import Instance

from scalebox_kernel.server.isolation import SANDBOX_RELAY, Jail, JailError, JailOptions, Limits, capabilities, network
from scalebox_kernel.server.isolation.disk import can_limit_disk
from scalebox_kernel.server.isolation.kernels import CHANNELS, JailedKernelManager, link_socket

CAPS = capabilities()
pytestmark = pytest.mark.skipif(not CAPS.namespaces, reason="no sandboxing here: " + "; ".join(CAPS.problems))
needs_cgroups = pytest.mark.skipif(not CAPS.cgroups.has("memory"), reason="no writable memory cgroup")

Result = tuple[int, str, str]


class _OneSpec(KernelSpecManager):
    spec = Instance(KernelSpec)

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return self.spec


MakeJail = Callable[..., Awaitable[Jail]]


@pytest.fixture
async def make_jail(tmp_path: Path) -> AsyncIterator[MakeJail]:
    """Start jails below tmp_path (each with its own tree, as scalebox-local lays them out); stop them after."""
    jails: list[Jail] = []

    async def make(name: str = "sbx-a", with_network: bool = True, **options: object) -> Jail:
        # These jails run kernels on the test's own interpreter, so they are given its prefix as a runtime.
        options.setdefault("runtime", (sys.prefix, sys.base_prefix))
        private = tmp_path / "sandboxes" / name
        for directory in ("home/user", "workspace", "tmp"):
            (private / "root" / directory).mkdir(parents=True, exist_ok=True)
        jail = Jail(CAPS, sandbox_id=name, root=private / "root", private_dir=private, options=JailOptions(**options))  # type: ignore[arg-type]
        jails.append(jail)
        await jail.start(with_network=with_network)
        return jail

    yield make
    for jail in jails:
        await jail.stop()


async def start(jail: Jail, script: str, env: dict[str, str] | None = None, cwd: str = "/home/user"):  # type: ignore[no-untyped-def]
    argv, host_env = jail.wrap(["/bin/sh", "-c", script], env=env or {"PATH": "/usr/bin:/bin"}, cwd=cwd)
    return await asyncio.create_subprocess_exec(
        *argv, env=host_env, stdout=-1, stderr=-1, stdin=-3, start_new_session=True, cwd=str(jail.root)
    )


async def run(jail: Jail, script: str, env: dict[str, str] | None = None, cwd: str = "/home/user") -> Result:
    process = await start(jail, script, env, cwd)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def kill(process: asyncio.subprocess.Process) -> None:
    """Kill a started process's whole group (its sandboxed program too) and reap it."""
    os.killpg(process.pid, signal.SIGKILL)
    await asyncio.wait_for(process.wait(), 10)


@pytest.fixture
def host_listener() -> socket.socket:
    """A TCP listener on the host's loopback that sandbox code must not reach."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield server
    server.close()


async def test_runs_as_its_own_user_with_its_own_tree(make_jail: MakeJail) -> None:
    jail = await make_jail(limits=Limits(processes=200))
    code, out, err = await run(
        jail, 'id -u; whoami; pwd; echo "$GREETING"; echo made > /workspace/out.csv; ls /', {"GREETING": "hi there"}
    )
    assert code == 0, err
    uid, user, cwd, greeting, listing = out.split("\n", 4)
    assert int(uid) == jail.identity.uid and int(uid) >= 600_000  # type: ignore[union-attr]
    assert (user, cwd, greeting) == ("user", "/home/user", "hi there")
    assert "workspace" in listing.split() and "work" not in listing.split()
    host_file = jail.root / "workspace" / "out.csv"  # paths agree inside and out
    assert host_file.read_text() == "made\n" and host_file.stat().st_uid == jail.identity.uid  # type: ignore[union-attr]
    assert jail.info()["mode"] == "bwrap" and jail.info()["limits"]["processes"] == 200


async def test_host_and_server_files_are_out_of_reach(make_jail: MakeJail) -> None:
    jail = await make_jail()
    secret = jail.private_dir / "secret.json"  # beside the root, like the server's data: not mounted
    secret.write_text("{}")
    prefix = Path(sys.prefix).resolve()  # bound read-only as asked (it may sit in root's home, like pyenv's)
    _, out, _ = await run(
        jail,
        f"cat {Path(__file__).resolve()} || echo no-repo; cat {secret} || echo no-secret;"
        f" cat /etc/shadow || echo no-shadow; touch {prefix}/x /usr/x || echo read-only; ls -a {prefix.parent}",
    )
    assert "no-repo" in out and "no-secret" in out and "no-shadow" in out and "read-only" in out
    if not prefix.is_relative_to("/usr"):  # nothing of the prefix's neighbours is visible
        assert set(out.split("read-only\n")[1].split()) == {".", "..", prefix.name}


async def test_host_paths_become_sandbox_paths_and_server_files_its_own(make_jail: MakeJail) -> None:
    jail = await make_jail()
    home = jail.root / "home" / "user"
    assert jail.sandbox_value(f"{home}/bin:/usr/bin") == "/home/user/bin:/usr/bin"
    assert jail.sandbox_value(f"-Xmx1g -Duser.home={home}") == "-Xmx1g -Duser.home=/home/user"
    assert jail.sandbox_value(str(jail.root)) == "/" and jail.sandbox_value(f"{jail.root}x") == f"{jail.root}x"
    tree = jail.tree  # what the file APIs use: the sandbox's uid, paths resolved inside it
    await tree.run(tree.makedirs, "/home/user/made/by")
    assert await tree.run(tree.write_new, "/home/user/made/by/server.txt", b"x")
    made = home / "made" / "by" / "server.txt"
    assert {p.stat().st_uid for p in (made, made.parent, made.parent.parent)} == {jail.identity.uid}  # type: ignore[union-attr]
    assert await tree.run(jail.has_program, "sh", "/usr/bin:/bin")
    assert not await tree.run(jail.has_program, "no-such-program", "/usr/bin:/bin")
    assert not await tree.run(jail.has_program, str(made), "")  # a host path means nothing inside
    assert await tree.run(jail.has_program, "/home/user/made/by/server.txt", "")
    with pytest.raises(PermissionError):  # as the sandbox's uid: no more than its own code could do
        await tree.run(tree.write_new, "/run/scalebox-host/planted", b"x")
    with pytest.raises(OSError, match="Read-only"):  # and what the sandbox sees read-only is read-only
        await tree.run(tree.write_new, "/etc/planted", b"x")


async def test_privileged_launch_steps_ignore_the_sandboxes_environment(make_jail: MakeJail) -> None:
    """LD_PRELOAD from a sandbox's envs is only seen by its own program, never by the root helpers before it."""
    jail = await make_jail()
    code, _, err = await run(jail, "true", {"PATH": "/usr/bin:/bin", "LD_PRELOAD": "/home/user/missing.so"})
    assert code == 0
    assert err.count("missing.so") == 1, err  # /bin/sh itself, nothing before it


async def test_sandboxes_cannot_see_each_other(make_jail: MakeJail) -> None:
    first, second = await make_jail("sbx-a"), await make_jail("sbx-b")
    assert first.identity != second.identity
    (first.root / "home" / "user" / "mine.txt").write_text("first's")
    sleeper = await start(first, "echo started; exec sleep 30")
    assert sleeper.stdout is not None and await sleeper.stdout.readline() == b"started\n"
    _, out, _ = await run(
        second,
        f"ls {first.root} || echo no-tree; cat /home/user/mine.txt || echo no-file; ps -eo comm | grep -c sleep;"
        f" kill -9 {sleeper.pid} || echo no-kill",
    )
    assert "no-tree" in out and "no-file" in out and "no-kill" in out
    assert out.split("\n")[-3] == "1"  # only second's own holder sleeps there
    assert sleeper.returncode is None
    await kill(sleeper)


async def test_no_internet_means_no_network(make_jail: MakeJail, host_listener: socket.socket) -> None:
    jail = await make_jail(internet=False)
    port = host_listener.getsockname()[1]
    script = f"""
import socket
for host in ("127.0.0.1", "10.0.2.2", "1.1.1.1"):
    try:
        socket.create_connection((host, {port}), timeout=2).close(); print(host, "reached")
    except OSError as exc:
        print(host, "refused", type(exc).__name__)
print(sorted(name for _, name in socket.if_nameindex()))
"""
    code, out, err = await run(jail, f"python3 -c '{script}'")
    assert code == 0, err
    assert "reached" not in out and out.count("refused") == 3
    assert out.strip().endswith("['lo']")
    assert jail.info()["network"] == "none"


@pytest.mark.skipif(not CAPS.private_network, reason="slirp4netns is not installed")
async def test_private_network_cannot_reach_host_loopback(make_jail: MakeJail, host_listener: socket.socket) -> None:
    jail = await make_jail(internet=True)
    port = host_listener.getsockname()[1]
    script = f"""
import socket
for host in ("127.0.0.1", "10.0.2.2"):
    try:
        socket.create_connection((host, {port}), timeout=2).close(); print(host, "reached")
    except OSError as exc:
        print(host, "refused")
print(sorted(name for _, name in socket.if_nameindex()))
"""
    code, out, err = await run(jail, f"python3 -c '{script}'")
    assert code == 0, err
    assert out.count("refused") == 2 and "tap0" in out
    assert jail.info()["network"] == "private"


@pytest.mark.skipif(not CAPS.private_network, reason="slirp4netns is not installed")
async def test_a_network_left_for_later_comes_up_blocked_as_at_any_start(
    make_jail: MakeJail, host_listener: socket.socket
) -> None:
    """The agent starts a sandbox's network while its first kernel starts (`with_network=False`, then
    `start_network`): until then the sandbox has only its loopback, after it the same network and the same blocked
    routes as a sandbox started in one go; a second `start_network` changes nothing."""
    jail = await make_jail(internet=True, with_network=False)
    interfaces = "import socket; print(sorted(name for _, name in socket.if_nameindex()))"
    code, out, err = await run(jail, f'python3 -c "{interfaces}"')
    assert code == 0, err
    assert out.strip() == "['lo']" and jail.info()["network"] == "private"
    await jail.start_network()
    await jail.start_network()
    port = host_listener.getsockname()[1]
    script = f"""
import socket
for host in ("127.0.0.1", "10.0.2.2"):
    try:
        socket.create_connection((host, {port}), timeout=2).close(); print(host, "reached")
    except OSError:
        print(host, "refused")
print(sorted(name for _, name in socket.if_nameindex()))
"""
    code, out, err = await run(jail, f"python3 -c '{script}'")
    assert code == 0, err
    assert out.count("refused") == 2 and out.strip().endswith("['lo', 'tap0']")
    _, routes, _ = await run(jail, "cat /proc/net/route | wc -l; ip route show type unreachable | wc -l || true")
    assert int(routes.split()[0]) > 1  # a default route through slirp
    slirps = [p for p in Path("/proc").glob("[0-9]*") if _comm(p) == "slirp4netns"]
    assert sum(_cmdline(p).endswith(f" {jail._holder_pid} tap0") for p in slirps) == 1  # one slirp, not two


@pytest.mark.skipif(not CAPS.private_network, reason="slirp4netns is not installed")
async def test_code_that_runs_while_the_network_starts_never_reaches_the_host(make_jail: MakeJail) -> None:
    """Sandbox code may already run while `start_network` works (a kernel's startup file in a restored sandbox):
    the host's routes are fenced before slirp is attached, so not one of its attempts reaches the host."""
    addresses, _ = network.host_networks()
    host = next((a.split("/")[0] for a in addresses if not a.startswith("127.")), None)
    if host is None:
        pytest.skip("the host has no address but loopback")
    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))
    listener.listen()
    listener.setblocking(False)
    try:
        jail = await make_jail(internet=True, with_network=False)
        script = f"""
import socket, time
end, seen = time.time() + 3, set()
while time.time() < end:
    s = socket.socket(); s.settimeout(0.2)
    try:
        s.connect(("{host}", {listener.getsockname()[1]})); seen.add("reached"); break
    except OSError as exc:
        seen.add(type(exc).__name__)
    finally:
        s.close()
print(sorted(seen))
"""
        attempt = await start(jail, f"python3 -c '{script}'")
        await asyncio.sleep(0.3)  # it tries, with only its loopback, while the network comes up
        await jail.start_network()
        out, err = await asyncio.wait_for(attempt.communicate(), 30)
        assert b"reached" not in out and out.strip(), (out, err)
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


def _comm(proc: Path) -> str:
    try:
        return (proc / "comm").read_text().strip()
    except OSError:
        return ""


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


async def test_no_process_of_a_new_uid_runs_outside_its_sandbox_once_started(make_jail: MakeJail) -> None:
    """The keyrings of a newly claimed uid are emptied by a process of that uid on the host, while the holder
    starts: by the time `start` returns it has ended, and every process of the uid is inside the sandbox."""
    jail = await make_jail("sbx-keys")
    assert jail.identity is not None
    inside = os.stat(f"/proc/{jail._holder_pid}/ns/pid").st_ino
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            status = (proc / "status").read_text()
            namespace = os.stat(proc / "ns" / "pid").st_ino
        except OSError:
            continue  # it ended meanwhile
        uid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("Uid:"))
        if uid == jail.identity.uid:
            assert namespace == inside, f"{_comm(proc)} ({proc.name}) of the sandbox's uid runs on the host"
    assert jail._clearing is None


async def test_sigint_reaches_the_program_not_the_wrappers(make_jail: MakeJail) -> None:
    jail = await make_jail()
    script = "import time\ntry:\n    print('ready', flush=True); time.sleep(30)\n"
    script += "except KeyboardInterrupt:\n    print('caught')"
    process = await start(jail, f'exec python3 -c "{script}"')
    assert process.stdout is not None and await process.stdout.readline() == b"ready\n"
    os.killpg(process.pid, signal.SIGINT)
    out, _ = await asyncio.wait_for(process.communicate(), 10)
    assert out == b"caught\n" and process.returncode == 0


@needs_cgroups
async def test_memory_limit_kills_the_allocation(make_jail: MakeJail) -> None:
    jail = await make_jail(limits=Limits(memory_mb=128))
    _, out, _ = await run(jail, "python3 -c 'b = bytearray(300 * 1024 * 1024); print(len(b))'; echo after $?")
    assert "after 137" in out  # SIGKILLed by the OOM killer
    assert jail.oom_kills() >= 1
    _, out, _ = await run(jail, "echo still serving")
    assert out == "still serving\n"


@needs_cgroups
async def test_process_limit_stops_a_fork_loop(make_jail: MakeJail) -> None:
    jail = await make_jail(limits=Limits(processes=30))
    script = """
import subprocess
children = []
try:
    for _ in range(100):
        children.append(subprocess.Popen(["sleep", "20"]))
except OSError as exc:
    print("failed after", len(children), type(exc).__name__)
for child in children:
    child.kill()
"""
    code, out, err = await run(jail, f"python3 -c '{script}'")
    assert code == 0, err
    assert out.startswith("failed after") and int(out.split()[2]) < 30
    assert jail.usage().processes < 30  # type: ignore[union-attr]


@needs_cgroups
async def test_cpu_quota_and_cpu_time(make_jail: MakeJail) -> None:
    jail = await make_jail(limits=Limits(cpu_count=0.5))
    before = jail.usage().cpu_seconds  # type: ignore[union-attr]
    started = time.monotonic()
    await run(jail, "timeout 1.5 sh -c 'while :; do :; done'")
    wall = time.monotonic() - started
    used = jail.usage().cpu_seconds - before  # type: ignore[union-attr,operator]
    assert 0.1 * wall < used < 0.65 * wall, (used, wall)  # capped at half a CPU (less on a busy machine)


@pytest.mark.skipif(not CAPS.cgroups.has("cpu"), reason="no writable cpu cgroup")
async def test_a_background_weight_set_before_the_start_is_there_from_its_first_process(tmp_path: Path) -> None:
    """The warm pool gives a sandbox the least CPU weight before it starts: its cgroups are made with it, so its
    holder, the clearing of its uid's keyrings and its first kernel already start on CPU nothing else wants."""
    root = tmp_path / "sbx-bg" / "root"
    jail = Jail(CAPS, sandbox_id="sbx-bg", root=root, private_dir=root.parent, options=JailOptions(internet=False))
    assert jail.cgroups is not None
    jail.cgroups.set_background(True)  # before any of its cgroups exists
    try:
        await jail.start()
        v1 = jail.cgroups.v1.get("cpu")
        weight = (v1 / "cpu.shares") if v1 is not None else (jail.cgroups.v2 / "cpu.weight")  # type: ignore[operator]
        assert weight.read_text().strip() == ("2" if v1 is not None else "1")
        jail.cgroups.set_background(False)
        assert weight.read_text().strip() == ("1024" if v1 is not None else "100")
    finally:
        await jail.stop()


@needs_cgroups
async def test_freeze_stops_everything_and_keeps_it(make_jail: MakeJail) -> None:
    jail = await make_jail()
    counter = jail.root / "tmp" / "count"
    process = await start(jail, "while :; do echo tick >> /tmp/count; done")
    await asyncio.sleep(0.3)
    await jail.freeze()
    frozen_at, cpu = counter.stat().st_size, jail.usage().cpu_seconds  # type: ignore[union-attr]
    await asyncio.sleep(0.5)
    assert counter.stat().st_size == frozen_at and jail.usage().cpu_seconds == cpu  # type: ignore[union-attr]
    await jail.thaw()
    await asyncio.sleep(0.3)
    assert counter.stat().st_size > frozen_at
    assert process.returncode is None
    await kill(process)


async def test_stop_kills_everything_and_removes_cgroups(make_jail: MakeJail) -> None:
    jail = await make_jail(limits=Limits(memory_mb=256))
    process = await start(jail, "sleep 60 & sleep 60 & echo up; wait")
    assert process.stdout is not None and await process.stdout.readline() == b"up\n"
    directories = jail.cgroups.directories if jail.cgroups else []
    await jail.stop()
    assert await asyncio.wait_for(process.wait(), 5) != 0
    assert not jail.running and not any(directory.exists() for directory in directories)
    uid = jail.identity.uid  # type: ignore[union-attr]
    again = await make_jail(limits=Limits(memory_mb=256))  # the sandbox's next jail (a resume): same uid and files
    _, out, _ = await run(again, "id -u")
    assert int(out) == uid == again.identity.uid  # type: ignore[union-attr]


async def _kernel_answers(jail: Jail, relay: bool) -> str:
    """Start ipykernel in the (network-less) jail over an IPC connection file and run one cell."""
    connection = jail.private_dir / "kernel-test.json"
    write_connection_file(str(connection), transport="ipc", ip=str(jail.run_dir / "kernel-test"), key=b"k" * 16)
    info = json.loads(connection.read_text())
    info["ip"] = jail.sandbox_path(info["ip"])  # the kernel binds its sockets at the sandbox's path
    await jail.tree.run(jail.tree.replace_file, "/run/scalebox/kernel-test.json", json.dumps(info).encode(), 0o600)
    connection = jail.run_dir / "kernel-test.json"
    kernel = [sys.executable, "-m", "ipykernel_launcher", "-f", jail.sandbox_path(connection)]
    argv = ["python3", SANDBOX_RELAY, jail.sandbox_path(connection), "--", *kernel] if relay else kernel
    env = {"PATH": "/usr/bin:/bin", "HOME": "/home/user", "JPY_PARENT_PID": str(os.getpid())}
    host_argv, host_env = jail.wrap(argv, env=env, cwd="/home/user")
    process = await asyncio.create_subprocess_exec(*host_argv, env=host_env, start_new_session=True, stderr=-1)
    names = {f"kernel-test-{info[f'{channel}_port']}" for channel in CHANNELS}
    flags = os.O_PATH | os.O_DIRECTORY
    run_fd, host_fd = os.open(jail.run_dir, flags), os.open(jail.host_dir, flags)
    try:  # the server's way: hard links, in a root-only directory, to the sockets the kernel bound
        for _ in range(3000):
            names = {name for name in names if not link_socket(run_fd, host_fd, name, jail.identity.uid)}  # type: ignore[union-attr]
            if not names:
                break
            await asyncio.sleep(0.01)
    finally:
        os.close(run_fd)
        os.close(host_fd)
    client = BlockingKernelClient()
    client.load_connection_info(dict(info, ip=str(jail.link_dir / "kernel-test")))
    client.start_channels()
    try:
        await asyncio.to_thread(client.wait_for_ready, 30)
        reply = await asyncio.to_thread(client.execute_interactive, "import os; os.getuid() * 0 + 42", timeout=30)
        assert reply["content"]["status"] == "ok"
        return str(reply["content"]["status"])
    finally:
        client.stop_channels()
        await kill(process)


async def test_kernel_over_ipc_in_a_jail_without_network(make_jail: MakeJail) -> None:
    jail = await make_jail(internet=False)
    assert await _kernel_answers(jail, relay=False) == "ok"


async def test_relay_serves_a_tcp_kernel_over_ipc(make_jail: MakeJail) -> None:
    jail = await make_jail(internet=False)
    assert await _kernel_answers(jail, relay=True) == "ok"


async def test_jailed_kernel_manager_interrupt_keeps_state(make_jail: MakeJail) -> None:
    """jupyter_client drives a kernel in the jail: a SIGINT interrupt stops a loop, variables stay; restart works."""
    jail = await make_jail(internet=False)
    spec = KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"], language="python")
    kernels = jail.private_dir / "kernels"  # root-only: jupyter_client's own copy of the connection file
    kernels.mkdir(mode=0o700)
    manager = JailedKernelManager(
        jail=jail, connection_file=str(kernels / "kernel-py.json"), kernel_spec_manager=_OneSpec(spec=spec)
    )
    manager.kernel_name = "jailed"
    await manager.start_kernel(env={"PATH": "/usr/bin:/bin", "HOME": "/home/user"})
    client = manager.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=30)
        reply = await client.execute_interactive("x = 41; import os; uid = os.getuid()", timeout=30)
        assert reply["content"]["status"] == "ok"
        assert (jail.run_dir / "kernel-py.json").stat().st_uid == jail.identity.uid  # type: ignore[union-attr]
        loop = asyncio.create_task(client.execute_interactive("import time\nwhile True: time.sleep(0.05)", timeout=30))
        await asyncio.sleep(1.0)
        await manager.interrupt_kernel()
        assert (await loop)["content"]["ename"] == "KeyboardInterrupt"
        outputs: list[str] = []
        reply = await client.execute_interactive(
            "print(x + 1, uid)", timeout=30, output_hook=lambda m: outputs.append(m["content"].get("text", ""))
        )
        assert "".join(outputs).split() == ["42", str(jail.identity.uid)]  # type: ignore[union-attr]
        await manager.restart_kernel(now=True)
        await client.wait_for_ready(timeout=30)
        reply = await client.execute_interactive("x", timeout=30)
        assert reply["content"]["ename"] == "NameError"  # a restart clears the state
    finally:
        client.stop_channels()
        await manager.shutdown_kernel(now=True)
    assert not await manager.is_alive()


async def test_a_stopped_jail_never_starts_again(make_jail: MakeJail) -> None:
    """A start that races the sandbox's end (a kernel, a command or a port asking for it just as it is killed)
    must not revive it: its processes, mounts and namespaces would outlive the sandbox, unseen."""
    jail = await make_jail("sbx-stopped", disk_mb=64)
    assert jail.running
    mounted = str(jail.root)
    racing = asyncio.ensure_future(jail.start())  # asks for it as it is being stopped
    await jail.stop()
    with pytest.raises(JailError, match="has stopped"):
        await racing
    with pytest.raises(JailError, match="has stopped"):
        await jail.start()
    assert not jail.running
    assert mounted not in Path("/proc/mounts").read_text()


@pytest.mark.skipif(can_limit_disk() is not None, reason=f"no disk limits here: {can_limit_disk()}")
async def test_a_disk_image_formatted_ahead_goes_to_one_sandbox_and_the_next_is_made(tmp_path: Path) -> None:
    """The next sandbox's disk is formatted ahead (disk.SpareImage): a start moves it into place, so two sandboxes
    never get the same image, each gets an empty file system of its size, and another spare follows."""
    spares = tmp_path / "spares"
    spare = spares / "spare-64.img"
    options = JailOptions(disk_mb=64, spare_disks=spares, internet=False)
    jails = [
        Jail(CAPS, sandbox_id=name, root=tmp_path / name / "root", private_dir=tmp_path / name, options=options)
        for name in ("sbx-d1", "sbx-d2")
    ]
    first, second = jails
    try:
        await first.start()
        assert first.disk is not None and first.disk_problem is None
        await _until(spare.exists)
        made_ahead = os.stat(spare).st_ino
        await second.start()
        assert second.disk is not None and second.disk_problem is None
        assert os.stat(second.disk.image).st_ino == made_ahead != os.stat(first.disk.image).st_ino
        for jail in jails:
            script = f"echo {jail.sandbox_id} > /tmp/mine; ls -A / | grep -c lost+found; df -m /"
            code, out, err = await run(jail, script)
            assert code == 0, err
            assert out.splitlines()[0] == "0"  # an empty file system: nothing of mkfs's, nothing of another sandbox
            assert 48 <= int(out.splitlines()[-1].split()[1]) <= 64, out
            assert (jail.root / "tmp/mine").read_text() == f"{jail.sandbox_id}\n"
        await _until(lambda: spare.exists() and spare.stat().st_ino != made_ahead)
        assert sorted(path.name for path in spares.iterdir()) == ["spare-64.img"]
        assert spares.stat().st_mode & 0o777 == 0o700
    finally:
        for jail in jails:
            await jail.stop()


async def _until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not in time"
        await asyncio.sleep(0.05)
