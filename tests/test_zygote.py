"""Kernels forked by the zygote (kernel/launch.py, kernel/zygote.py), started as frontends start them: through
jupyter_client and the installed kernelspecs. The first start runs the kernel in its own process and starts the
zygote; later ones are forked, run cells on a real scalebox-local, get their launcher's environment (the zygote
holds no credential), end with it, get its signals and give it their exit status, free their ports for a
restart, end when orphaned and outlive a killed zygote. A zygote whose code changed on disk declines and a fresh
one takes over; bad requests and a socket directory others can enter change nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import LocalServer
from jupyter_client.connect import write_connection_file
from jupyter_client.manager import KernelManager
from kernel_support import KERNEL, environ, frontend_script, scalebox_kernels

from scalebox_kernel.kernel import zygote

KERNEL_ARGV = [sys.executable, "-m", "scalebox_kernel.kernel"]
#: A package file whose change makes a zygote stale.
PACKAGE_FILE = Path(__file__).resolve().parent.parent / "scalebox_kernel" / "kernel" / "relay.py"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def scalebox_env(local_server: LocalServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with scalebox_kernels(local_server, tmp_path_factory):
        yield


@pytest.fixture
def zygote_dir(tmp_path: Path) -> Iterator[Path]:
    """A zygote directory of the test's own (the session's zygote is not touched), its zygotes stopped after."""
    directory = tmp_path / "z"
    with environ({"SCALEBOX_ZYGOTE_DIR": str(directory)}):
        yield directory
    zygote.stop(directory)


def wait_for(condition: Callable[[], object], timeout: float = 30.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not hold within {timeout:g} s"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode().partition("=")[::2] for item in raw.split(b"\0") if b"=" in item)


def zygote_up(directory: Path) -> int:
    """Start (and stop) a first kernel, which spawns the zygote; the zygote's pid once it serves."""
    Kernel().stop()
    return zygote_pid(directory)


def zygote_pid(directory: Path) -> int:
    """The pid of the zygote serving `directory` (once it serves)."""
    wait_for(lambda: list(directory.glob("*.sock")) and zygote.running(directory), what="a zygote serving")
    (pid,) = zygote.running(directory)
    return pid


def runs_the_kernel_itself(pid: int) -> bool:
    """Whether `pid` is a kernel in its own process (its iopub, control and heartbeat threads), not a launcher
    standing in for a forked one (a single thread, waiting on the zygote's socket)."""
    wait_for(lambda: alive(pid), 5, "the process")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        threads = int(next(line for line in status.splitlines() if line.startswith("Threads:")).split()[1])
        if threads > 1:
            return True
        time.sleep(0.1)
    return False


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if parent_of(int(entry)) == pid and alive(int(entry)):
                    found.add(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return found


def forked_kernel(parent: int, before: set[int] | None = None, timeout: float = 30.0) -> int:
    """The pid of the kernel the zygote forked last (its one child not in `before`). A forked process's
    /proc/PID/environ and cmdline stay the zygote's (it was never exec'd), so its parent tells it."""
    new: set[int] = set()

    def look() -> bool:
        new.update(children_of(parent) - (before or set()))
        return bool(new)

    wait_for(look, timeout, f"a kernel forked by zygote {parent}")
    assert len(new) == 1, new
    return new.pop()


def assert_forks_and_runs(parent: int, code: str, result: str) -> None:
    """A kernel started now is forked by `parent` and gives `result` for `code`."""
    kernel = Kernel()
    try:
        forked_kernel(parent)
        assert kernel.run(code) == result
    finally:
        kernel.stop()


class Kernel:
    """A kernel started through jupyter_client from the installed kernelspec (that is, through the launcher)."""

    def __init__(self) -> None:
        self.km = KernelManager(kernel_name=KERNEL)
        self.km.start_kernel()
        assert self.km.provisioner is not None
        self.process: subprocess.Popen[bytes] = self.km.provisioner.process  # type: ignore[attr-defined]
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    @property
    def launcher(self) -> int:
        return self.process.pid

    def run(self, code: str) -> str:
        """The text/plain result of `code` (or the stream output)."""
        msg_id = self.kc.execute(code)
        texts: list[str] = []
        while True:
            msg = self.kc.get_iopub_msg(timeout=120)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            content = msg["content"]
            if msg["msg_type"] == "execute_result":
                texts.append(content["data"]["text/plain"])
            elif msg["msg_type"] == "stream":
                texts.append(content["text"])
            elif msg["msg_type"] == "error":
                raise AssertionError(content)
            elif msg["msg_type"] == "status" and content["execution_state"] == "idle":
                return "".join(texts)

    def stop(self) -> None:
        self.kc.stop_channels()
        if self.km.has_kernel:
            self.km.shutdown_kernel(now=False)


def test_kernels_after_the_first_are_forked_hold_their_own_environment_and_run_cells(
    zygote_dir: Path, local_server: LocalServer
) -> None:
    first = Kernel()
    try:
        assert runs_the_kernel_itself(first.launcher), "without a zygote the kernel runs in its own process"
        parent = zygote_pid(zygote_dir)
        second = Kernel()
        try:
            kernel = forked_kernel(parent)
            # The kernel has its launcher's environment (the server's address and key: its cells run); the
            # zygote has none of it, and no command line holds the key.
            assert second.run("1+1") == "2"
            assert second.run("print('from the sandbox')") == "from the sandbox\n"
            assert "SCALEBOX_API_KEY" not in environ_of(parent)
            assert local_server.api_key.encode() not in Path(f"/proc/{parent}/environ").read_bytes()
            for pid in (parent, kernel, second.launcher):
                assert local_server.api_key.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
            process = second.process
        finally:
            second.stop()
        assert process.wait(30) == 0, "a kernel shut down by its frontend ends its launcher with status 0"
        assert not alive(kernel)
    finally:
        first.stop()
    assert alive(parent), "the zygote stays for the next kernels"


def test_a_killed_launcher_takes_its_kernel_along_and_a_restart_gets_the_same_ports(zygote_dir: Path) -> None:
    parent = zygote_up(zygote_dir)
    kernel = Kernel()
    try:
        old = forked_kernel(parent)
        os.kill(kernel.launcher, signal.SIGKILL)
        wait_for(lambda: not alive(old), 10, "the kernel of a killed launcher ending")
        kernel.km.restart_kernel(now=True)  # the same connection file: the same ports
        kernel.process = kernel.km.provisioner.process  # type: ignore[union-attr, attr-defined]
        kernel.kc.wait_for_ready(timeout=60)
        assert forked_kernel(parent, {old}) != old
        assert kernel.run("21 * 2") == "42"
    finally:
        kernel.stop()


def test_signals_reach_the_kernel_and_the_launcher_ends_as_it_did(zygote_dir: Path) -> None:
    parent = zygote_up(zygote_dir)
    kernel = Kernel()
    try:
        pid = forked_kernel(parent)
        os.kill(kernel.launcher, signal.SIGTERM)
        assert kernel.process.wait(30) == -signal.SIGTERM
        assert not alive(pid)
    finally:
        kernel.stop()


def test_an_orphaned_forked_kernel_ends(zygote_dir: Path, tmp_path: Path) -> None:
    """As ipykernel: the process that started the kernel (JPY_PARENT_PID) dies, and the forked kernel ends too,
    though its own parent is the zygote."""
    parent = zygote_up(zygote_dir)
    connection, _ = write_connection_file(str(tmp_path / "kernel.json"), ip="127.0.0.1")
    pid_file = tmp_path / "launcher.pid"
    frontend = subprocess.Popen([sys.executable, "-c", frontend_script(connection, pid_file)])
    try:
        wait_for(lambda: pid_file.exists() and pid_file.read_text(), what="the launcher's start")
    except AssertionError:
        frontend.kill()
        raise
    launcher = int(pid_file.read_text())
    kernel = 0
    try:
        kernel = forked_kernel(parent)
        time.sleep(1.5)
        assert alive(kernel), "the kernel ended with its parent alive"
        frontend.kill()
        frontend.wait()
        wait_for(lambda: not alive(kernel), 30, "the orphaned kernel ending")
        wait_for(lambda: not alive(launcher), 10, "its launcher ending")
    finally:
        frontend.kill()
        frontend.wait()
        for pid in (kernel, launcher):
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)


def launch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [*KERNEL_ARGV, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


def test_a_forked_kernel_that_cannot_start_says_why_as_a_process_of_its_own_does(zygote_dir: Path) -> None:
    alone = launch("--language", "cobol", env={"SCALEBOX_ZYGOTE": "0"})
    parent = zygote_up(zygote_dir)
    forked = launch("--language", "cobol")
    assert forked.returncode == alone.returncode != 0
    assert "cobol" in alone.stderr and "cobol" in forked.stderr
    assert alive(parent)


def test_the_zygote_keeps_serving_after_bad_requests(zygote_dir: Path) -> None:
    parent = zygote_up(zygote_dir)
    (path,) = zygote_dir.glob("*.sock")
    bad = [
        b"",
        b"\x00\x00",
        (2**40).to_bytes(8, "big"),
        (10).to_bytes(8, "big") + b"short",
        (5).to_bytes(8, "big") + b"99\x00x",
        (7).to_bytes(8, "big") + b"0\x00/\x00zz",
        b"\xff" * 4096,
    ]
    for frames in bad:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(frames)
            sock.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
            assert not reply.startswith(b"P "), f"{frames[:20]!r} made a kernel"
    assert alive(parent)
    assert_forks_and_runs(parent, "3 + 4", "7")


def test_a_zygote_whose_code_changed_declines_and_a_fresh_one_takes_over(zygote_dir: Path) -> None:
    old = zygote_up(zygote_dir)
    source = PACKAGE_FILE
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:
        kernel = Kernel()
        try:
            assert runs_the_kernel_itself(kernel.launcher), "a stale zygote forked a kernel"
        finally:
            kernel.stop()
        wait_for(lambda: not alive(old), 30, "the stale zygote ending")
        wait_for(lambda: zygote_pid(zygote_dir) != old, 30, "a fresh zygote")
        assert alive(zygote_pid(zygote_dir))
        assert_forks_and_runs(zygote_pid(zygote_dir), "1+2", "3")
    finally:
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_socket_directory_others_can_enter_is_not_used(tmp_path: Path) -> None:
    directory = tmp_path / "open"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    with environ({"SCALEBOX_ZYGOTE_DIR": str(directory)}):
        for _ in range(2):
            kernel = Kernel()
            try:
                assert runs_the_kernel_itself(kernel.launcher)
            finally:
                kernel.stop()
    assert not list(directory.iterdir()), "a zygote was started in a directory others can enter"


def test_kernels_outlive_a_killed_zygote(zygote_dir: Path) -> None:
    parent = zygote_up(zygote_dir)
    kernel = Kernel()
    try:
        pid = forked_kernel(parent)
        os.kill(parent, signal.SIGKILL)
        wait_for(lambda: not alive(parent), 10, "the zygote ending")
        assert alive(pid) and kernel.process.poll() is None
        assert kernel.run("6 * 7") == "42", "the kernel works on"
        process = kernel.process
    finally:
        kernel.stop()
    assert process.wait(30) == 0
    assert not alive(pid)


def test_a_stuck_zygote_holds_neither_a_start_nor_its_streams(zygote_dir: Path) -> None:
    """A zygote that does not answer (stopped here) costs a start at most the handshake's wait: the kernel runs
    in its own process, and the launcher's output pipes close when it ends (the zygote never had them)."""
    parent = zygote_up(zygote_dir)
    os.kill(parent, signal.SIGSTOP)
    try:
        started = time.monotonic()
        done = launch("--language", "cobol")  # ends at once in its own process: the pipes must close with it
        assert done.returncode != 0 and "cobol" in done.stderr
        assert time.monotonic() - started < 30
    finally:
        os.kill(parent, signal.SIGCONT)
    assert_forks_and_runs(parent, "2 ** 10", "1024")


def test_a_restart_works_after_the_zygote_was_killed(zygote_dir: Path) -> None:
    """Without its zygote, a kernel still ends the moment its launcher is killed: a restart on the same ports
    then starts a kernel of its own that answers."""
    parent = zygote_up(zygote_dir)
    kernel = Kernel()
    try:
        old = forked_kernel(parent)
        os.kill(parent, signal.SIGKILL)
        wait_for(lambda: not alive(parent), 10, "the zygote ending")
        kernel.km.restart_kernel(now=True)
        kernel.process = kernel.km.provisioner.process  # type: ignore[union-attr, attr-defined]
        wait_for(lambda: not alive(old), 10, "the old kernel ending with its launcher")
        kernel.kc.wait_for_ready(timeout=60)
        assert kernel.run("5 * 5") == "25"
    finally:
        kernel.stop()


def test_a_launcher_without_stderr_still_takes_its_kernel_along(zygote_dir: Path, tmp_path: Path) -> None:
    parent = zygote_up(zygote_dir)
    connection, _ = write_connection_file(str(tmp_path / "kernel.json"), ip="127.0.0.1")
    argv = " ".join([*KERNEL_ARGV, "-f", connection])
    launcher = subprocess.Popen(["sh", "-c", f"exec 2>&-; exec {argv}"], stdout=subprocess.DEVNULL)
    try:
        kernel = forked_kernel(parent)
        fd2 = Path(f"/proc/{kernel}/fd/2")
        assert not fd2.exists() or not os.readlink(fd2).startswith("socket:"), "the kernel holds the zygote's socket"
        launcher.kill()
        launcher.wait()
        wait_for(lambda: not alive(kernel), 10, "the kernel of a killed launcher ending")
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_a_kernel_killed_by_a_signal_ends_its_launcher_so(zygote_dir: Path) -> None:
    parent = zygote_up(zygote_dir)
    kernel = Kernel()
    try:
        os.kill(forked_kernel(parent), signal.SIGKILL)
        assert kernel.process.wait(30) == -signal.SIGKILL
    finally:
        kernel.stop()


def test_forked_kernels_have_default_signal_dispositions(zygote_dir: Path) -> None:
    """The first start (which spawns the zygote) comes from a process that ignores SIGUSR1 and SIGQUIT; a kernel
    forked later does not inherit that."""
    saved = {number: signal.signal(number, signal.SIG_IGN) for number in (signal.SIGUSR1, signal.SIGQUIT)}
    try:
        Kernel().stop()
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)
    parent = zygote_pid(zygote_dir)
    kernel = Kernel()
    try:
        pid = forked_kernel(parent)
        status = Path(f"/proc/{pid}/status").read_text()
        ignored = int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
        for number in (signal.SIGUSR1, signal.SIGQUIT):
            assert not ignored & (1 << (number - 1)), f"the kernel ignores {signal.Signals(number).name}"
        blocked = int(next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16)
        assert blocked == 0
    finally:
        kernel.stop()


def test_interpreter_options_a_fork_would_lose_run_the_kernel_in_its_own_process(zygote_dir: Path) -> None:
    parent = zygote_up(zygote_dir)
    argv = [sys.executable, "-X", "importtime", "-m", "scalebox_kernel.kernel", "--language", "cobol"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert "import time:" in done.stderr and "scalebox_kernel.kernel.app" in done.stderr, "it was forked"
    assert done.returncode != 0 and "cobol" in done.stderr
    assert zygote.running(zygote_dir) == [parent], "a zygote that declined is not replaced"
