"""Escape suite (issue 9): every attack of the issue, run from sandbox code against a real scalebox-local as root.

Each test runs one attack from inside a sandbox (its kernel or its commands) and checks three things: the attack
failed, the server still serves (`/health`, a brand-new sandbox's first cell), and a victim sandbox on the same
server kept its files, its kernel state and its running command. Host-side targets are made by the tests: a
root-only file, a root-owned directory whose names and contents carry a secret, paths that must never appear, and
a directory under /opt (which every sandbox sees read-only at the same path). Where an attack still works, its
test fails and says what happened.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import socket
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import wire
from client_support import config_for
from conftest import REPO, LocalServer
from escape_support import (
    HostFiles,
    Listener,
    Victim,
    assert_server_serves,
    attempt,
    cmdlines,
    create,
    host_ipv4,
    is_root_only,
    rss_kb,
    scanning,
    serve_briefly,
    serve_with_key_file,
    shell,
    start_script,
    uid_of,
    uids_in_use,
    wait_until,
)

from scalebox_kernel.client import CommandResult, Sandbox
from scalebox_kernel.errors import ScaleboxError
from scalebox_kernel.protocol import connect, pb
from scalebox_kernel.server.agent.runtimes import default_registry
from scalebox_kernel.server.isolation import capabilities

CAPS = capabilities()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CAPS.namespaces, reason="no sandboxing here: " + "; ".join(CAPS.problems)),
]
needs_internet = pytest.mark.skipif(not CAPS.private_network, reason="slirp4netns is not installed: no internet parts")

MAX_PROCESSES = 96
DISK_MB = 64
FS = "sandboxagent.Filesystem/"


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., LocalServer]) -> LocalServer:
    return server_factory(extra=[f"--ServerSettings.max_processes={MAX_PROCESSES}"])


@pytest.fixture(scope="module")
def victim(server: LocalServer) -> Iterator[Victim]:
    """The server's first sandbox; every test checks it afterwards."""
    made = Victim.make(server)
    yield made
    made.close()


@pytest.fixture(scope="module")
def attacker(server: LocalServer, victim: Victim) -> Iterator[Sandbox]:
    sandbox = create(server)
    yield sandbox
    sandbox.kill()
    sandbox.close()


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostFiles]:
    made = HostFiles.make(tmp_path_factory.mktemp("host"))
    yield made
    made.close()


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalServer, str, Sandbox]]:
    """A second server (own data dir, key from a 0600 --api-key-file, private networks allowed) and its first
    sandbox."""
    home = tmp_path_factory.mktemp("other")
    key = "file-key-" + secrets.token_hex(16)
    key_file = home / "api-key"
    key_file.write_text(key + "\n")
    os.chmod(key_file, 0o600)
    second = serve_with_key_file(home / "data", key_file, ["--ServerSettings.allow_private_networks=True"])
    try:
        first = create(second)
        yield second, key, first
        first.kill()
        first.close()
    finally:
        second.stop()


def _after(server: LocalServer, victim: Victim, **checks: bool) -> None:
    assert_server_serves(server)
    victim.assert_unaffected(**checks)


def _kernel_names(server: LocalServer, sandbox: Sandbox) -> list[str]:
    """`kernel-<context>` of each kernel of a sandbox, from the server's root-only copies of their connection files.
    A new sandbox starts its default kernel in the background: a first cell waits for it."""
    kernels = server.data_dir / "sandboxes" / sandbox.sandbox_id / "kernels"
    sandbox.run_code("1", timeout=120)
    names = sorted(p.name[: -len(".json")] for p in kernels.glob("kernel-*.json"))
    assert names, f"no kernel connection file in {kernels} after a first cell"
    return names


# ------------------------------------------------------------------------------------------------ 1. /run/scalebox

SOCKET_PLANTER = """
import os, socket, sys, time
run, name = "/run/scalebox", sys.argv[1]
path = f"{run}/{name}"
if os.path.lexists(path):
    os.unlink(path)
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen()
server.settimeout(0.5)
print("planted", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        conn, _ = server.accept()
        print("connected", conn.recv(64), flush=True)
        conn.close()
    except OSError:
        pass
"""


def test_run_dir_links_and_sockets_never_lead_the_server_out(
    server: LocalServer, victim: Victim, attacker: Sandbox, host: HostFiles
) -> None:
    """Attack 1: every name the sandbox owns in /run/scalebox (log, connection file, socket names, the relay's
    TCP twin) made a link to a host path or to the victim's socket, a socket of its own at a socket name, then
    the kernel killed so the server starts a new one with the same names."""
    base = _kernel_names(server, attacker)[0]
    victim_base = _kernel_names(server, victim.sandbox)[0]
    victim_socket = f"/run/scalebox-local/{victim.sandbox.sandbox_id}/{victim_base}-1"
    assert os.path.exists(victim_socket)  # a real host path: the victim's shell socket as the server reaches it
    secret_before = host.secret_file.read_bytes(), host.secret_file.stat().st_mtime_ns
    before = host.state()
    planter = start_script(attacker, "plant_socket", SOCKET_PLANTER, f"{base}-1", ready="planted")
    plan = {
        f"{base}.log": str(host.secret_file),
        f"{base}.json": str(host.missing[0]),
        f"{base}-tcp.json": str(host.missing[1]),
        f"{base}-2": str(host.secret_file),
        f"{base}-3": victim_socket,
        f"{base}-4": str(host.missing[0]),
        f"{base}-5": str(host.secret_file),
        f"{base}-6": str(host.missing[1]),
        f"{victim_base}.log": str(host.secret_file),
    }
    got = attempt(
        attacker,
        f"""
        run, plan = "/run/scalebox", {plan!r}
        for name, target in plan.items():
            temp = f"{{run}}/.planting"
            if os.path.lexists(temp):
                os.unlink(temp)
            os.symlink(target, temp)
            os.replace(temp, f"{{run}}/{{name}}")
        print(json.dumps({{"planted": sorted(n for n in os.listdir(run) if os.path.islink(f"{{run}}/{{n}}"))}}))
        """,
    )
    assert got["planted"] == sorted(plan)  # every link is in place before the kernel dies
    died = attacker.run_code("import os; os.kill(os.getpid(), 9)", timeout=60)
    assert died.error is not None  # the kernel is gone; the next cell makes the server start another
    after = attacker.run_code("print('restarted'); 6 * 7", timeout=120)
    assert after.error is None and after.text == "42", (after.error, after.logs)
    listing = attempt(
        attacker,
        """
        import stat
        run = "/run/scalebox"
        kinds = {n: stat.filemode(os.lstat(f"{run}/{n}").st_mode)[0] for n in os.listdir(run)}
        print(json.dumps(kinds))
        """,
    )
    for port in range(1, 6):  # the new kernel's sockets are its own, whatever was planted at their names
        assert listing[f"{base}-{port}"] == "s", listing
    assert (host.secret_file.read_bytes(), host.secret_file.stat().st_mtime_ns) == secret_before
    assert is_root_only(host.secret_file)
    host.assert_untouched(before)
    log = server.data_dir / "sandboxes" / attacker.sandbox_id / "kernels" / f"{base}.log"
    assert log.is_file() and not log.is_symlink() and log.stat().st_uid == 0  # the server's log is its own file
    assert is_root_only(log.parent)
    planter.kill()
    _after(server, victim)


# ------------------------------------------------------------------------------------------------ 2. races

FLIPPER = """
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
base, dirs, files = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
seconds, most = float(sys.argv[4]), int(sys.argv[5])

def real(kind, path):
    if kind == "d":
        os.makedirs(path + "/sub", exist_ok=True)
        path += "/secret.txt"
    with open(path, "w") as handle:
        handle.write("decoy")

pairs = []  # (kind, name, its twin, link target): one of the two is a link, the other real, and they swap
for kind, targets in (("d", dirs), ("f", files)):
    for index, target in enumerate(targets):
        name, twin = f"{base}/{kind}{index}", f"{base}/.{kind}{index}.twin"
        real(kind, twin)
        os.symlink(target, name)
        pairs.append((kind, name, twin, target))

def repair():
    # Put back what the client moved or removed, so that the race goes on.
    for kind, name, twin, target in pairs:
        links = [p for p in (name, twin) if os.path.islink(p)]
        for path in (name, twin):
            if not os.path.lexists(path):
                if links:
                    real(kind, path)
                else:
                    os.symlink(target, path)
                    links.append(path)
            elif not os.path.islink(path):
                real(kind, path)

encoded = [(name.encode(), twin.encode()) for _, name, twin, _ in pairs]
flips, rounds, deadline = 0, 0, time.monotonic() + seconds
print("flipping", flush=True)
while flips < most and time.monotonic() < deadline:
    for name, twin in encoded:
        libc.renameat2(-100, name, -100, twin, 2)  # RENAME_EXCHANGE: the name always exists, its kind flips
        flips += 1
    rounds += 1
    if rounds % 2000 == 0:
        repair()
print("flips", flips, flush=True)
"""


def test_file_apis_race_against_links_to_the_host(
    server: LocalServer, victim: Victim, attacker: Sandbox, host: HostFiles
) -> None:
    """Attack 2: while sandbox code flips names between real files or directories and links to host paths (a
    root-owned directory, `/`, the /opt one, a root-only file, /etc/shadow), the client calls every file API many
    times. Nothing of the host comes back, nothing lands in or changes on the host, and no call is a 5xx."""
    base = "/home/user/race"
    dirs = [str(host.directory), "/", str(host.opt_dir), "/etc"]
    files = [str(host.secret_file), "/etc/shadow", str(host.opt_dir / "secret.txt")]
    shadow = Path("/etc/shadow").read_bytes()
    before = host.state()
    shell(attacker, f"rm -rf {base}; mkdir -p {base}")
    flipper = start_script(
        attacker, "flipper", FLIPPER, base, ",".join(dirs), ",".join(files), "90", "50000000", ready="flipping"
    )
    fs = attacker.files
    failures: list[str] = []
    errors: list[tuple[str, int | None, str]] = []
    events: list[Any] = []
    decoys: list[str] = []  # reads that hit the real side of a flip (so the race really was on)

    def call(op: str, function: Callable[..., Any], *args: Any) -> Any:
        try:
            return function(*args)
        except ScaleboxError as exc:
            errors.append((op, exc.status_code, str(exc)))
            return None

    def check(op: str, value: Any) -> None:
        text = value if isinstance(value, str | bytes) else repr(value)
        raw = text.encode() if isinstance(text, str) else text
        if raw == b"decoy":
            decoys.append(op)
        if host.leaks(raw) or (shadow.strip() and shadow.strip() in raw) or raw.startswith(b"root:"):
            failures.append(f"{op} returned host data: {raw[:120]!r}")

    calls = 0
    for round_ in range(30):
        for index in range(len(dirs)):
            d = f"{base}/d{index}"
            tag = f"{round_}-{index}"
            check("download", call("download", fs.read, f"{d}/secret.txt"))
            check("upload", call("upload", fs.write, f"{d}/up-{tag}.txt", "uploaded by the client"))
            check("make_dir", call("make_dir", fs.make_dir, f"{d}/mk-{tag}"))
            call("upload", fs.write, f"{base}/src-{tag}.txt", "moved by the client")
            check("move in", call("move", fs.move, f"{base}/src-{tag}.txt", f"{d}/mv-{tag}.txt"))
            check("move out", call("move", fs.move, f"{d}/secret.txt", f"{base}/stolen-{tag}"))
            check("download moved", call("download", fs.read, f"{base}/stolen-{tag}"))
            check("list", call("list", fs.list, d))
            check("stat", call("stat", fs.get_info, f"{d}/secret.txt"))
            check("exists", call("exists", fs.exists, f"{d}/sub"))
            check("remove", call("remove", fs.remove, f"{d}/mk-{tag}"))
            check("remove secret", call("remove", fs.remove, f"{d}/secret.txt"))
            calls += 12
        for index in range(len(files)):
            f = f"{base}/f{index}"
            check("download file", call("download", fs.read, f))
            check("stat file", call("stat", fs.get_info, f))
            calls += 2
        if round_ % 4 == 0:
            handle = call("watch", fs.watch_dir, f"{base}/d{round_ // 4 % len(dirs)}", events.append)
            if handle is not None:
                time.sleep(0.5)
                handle.stop()
            calls += 1
    flipper.kill()
    print(f"{calls} calls, {len(errors)} refused, {len(decoys)} reads of the real side")
    check("watch events", [event.name for event in events])
    assert calls > 1500 and decoys, (calls, len(decoys))
    assert not failures, failures[:5]
    five_hundreds = [e for e in errors if e[1] is None or e[1] >= 500]
    assert not five_hundreds, five_hundreds[:5]
    for _, _, message in errors:
        _assert_no_host_path(message, server)
    host.assert_untouched(before)
    _after(server, victim)


# ------------------------------------------------------------------------------------------------ 3. restart


def test_home_links_survive_a_server_restart(
    server_factory: Callable[..., LocalServer], tmp_path: Path, host: HostFiles
) -> None:
    """Attack 3: ~/.profile a dangling link to a host path, ~/.local and ~/.cache links to a root-owned host
    directory (and, in a second sandbox, to the /opt one the sandbox sees read-only), then the server restarts
    and the sandbox is used again: Python (whose launch makes package dirs under ~/.local) and R."""
    data, key = tmp_path / "restart", "restart-" + secrets.token_hex(8)
    first = server_factory(data_dir=data, api_key=key)
    victim = Victim.make(first)
    linked, ro_linked = create(first), create(first)
    plant = "rm -rf ~/.profile ~/.local ~/.cache && ln -s {0} ~/.profile && ln -s {1} ~/.local && ln -s {1} ~/.cache"
    shell(linked, plant.format(host.missing[2], host.directory))
    shell(ro_linked, plant.format(host.opt_dir / "profile", host.opt_dir))
    before = host.state()
    first.stop()
    assert first.process.returncode == 0
    second = server_factory(data_dir=data, api_key=key)
    victim = Victim(
        Sandbox.connect(victim.sandbox.sandbox_id, config=config_for(second)), victim.command, victim.secret
    )
    outcomes: dict[str, Any] = {}
    attached: list[Sandbox] = [victim.sandbox]
    checks = [("host links", linked.sandbox_id, "python"), ("read-only links", ro_linked.sandbox_id, "python")]
    if "r" in default_registry().available():
        checks.append(("host links, R", linked.sandbox_id, "r"))
    for name, sandbox_id, language in checks:
        code = "import sys; print(sys.version_info[0])" if language == "python" else "cat(1 + 2)"
        try:
            sandbox = Sandbox.connect(sandbox_id, config=config_for(second))
            attached.append(sandbox)
            cell = sandbox.run_code(code, language=language, timeout=120)
            outcomes[name] = cell.error.value if cell.error else "".join(cell.logs.stdout).strip()
        except ScaleboxError as exc:
            outcomes[name] = f"{type(exc).__name__}: {exc}"
    print("after the restart:", outcomes)
    host.assert_untouched(before)  # whatever happened to the sandboxes, the host was not written
    assert not os.path.lexists(host.opt_dir / "profile")
    _after(second, victim, kernel=False, command=False)
    for sandbox in attached:
        with contextlib.suppress(ScaleboxError):
            sandbox.kill()
    assert set(outcomes.values()) == {"3"}, outcomes  # every sandbox is usable again, in every language


# ------------------------------------------------------------------------------------------------ 4. network

NETWORK = """
import subprocess
def route(address):
    done = subprocess.run(["ip", "route", "get", address], capture_output=True, text=True)
    return (done.stdout + done.stderr).strip()
def tcp(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.settimeout(5)
        start = time.monotonic()
        try:
            s.connect((host, port))
            return "CONNECTED"
        except OSError as exc:
            return errno.errorcode.get(exc.errno, "timeout" if isinstance(exc, TimeoutError) else str(exc))
def udp(host, port):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(b"hello", (host, port))
            return "SENT"
        except OSError as exc:
            return errno.errorcode.get(exc.errno, str(exc))
"""
UNROUTED = ("No route to host", "Network is unreachable", "unreachable", "prohibit", "blackhole")


def _network_attempts(sandbox: Sandbox, tcp_targets: dict[str, tuple[str, int]], far: list[str], udp: tuple[str, int]):
    """Connect to each target; an address off this machine only when its route is unreachable (so if the defence
    were broken no packet leaves: the route is reported instead)."""
    return attempt(
        sandbox,
        NETWORK
        + f"""
found = {{name: tcp(h, p) for name, (h, p) in {tcp_targets!r}.items()}}
for address in {far!r}:
    how = route(address)
    found[address] = tcp(address, 80) if any(w in how for w in {UNROUTED!r}) else "ROUTED: " + how
found["udp"] = udp(*{udp!r})
found["routes"] = subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
found["delete route"] = subprocess.run(["ip", "route", "del", "{udp[0]}"], capture_output=True, text=True).returncode
found["delete route in a user namespace"] = subprocess.run(
    ["unshare", "-Ur", "ip", "route", "del", "{udp[0]}"], capture_output=True, text=True).returncode
print(json.dumps(found))
""",
    )


FAR = ["10.0.0.1", "172.16.0.1", "192.168.0.1", "100.64.0.1", "169.254.169.254"]


@needs_internet
def test_host_services_and_private_ranges_are_out_of_reach(
    server: LocalServer, victim: Victim, attacker: Sandbox
) -> None:
    """Attack 4: from a sandbox with internet, the host's own address, its loopback (also through slirp's
    gateway), the server's port, the private ranges and the metadata address."""
    address = host_ipv4()
    assert address, "no non-loopback IPv4 address on this host"
    info = attacker.get_info().isolation
    assert info is not None and info["network"] == "private" and info["private_networks"] is False
    listeners = {"host address": Listener(address), "loopback": Listener("127.0.0.1")}
    if socket.has_ipv6:
        with contextlib.suppress(OSError):  # no IPv6 loopback on this host
            listeners["loopback6"] = Listener("::1")
    udp = Listener(address, socket.SOCK_DGRAM)
    server_port = int(server.url.rsplit(":", 1)[1])
    targets = {name: (listener.host, listener.port) for name, listener in listeners.items()}
    targets["gateway to host loopback"] = ("10.0.2.2", listeners["loopback"].port)
    targets["server via gateway"] = ("10.0.2.2", server_port)
    targets["server on host address"] = (address, server_port)
    try:
        got = _network_attempts(attacker, targets, FAR, (address, udp.port))
        time.sleep(0.5)
        reached = {name: listener.reached for name, listener in listeners.items()} | {"udp": udp.reached}
    finally:
        for listener in (*listeners.values(), udp):
            listener.close()
    assert not any(reached.values()), reached
    unreachable = ("EHOSTUNREACH", "ENETUNREACH")
    assert got["host address"] in unreachable and got["server on host address"] in unreachable, got
    for name in ("loopback", "loopback6", "gateway to host loopback", "server via gateway"):
        if name in got:  # the sandbox's own loopback, or slirp's refusal
            assert got[name] != "CONNECTED", (name, got[name])
    for far in FAR:
        assert got[far] in unreachable, (far, got[far])
    assert got["udp"] in (*unreachable, "SENT"), got["udp"]
    assert got["delete route"] != 0 and got["delete route in a user namespace"] != 0
    _after(server, victim)


@needs_internet
def test_allowing_private_networks_still_blocks_the_host(other: tuple[LocalServer, str, Sandbox]) -> None:
    """With allow_private_networks the private ranges are routed (only checked, never connected to), and the
    host's own address is still unreachable."""
    second, _, sandbox = other
    address = host_ipv4()
    assert address
    info = sandbox.get_info().isolation
    assert info is not None and info["private_networks"] is True
    listener = Listener(address)
    udp = Listener(address, socket.SOCK_DGRAM)
    try:
        got = _network_attempts(sandbox, {"host address": (address, listener.port)}, [], (address, udp.port))
        routes = attempt(sandbox, NETWORK + f"print(json.dumps({{a: route(a) for a in {FAR!r}}}))")
        time.sleep(0.5)
        assert not listener.reached and not udp.reached
    finally:
        listener.close()
        udp.close()
    assert got["host address"] in ("EHOSTUNREACH", "ENETUNREACH"), got
    metadata = routes.pop(FAR[-1])
    assert any(word in metadata for word in UNROUTED), metadata  # link-local stays blocked
    for far, how in routes.items():
        assert not any(word in how for word in UNROUTED), (far, how)  # routed via slirp, as allowed
    assert f"unreachable {address}" in got["routes"] and "unreachable 10.0.0.0/8" not in got["routes"]
    assert_server_serves(second)


# ------------------------------------------------------------------------------------------------ 5. uids

KEYS = """
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
USER_KEYRING = ctypes.c_long(-4)
def add(description, payload):
    data = payload.encode()
    key = libc.syscall(248, b"user", description.encode(), data, ctypes.c_size_t(len(data)), USER_KEYRING)
    return key if key >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")
def find(description):
    key = libc.syscall(250, 10, USER_KEYRING, b"user", description.encode(), 0)  # KEYCTL_SEARCH
    if key < 0:
        return errno.errorcode.get(ctypes.get_errno(), "?")
    buffer = ctypes.create_string_buffer(512)
    size = libc.syscall(250, 11, ctypes.c_long(key), buffer, ctypes.c_size_t(512))  # KEYCTL_READ
    return buffer.raw[:size].decode() if size >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")
def clear():
    return libc.syscall(250, 7, USER_KEYRING)  # KEYCTL_CLEAR
"""


BOMB = """
import os, time
started = 0
try:
    while started < 2000:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        started += 1
except OSError as exc:
    print("stopped", started, exc.errno, flush=True)
time.sleep(30)
"""


def _keys(sandbox: Sandbox, code: str) -> dict[str, Any]:
    return attempt(sandbox, KEYS + textwrap.dedent(code))


def test_two_servers_never_share_a_uid(
    server: LocalServer, victim: Victim, attacker: Sandbox, other: tuple[LocalServer, str, Sandbox]
) -> None:
    """Attack 5: sandboxes of two servers with different data dirs: different uids from the first sandbox on, a
    secret in one's user keyring out of the other's reach, and one's fork bomb does not stop the other."""
    _, _, theirs = other
    assert uid_of(victim.sandbox) != uid_of(theirs)  # both servers' first sandboxes
    assert uid_of(attacker) not in (uid_of(victim.sandbox), uid_of(theirs))
    description, payload = "escape-" + secrets.token_hex(4), "keyring-secret-" + secrets.token_hex(8)
    stored = _keys(
        theirs, f"print(json.dumps({{'added': add({description!r}, {payload!r}), 'own': find({description!r})}}))"
    )
    assert isinstance(stored["added"], int) and stored["own"] == payload  # keyrings work in a sandbox
    for sandbox in (attacker, victim.sandbox):
        found = _keys(sandbox, f"print(json.dumps({{'found': find({description!r})}}))")
        assert found["found"] == "ENOKEY", found
    _keys(theirs, "print(json.dumps({'cleared': clear()}))")
    bomb = start_script(attacker, "bomb", BOMB, ready="stopped")
    started = int(bomb.stdout.split()[1])
    assert started < MAX_PROCESSES and bomb.stdout.split()[2] == str(errno.EAGAIN)
    assert theirs.run_code("sum(range(10))").text == "45"  # the other server's sandbox still starts processes
    assert theirs.commands.run("echo still").stdout == "still\n"
    assert victim.sandbox.commands.run("echo still").stdout == "still\n"
    bomb.kill()
    _after(server, victim)


def test_a_reused_uid_brings_no_keyring_secret(other: tuple[LocalServer, str, Sandbox]) -> None:
    """Attack 5b: a sandbox stores a secret in its user keyring and is killed; the next sandbox gets its uid back
    (the lowest free one) and must not find the secret (the kernel keeps a uid's keyring after its last process)."""
    second, _, theirs = other
    first = create(second)
    uid = uid_of(first)
    description, payload = "reuse-" + secrets.token_hex(4), "left-behind-" + secrets.token_hex(8)
    stored = _keys(first, f"print(json.dumps({{'added': add({description!r}, {payload!r})}}))")
    assert isinstance(stored["added"], int)
    first.kill()
    first.close()
    # Its killed kernel lingers as a zombie for a moment (the uid is not handed out while any process has it).
    assert wait_until(lambda: uid not in uids_in_use(), 60), f"a process of uid {uid} outlived its sandbox"
    made: list[Sandbox] = []  # new sandboxes take the lowest free uids: fill any freed below ours until ours
    try:
        for _ in range(6):
            made.append(create(second))
            if uid_of(made[-1]) == uid:
                break
        else:
            pytest.skip(f"uid {uid} was taken by another server before it came back: no reuse this time")
        later = made[-1]
        found = _keys(later, f"print(json.dumps({{'found': find({description!r})}}))")
        if found["found"] != "ENOKEY":
            _keys(later, "print(json.dumps({'cleared': clear()}))")
        assert found["found"] == "ENOKEY", f"sandbox {later.sandbox_id} got uid {uid} and its last owner's key: {found}"
    finally:
        for sandbox in made:
            sandbox.kill()
            sandbox.close()
    assert theirs.run_code("1 + 1").text == "2"


# ------------------------------------------------------------------------------------------------ 6. disk


def test_disk_fill_stays_inside_the_sandbox(server: LocalServer, victim: Victim) -> None:
    """Attack 6: a sandbox with a small disk fills it: ENOSPC inside, 507 on upload, the limit reported, and the
    host's file system loses no more than the limit."""
    data_fs = os.statvfs(server.data_dir)
    free_before = data_fs.f_bavail * data_fs.f_frsize
    filler = create(server, disk_mb=DISK_MB)
    try:
        info = filler.get_info().isolation
        assert info is not None and info["limits"]["disk_mb"] == DISK_MB and "disk-limit" not in info["missing"]
        out = shell(filler, "dd if=/dev/zero of=/home/user/fill bs=1M count=1024 status=none; echo dd=$?", 120)
        assert "No space left on device" in out and "dd=1" in out, out
        got = attempt(
            filler,
            """
            found = {}
            try:
                with open("/tmp/more", "wb") as handle:
                    for _ in range(64):
                        handle.write(b"x" * 1024 * 1024)
                        handle.flush()
                found["python"] = "wrote"
            except OSError as exc:
                found["python"] = errno.errorcode[exc.errno]
            print(json.dumps(found))
            """,
        )
        assert got["python"] == "ENOSPC"
        with pytest.raises(ScaleboxError) as refused:
            filler.files.write("/home/user/upload.bin", b"y" * 4 * 1024 * 1024)
        assert refused.value.status_code == 507, refused.value
        with server.client() as http:
            metrics = http.get(f"/v1/sandboxes/{filler.sandbox_id}/metrics").json()["data"]
        assert 0.8 * DISK_MB * 2**20 <= metrics["disk_total"] <= DISK_MB * 2**20
        assert metrics["disk_used"] >= 0.9 * metrics["disk_total"], metrics
        image = server.data_dir / "sandboxes" / filler.sandbox_id / "disk.img"
        assert image.stat().st_blocks * 512 <= 1.05 * DISK_MB * 2**20
        data_fs = os.statvfs(server.data_dir)
        dropped = free_before - data_fs.f_bavail * data_fs.f_frsize
        assert dropped < (DISK_MB + 400) * 2**20, f"the host lost {dropped / 2**20:.0f} MiB"  # others write too
        _after(server, victim)
    finally:
        filler.kill()
        filler.close()


def test_a_disk_limit_the_host_cannot_hold_is_refused(server: LocalServer) -> None:
    """Attack 6b: images are sparse, so a limit above the host's free space is no limit: a sandbox with one can
    still fill the host's file system (and with it every other sandbox's)."""
    data_fs = os.statvfs(server.data_dir)
    free_mb = data_fs.f_bavail * data_fs.f_frsize // 2**20
    with server.client() as http:
        r = http.post("/v1/sandboxes", json={"timeout": 60, "disk_mb": free_mb + 1024})
        if r.status_code < 300:
            sandbox_id = r.json()["data"]["sandbox_id"]
            http.delete(f"/v1/sandboxes/{sandbox_id}")
    assert r.status_code in (400, 507), (
        f"disk_mb={free_mb + 1024} (host free: {free_mb} MiB) was accepted: {r.status_code}"
    )


# ------------------------------------------------------------------------------------------------ 7. argv


def test_no_secret_in_any_command_line(server: LocalServer, victim: Victim, tmp_path: Path) -> None:
    """Attack 7: the whole host's argv, scanned while a sandbox with a secret env var runs a long command given
    another secret and a kernel runs a cell with a third: none shows, nor the server's API key."""
    env_secret, command_secret, cell_secret = (f"argv-secret-{n}-" + secrets.token_hex(8) for n in range(3))
    needles = [s.encode() for s in (env_secret, command_secret, cell_secret, server.api_key)]
    with scanning(needles) as hits:
        holder = create(server, env_vars={"SANDBOX_SECRET": env_secret})
        try:
            command = holder.commands.run(
                "sleep 6; echo done", envs={"COMMAND_SECRET": command_secret}, background=True
            )
            assert not isinstance(command, CommandResult)
            cell = holder.run_code(
                "import os, time; time.sleep(3); print(os.environ['SANDBOX_SECRET'] == "
                f"{env_secret!r}, os.environ.get('CELL_SECRET') == {cell_secret!r})",
                envs={"CELL_SECRET": cell_secret},
            )
            assert "".join(cell.logs.stdout).strip() == "True True"
            assert command.wait().stdout == "done\n"
        finally:
            holder.kill()
            holder.close()
    assert not hits, [(pid, line.replace(b"\0", b" ")[:200]) for pid, line in hits[:3]]
    _after(server, victim)


@pytest.mark.parametrize(
    "args",
    [["--api-key", "{key}"], ["--api-key={key}"], ["--ServeApp.api_key={key}"], ["--ServeApp.api_key", "{key}"]],
    ids=["api-key", "api-key=", "trait=", "trait-space"],
)
def test_serve_refuses_a_key_on_the_command_line(args: list[str], tmp_path: Path) -> None:
    key = "cli-key-" + secrets.token_hex(8)
    code, output = serve_briefly([arg.format(key=key) for arg in args], tmp_path)
    assert code == 2, f"serve {' '.join(args)} kept running with the key in its argv: {output[-300:]}"
    assert "command line" in output and key not in output


def test_serve_takes_its_key_only_from_a_private_file(tmp_path: Path, other: tuple[LocalServer, str, Sandbox]) -> None:
    public = tmp_path / "public-key"
    public.write_text("public-" + secrets.token_hex(8) + "\n")
    os.chmod(public, 0o644)
    code, output = serve_briefly(["--api-key-file", str(public)], tmp_path)
    assert code == 2 and "readable by other users" in output, output[-300:]
    second, key, _ = other  # started with a 0600 --api-key-file and no key in its environment
    assert second.api_key == key
    with httpx.Client(base_url=second.url, timeout=30) as http:
        assert http.get("/v1/sandboxes", headers={"X-API-KEY": key}).status_code == 200
        assert http.get("/v1/sandboxes", headers={"X-API-KEY": "wrong"}).status_code == 401
    assert not any(key.encode() in line for line in cmdlines().values())


# ------------------------------------------------------------------------------------------------ 8. error texts


def _host_paths(server: LocalServer) -> list[str]:
    return [
        str(server.data_dir),
        str(server.data_dir.resolve()),
        "/tmp/pytest",
        str(server.runtime_dir),
        "/run/scalebox-local",
        "/var/lib/scalebox-local",
        str(REPO),
        "sandboxes/sbx-",
    ]


def _assert_no_host_path(text: str, server: LocalServer) -> None:
    for path in _host_paths(server):
        assert path not in text, f"a host path ({path}) in: {text[:300]}"


def test_errors_name_sandbox_paths_only(server: LocalServer, victim: Victim, attacker: Sandbox) -> None:
    """Attack 8: every error the file APIs and RPCs can be pushed into; no text names a host path of the server."""
    with server.client() as http:
        info = http.get(f"/v1/sandboxes/{attacker.sandbox_id}").json()["data"]
    base = wire.agent_base(server.url, info["sandbox_domain"])
    token = info["envd_access_token"]
    headers = {"X-Access-Token": token}
    shell(
        attacker,
        "rm -rf ~/errs && mkdir -p ~/errs/full/a ~/errs/empty ~/errs/d && echo x > ~/errs/file && "
        "ln -s loop1 ~/errs/loop2 && ln -s loop2 ~/errs/loop1 && ln -s d ~/errs/link-to-d && mkfifo ~/errs/fifo && "
        "python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind(\"/home/user/errs/sock\")'",
    )
    long_name = "n" * 300
    deep = "/home/user/errs/" + "/".join(["d" * 200] * 19)  # about 3.8 KB: under PATH_MAX, made for real
    at_limit = deep + "/" + "e" * (4096 - len(deep) - 1)  # 4096 bytes: the server takes it, the kernel does not
    too_long = "/home/user/" + "p" * 4200
    texts: list[str] = []
    server_errors: list[str] = []

    def note(status: int, what: str, body: Any) -> None:
        texts.append(str(body))
        if status >= 500:
            server_errors.append(f"{what}: {status} {str(body)[:200]}")

    with httpx.Client(timeout=60) as agent:

        def rpc(method: str, request: Any, response: Any) -> tuple[int, Any]:
            for codec in (connect.PROTO, connect.JSON):
                status, body = wire.unary(agent, base, FS + method, request, response, token, codec)
                note(status, f"{method} {str(request)[:80]!r}", body)
            return status, body

        for path in (long_name, f"/home/user/errs/{long_name}/x", too_long, deep, at_limit,
                     "/etc/x", "/run/scalebox-host/x", "/proc/x", "/home/user/errs/file/x", "/"):  # fmt: skip
            rpc("MakeDir", pb.MakeDirRequest(path=path), pb.MakeDirResponse)
            rpc("Stat", pb.StatRequest(path=path), pb.StatResponse)
            rpc("ListDir", pb.ListDirRequest(path=path, depth=2), pb.ListDirResponse)
            rpc("Remove", pb.RemoveRequest(path=path), pb.RemoveResponse)
        e = "/home/user/errs"
        for source, destination in (
            (f"{e}/d", f"{e}/full"),  # onto a non-empty directory
            (f"{e}/file", f"{e}/empty"),  # a file onto a directory
            (f"{e}/empty", f"{e}/file"),  # a directory onto a file
            (f"{e}/d", f"{e}/d/inside"),  # into itself
            (f"{e}/d", f"{e}/link-to-d/inside"),  # into itself, through a link
            (f"{e}/file", "/dev/shm/file"),  # across mounts
            (f"{e}/file", "/etc/passwd"),
            (f"{e}/file", "/run/scalebox-host/x"),
            ("/run/scalebox-host", f"{e}/stolen"),
            ("/etc/hostname", f"{e}/x"),
            (f"{e}/file", f"{e}/{long_name}"),
            (f"{e}/file", too_long),
            (f"{e}/missing", f"{e}/x"),
            ("/", f"{e}/x"),
            (f"{e}/file", "/"),
            ("/home/user", "/home/elsewhere"),
        ):
            rpc("Move", pb.MoveRequest(source=source, destination=destination), pb.MoveResponse)
        for path in (f"{e}/loop1", "/run/scalebox-host", f"{e}/fifo", f"{e}/file"):
            rpc("ListDir", pb.ListDirRequest(path=path), pb.ListDirResponse)
            rpc("Stat", pb.StatRequest(path=path + "/x"), pb.StatResponse)
        for path in ("/etc/shadow", "/run/scalebox-host/x", f"{e}/fifo", f"{e}/sock", f"{e}/d", f"{e}/loop1",
                     "/dev/null", long_name, f"{e}/missing"):  # fmt: skip
            r = agent.get(f"{base}/download/x", params={"path": path}, headers=headers)
            note(r.status_code, f"download {path[:80]}", r.text)
        for path in ("/etc/x", "/run/scalebox-host/x", f"{e}/d", "/", f"{e}/file/x", "/dev/shm/x", "/proc/x",
                     f"{e}/{long_name}", too_long):  # fmt: skip
            r = agent.post(f"{base}/upload", params={"path": path}, files={"file": ("f", b"data")}, headers=headers)
            note(r.status_code, f"upload {path[:80]}", r.text)
        r = agent.post(f"{base}/upload", content=b"--x\r\n", headers={**headers, "Content-Type": "multipart/form-data"})
        texts.append(r.text)
        for method, request, response in (
            ("sandboxagent.Filesystem/WatchDir", pb.WatchDirRequest(path="/run/scalebox-host"), pb.WatchDirResponse),
            ("sandboxagent.Filesystem/WatchDir", pb.WatchDirRequest(path=f"{e}/file"), pb.WatchDirResponse),
            ("sandboxagent.Process/Start", _start("/nonexistent/program"), pb.StartResponse),
            ("sandboxagent.Process/Start", _start("/bin/true", cwd=f"{e}/file"), pb.StartResponse),
            ("sandboxagent.Process/Start", _start("/bin/true", cwd="/run/scalebox-host"), pb.StartResponse),
            ("sandboxagent.Process/Start", _start("/run/scalebox-host/x"), pb.StartResponse),
            ("sandboxagent.Process/Start", _start(f"{e}/d"), pb.StartResponse),
        ):
            reply = wire.stream(agent, base, method, request, response, token)
            texts.append(str(reply.error) + str(reply.messages))
        for cwd in ("/run/scalebox-host", f"{e}/file"):
            context = pb.CreateContextRequest(cwd=cwd)
            status, body = wire.unary(
                agent, base, "sandboxagent.ContextService/CreateContext", context, pb.Context, token
            )
            note(status, f"CreateContext {cwd}", body)
        for path in ("/proc/1/cwd", "/proc/1/root", "/proc/1/exe", "/proc/1/fd"):  # links the server reads
            rpc("Stat", pb.StatRequest(path=path), pb.StatResponse)
            rpc("ListDir", pb.ListDirRequest(path=path), pb.ListDirResponse)
    # The kernel cannot start: its connection file's name is a directory, then its run directory is closed.
    kernel = _kernel_names(server, attacker)[0]
    for sabotage, repair in (
        (f"rm -f /run/scalebox/{kernel}.json; mkdir /run/scalebox/{kernel}.json", f"rmdir /run/scalebox/{kernel}.json"),
        ("chmod 000 /run/scalebox", "chmod 700 /run/scalebox"),
    ):
        shell(attacker, sabotage)
        try:
            for code in ("import os; os.kill(os.getpid(), 9)", "1"):
                texts.append(_cell_outcome(attacker, code))
        finally:
            shell(attacker, repair)
    recovered = attacker.run_code("6 * 7", timeout=120)
    assert recovered.text == "42", (recovered.error, recovered.logs)
    assert len(texts) > 150
    for text in texts:
        _assert_no_host_path(text, server)
    assert not server_errors, server_errors
    _after(server, victim)


def _cell_outcome(sandbox: Sandbox, code: str) -> str:
    """What a cell gave back: its error and stderr, or the error the call raised."""
    try:
        cell = sandbox.run_code(code, timeout=120)
    except ScaleboxError as exc:
        return f"{type(exc).__name__}: {exc}"
    return repr(cell.error) + "".join(cell.logs.stderr)


def _start(cmd: str, cwd: str | None = None) -> pb.StartRequest:
    config = pb.ProcessConfig(cmd=cmd)
    if cwd:
        config.cwd = cwd
    return pb.StartRequest(process=config)


# ------------------------------------------------------------------------------------------------ 9. what held


ABSTRACT = """
import socket, sys, time
server = socket.socket(socket.AF_UNIX)
server.bind("\\0" + sys.argv[1])
server.listen()
print("bound", flush=True)
time.sleep(60)
"""


def test_the_escapes_that_held_still_hold(server: LocalServer, victim: Victim, attacker: Sandbox) -> None:
    """ptrace, mount, raw sockets, mknod, setuid programs, writes to /opt /usr /etc and the runtimes, abstract unix
    sockets (the victim's and the host's): none works (test_isolation.py covers files, signals, the victim's
    kernel and the control plane without internet)."""
    abstract = "scalebox-escape-" + secrets.token_hex(4)
    host_abstract = socket.socket(socket.AF_UNIX)
    host_abstract.bind("\0" + abstract + "-host")
    host_abstract.listen()
    listener = start_script(victim.sandbox, "abstract", ABSTRACT, abstract, ready="bound")
    runtime_file = Path(os.path.realpath(default_registry().resolve("python").store.venv)) / "escape-test"
    try:
        got = attempt(
            attacker,
            f"""
            libc = ctypes.CDLL(None, use_errno=True)
            def check(result):
                if result != 0:
                    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
                return result
            def unix(name):
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(name)
            os.makedirs("/tmp/mnt", exist_ok=True)
            found = {{
                "ptrace init": tried(lambda: check(libc.ptrace(16, 1, None, None))),  # PTRACE_ATTACH
                "mount": tried(lambda: check(libc.mount(b"none", b"/tmp/mnt", b"tmpfs", 0, None))),
                "remount /usr": tried(lambda: check(libc.mount(None, b"/usr", None, 32 | 4096, None))),
                "raw socket": tried(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)),
                "packet socket": tried(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW)),
                "mknod": tried(lambda: os.mknod("/tmp/null2", 0o20666, os.makedev(1, 3))),
                "write /usr": tried(lambda: open("/usr/escape-test", "w")),
                "write /etc": tried(lambda: open("/etc/escape-test", "w")),
                "write /opt": tried(lambda: open("/opt/escape-test", "w")),
                "write runtimes": tried(lambda: open({str(runtime_file)!r}, "w")),
                "victim abstract": tried(lambda: unix("\\0{abstract}")),
                "host abstract": tried(lambda: unix("\\0{abstract}-host")),
                "no_new_privs": open("/proc/self/status").read().split("NoNewPrivs:")[1].split()[0],
            }}
            import subprocess
            done = subprocess.run(["/usr/bin/mount", "-t", "tmpfs", "none", "/tmp/mnt"], capture_output=True,
                                  text=True)
            found["setuid mount"] = [done.returncode, done.stderr.strip()[-120:]]
            done = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs none /tmp/mnt && touch /tmp/mnt/x"],
                                  capture_output=True, text=True)
            found["mount in own user namespace"] = done.returncode
            found["its mount seen outside it"] = os.path.exists("/tmp/mnt/x")
            print(json.dumps(found))
            """,
        )
    finally:
        listener.kill()
        host_abstract.close()
    for name in ("ptrace init", "mount", "remount /usr", "raw socket", "packet socket", "mknod"):
        assert got[name].startswith(("PermissionError", "OSError:EPERM", "OSError:EACCES")), (name, got[name])
    for name in ("write /usr", "write /etc", "write /opt", "write runtimes"):
        assert got[name].startswith(("OSError:EROFS", "PermissionError")), (name, got[name])
    for name in ("victim abstract", "host abstract"):
        assert got[name].startswith("ConnectionRefusedError"), (name, got[name])
    assert got["no_new_privs"] == "1"
    assert got["setuid mount"][0] != 0, got["setuid mount"]
    assert got["its mount seen outside it"] is False
    assert not os.path.exists("/usr/escape-test") and not runtime_file.exists()
    assert attacker.files.list("/tmp/mnt") == []  # what the server sees is the jail's own mount namespace
    _after(server, victim)


# ------------------------------------------------------------------------------------------------ extras


def test_names_the_sandbox_makes_do_not_break_the_file_apis(server: LocalServer, attacker: Sandbox) -> None:
    """A file name that is not UTF-8 (sandbox code can make one) is listed, watched and removed, not a 5xx."""
    shell(attacker, "rm -rf ~/names && mkdir ~/names && touch ~/names/plain && python3 -c "
                    "'open(b\"/home/user/names/\\xff\\xfe\", \"w\").close()'")  # fmt: skip
    try:
        entries = attacker.files.list("/home/user/names")
    except ScaleboxError as exc:
        pytest.fail(f"ListDir of a directory with a non-UTF-8 name: {exc.status_code} {exc}")
    assert "plain" in [entry.name for entry in entries]


def test_kernel_messages_cannot_grow_the_server_without_bound(server: LocalServer, victim: Victim) -> None:
    """A kernel (sandbox code) queues big iopub messages while no cell reads them: they pile up in the root server,
    outside the sandbox's memory limit."""
    flooder = create(server, memory_mb=256)
    try:
        before = rss_kb(server.process.pid)
        cell = flooder.run_code(
            textwrap.dedent(
                """
                import threading, time
                kernel = get_ipython().kernel
                def flood():
                    time.sleep(1)  # after this cell's idle, when nobody reads iopub
                    blob = b"x" * (48 * 1024 * 1024)
                    for _ in range(12):
                        kernel.session.send(kernel.iopub_socket, "display_data",
                                            {"data": {"text/plain": "x"}, "metadata": {}}, buffers=[blob])
                        time.sleep(0.2)
                    open("/tmp/flood.done", "w").write("12")
                threading.Thread(target=flood, daemon=True).start()
                """
            )
        )
        assert cell.error is None
        assert wait_until(lambda: flooder.files.exists("/tmp/flood.done"), 60)
        time.sleep(1)
        grown_mb = (rss_kb(server.process.pid) - before) / 1024
        assert flooder.run_code("1 + 1").text == "2"
        assert grown_mb < 256, f"the server grew by {grown_mb:.0f} MiB for a sandbox limited to 256 MiB"
    finally:
        flooder.kill()
        flooder.close()
    _after(server, victim)
