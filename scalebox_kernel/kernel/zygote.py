"""The zygote: a resident process that has imported what a Scalebox kernel runs, and forks a kernel for each
launcher that asks (`launch.py` says what the launcher does in return). A forked kernel answers `kernel_info` in
tens of milliseconds and runs its first cell without importing anything.

- It listens on a Unix socket in a directory only its user can enter, and serves only connections of its own uid
  (SO_PEERCRED). It holds no credential: it was started with the few variables that locate Python's modules, and
  each kernel gets its launcher's environment, working directory, umask and standard streams.
- It forks only while it has no thread, so a kernel inherits no lock held by another thread.
- What it imported must still be what is installed: before each fork it compares the modification times of the
  Scalebox package's files and of the directories its modules came from with those at its start. When they
  differ, it declines (the launcher then starts the kernel as a process of its own), stops listening, and ends
  once its kernels have: the next launcher starts a fresh zygote.
- A kernel whose launcher goes away is killed at once (its ports are then free for the kernel that replaces it);
  the zygote ends after IDLE seconds without kernels.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import gc
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .launch import interpreter, wait_for_exit

#: The launcher this zygote serves (the same copy of the package).
LAUNCHER = os.path.realpath(Path(__file__).with_name("launch.py"))

#: Seconds without a kernel after which the zygote ends.
IDLE = 900.0
#: Seconds a launcher has to send its request once connected.
REQUEST_TIMEOUT = 2.0
#: Largest request (argv, environment) taken.
MAX_REQUEST = 4 * 1024 * 1024
#: Most standard streams passed with a request.
MAX_FDS = 3


def preload() -> None:
    """Import what a kernel imports before and during its first cell (nothing here starts a thread or reads the
    environment at import)."""
    from . import app, channel, commands, sandbox  # noqa: F401


def watched() -> list[str]:
    """What says whether the modules imported are still those installed: every file and folder of the Scalebox
    package (an editable install changes files in place), and each directory a top-level module came from
    (site-packages, the standard library: an install or upgrade changes its entries)."""
    paths: list[str] = []
    package = Path(__file__).resolve().parent.parent
    for folder, dirs, files in os.walk(package):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        paths.append(folder)
        paths.extend(os.path.join(folder, name) for name in files if name.endswith(".py"))
    tops: set[str] = set()
    for name, module in list(sys.modules.items()):
        origin = getattr(module, "__file__", None)
        if not origin or "." in name:
            continue
        parent = Path(origin).parent
        tops.add(str(parent.parent if origin.endswith("__init__.py") else parent))
    tops.discard(str(package.parent))  # the package's own files are watched one by one
    return [*paths, *sorted(tops)]


def stamps(paths: list[str]) -> list[int]:
    found = []
    for path in paths:
        try:
            found.append(os.stat(path).st_mtime_ns)
        except OSError:
            found.append(-1)
    return found


@dataclass
class Request:
    argv: list[str]
    cwd: str
    umask: int
    streams: list[int]  # the standard stream numbers the fds stand for
    origin: str  # the launcher's launch.py: the zygote serves launchers of its own copy of the package only
    interpreter: str  # the launcher's interpreter options (launch.interpreter)
    env: dict[bytes, bytes]
    fds: list[int] = field(default_factory=list)
    launcher: int = 0  # its pid (SO_PEERCRED)


def parse_request(body: bytes, fds: list[int]) -> Request:
    fields = body.split(b"\0")
    count = int(fields[0])
    if not 0 <= count < len(fields) - 5:
        raise ValueError("argv count out of range")
    argv = [os.fsdecode(f) for f in fields[1 : 1 + count]]
    cwd = os.fsdecode(fields[1 + count])
    umask = int(fields[2 + count], 8) & 0o777
    streams = [int(n) for n in fields[3 + count].split(b",") if n]
    if len(streams) != len(fds) or any(n not in (0, 1, 2) for n in streams):
        raise ValueError("the streams named do not match the descriptors passed")
    origin = os.fsdecode(fields[4 + count])
    interpreter = fields[5 + count].decode("utf-8", "replace")
    env: dict[bytes, bytes] = {}
    for item in fields[6 + count :]:
        name, sep, value = item.partition(b"=")
        if sep and name:
            env[name] = value
    return Request(argv, cwd, umask, streams, origin, interpreter, env, fds)


def _receive(conn: socket.socket) -> Request:
    """Read one launcher's request (with its standard streams) from `conn`."""
    data, fds, _flags, _addr = socket.recv_fds(conn, 65536, MAX_FDS)
    try:
        if len(data) < 8:
            raise ValueError("short request")
        size = int.from_bytes(data[:8], "big")
        if size > MAX_REQUEST:
            raise ValueError("request too big")
        body = bytearray(data[8:])
        while len(body) < size:
            chunk = conn.recv(min(65536, size - len(body)))
            if not chunk:
                raise ValueError("request cut short")
            body += chunk
        return parse_request(bytes(body[:size]), fds)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _default_signals() -> None:
    """Signal dispositions as a fresh interpreter has them: SIGINT raises KeyboardInterrupt, SIGPIPE and SIGXFSZ
    are ignored, every other one has its default, and none is blocked."""
    for number in signal.valid_signals():
        if number in (signal.SIGKILL, signal.SIGSTOP):
            continue
        handler = signal.SIG_IGN if number in (signal.SIGPIPE, signal.SIGXFSZ) else signal.SIG_DFL
        with contextlib.suppress(OSError, ValueError):
            signal.signal(number, signal.default_int_handler if number == signal.SIGINT else handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _end_with(launcher: int) -> None:
    """The kernel ends at once when its launcher does, as it would have died with it (a frontend that kills the
    launcher for a restart finds the ports free), even when the zygote is not there any more to see to it."""
    try:
        handle = os.pidfd_open(launcher)
    except OSError:
        os._exit(1)  # gone already

    def watch() -> None:
        wait_for_exit(handle)
        os._exit(1)

    threading.Thread(target=watch, name="scalebox-launcher-watch", daemon=True).start()


def _become_kernel(request: Request) -> None:
    """In the forked child: take the launcher's streams, environment and place, run the kernel, and end as an
    interpreter does (atexit handlers, then the exit code); never returns."""
    code = 1
    try:
        for number, fd in zip(request.streams, request.fds, strict=True):
            os.dup2(fd, number)
        signal.set_wakeup_fd(-1)
        _default_signals()
        for entry in os.listdir("/proc/self/fd"):
            fd = int(entry)
            if fd > 2:  # the zygote's sockets, and the launcher's streams now that they are 0, 1 and 2
                with contextlib.suppress(OSError):
                    os.close(fd)
        _end_with(request.launcher)
        os.setpgid(0, 0)
        os.umask(request.umask)
        os.chdir(request.cwd)
        os.environb.clear()
        os.environb.update(request.env)
        time.tzset()
        sys.argv = [sys.argv[0], *request.argv]
        if "random" in sys.modules:
            sys.modules["random"].seed()  # not the zygote's sequence
        from .app import main

        try:
            main()
            code = 0
        except SystemExit as exc:
            if isinstance(exc.code, str):
                sys.stderr.write(exc.code + "\n")
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


class Zygote:
    def __init__(self, path: str, lock_fd: int) -> None:
        self.path = path
        self.lock_fd = lock_fd
        self.selector = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self.inode = 0  # of the socket file bound: removed at the end only if it is still ours
        self.children: dict[int, socket.socket | None] = {}  # kernel pid -> its launcher's connection, if open
        self.launchers: dict[socket.socket, int] = {}
        self.watched: list[str] = []
        self.stamps: list[int] = []
        self.interpreter = interpreter()
        self.retired = False
        self.stop_asked = False
        self.quiet_since: float | None = time.monotonic()  # since when no kernel runs
        self.wake_r, self.wake_w = os.pipe()

    def log(self, message: str) -> None:
        sys.stderr.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} zygote {os.getpid()}: {message}\n")
        sys.stderr.flush()

    def listen(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a socket left by a zygote that died: the lock says none serves it
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listener.bind(self.path)
        finally:
            os.umask(old)
        self.inode = os.stat(self.path).st_ino
        listener.listen(64)
        listener.setblocking(False)
        self.listener = listener
        self.selector.register(listener, selectors.EVENT_READ, "accept")
        os.set_blocking(self.wake_w, False)
        os.set_blocking(self.wake_r, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._asked_to_stop)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")

    def _asked_to_stop(self, _signum: int, _frame: object) -> None:
        self.stop_asked = True  # acted on by the loop, which the wake-up descriptor wakes

    def retire(self, why: str) -> None:
        """Stop taking launchers (the socket goes, the lock is let go of: a new zygote may start); the kernels
        already forked keep their launchers."""
        if self.retired:
            return
        self.retired = True
        self.log(f"retiring: {why}")
        if self.listener is not None:
            self.selector.unregister(self.listener)
            self.listener.close()
            self.listener = None
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self.inode:  # not a newer zygote's
                    os.unlink(self.path)
        os.close(self.lock_fd)

    def serve(self) -> None:
        self.log(f"serving {self.path}")
        while not (self.retired and not self.children):
            if self.stop_asked:
                self.retire("asked to stop")
            if self.quiet_since is not None and time.monotonic() - self.quiet_since > IDLE:
                self.retire(f"no kernel for {IDLE:g} s")
            if self.retired and not self.children:
                break
            for key, _events in self.selector.select(timeout=30.0):
                if key.data == "accept":
                    self._accept()
                elif key.data == "wake":
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wake_r, 4096)
                    self._reap()
                else:
                    self._from_launcher(key.fileobj)  # type: ignore[arg-type]
            self._reap()

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != os.getuid():
            conn.close()
            return
        try:
            conn.settimeout(REQUEST_TIMEOUT)
            conn.sendall(b"R\n")  # the launcher sends its streams only now: a stuck zygote never holds them
            request = _receive(conn)
        except (OSError, ValueError) as exc:  # its type only: what a launcher sent may hold its environment
            self.log(f"a bad request from pid {pid}: {type(exc).__name__}")
            conn.close()
            return
        request.launcher = pid
        try:
            self._fork(conn, request)
        finally:
            for fd in request.fds:
                os.close(fd)

    def _decline(self, conn: socket.socket, why: str) -> None:
        with contextlib.suppress(OSError):
            conn.sendall(f"E {why}\n".encode())
        conn.close()

    def _fork(self, conn: socket.socket, request: Request) -> None:
        # Retired before the launcher hears: the zygote it starts then finds the name and the lock free.
        if stamps(self.watched) != self.stamps:
            self.retire("what it imported changed on disk")
            self._decline(conn, "stale")
            return
        if threading.active_count() > 1:
            self.retire("a thread is running")
            self._decline(conn, "threads")
            return
        if request.origin != LAUNCHER:
            self._decline(conn, "another copy of the package")
            return
        if request.interpreter != self.interpreter:
            self._decline(conn, "other interpreter options")
            return
        pid = os.fork()
        if pid == 0:
            _become_kernel(request)
        conn.setblocking(True)
        try:
            conn.sendall(b"P %d\n" % pid)
        except OSError:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        conn.setblocking(False)
        self.children[pid] = conn
        self.launchers[conn] = pid
        self.quiet_since = None
        self.selector.register(conn, selectors.EVENT_READ, "launcher")

    def _from_launcher(self, conn: socket.socket) -> None:
        """A launcher sends nothing after its request: what comes is its end (or data nobody asked for)."""
        pid = self.launchers.get(conn)
        try:
            data = conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data or pid is None:
            return
        with contextlib.suppress(OSError):  # the launcher is gone: so is its kernel
            os.kill(pid, signal.SIGKILL)
        self._forget(conn)

    def _forget(self, conn: socket.socket) -> None:
        pid = self.launchers.pop(conn, None)
        if pid is not None and self.children.get(pid) is conn:
            self.children[pid] = None  # reaped later, with nobody to tell
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn)
        conn.close()

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                break
            if pid == 0:
                break
            conn = self.children.pop(pid, None)
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.setblocking(True)
                    conn.sendall(b"X %d\n" % os.waitstatus_to_exitcode(status))
                self._forget(conn)
        if not self.children and self.quiet_since is None:
            self.quiet_since = time.monotonic()


def running(directory: Path) -> list[int]:
    """The pids of the zygotes serving sockets in `directory` (each lock file names its zygote; a pid is taken
    only while it is a zygote's of that directory, as a pid of one long gone may be another process's now)."""
    found = []
    for lock in directory.glob("*.lock") if directory.is_dir() else []:
        with contextlib.suppress(ValueError, OSError):
            pid = int(lock.read_text().strip() or 0)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if pid > 1 else b""
            if b"scalebox_kernel.kernel.zygote" in cmdline and str(directory).encode() in cmdline:
                found.append(pid)
    return found


def stop(directory: Path) -> None:
    """Ask the zygotes of `directory` to end (SIGTERM): they stop taking launchers and end once their kernels
    have."""
    for pid in running(directory):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)


def main(path: str) -> None:
    lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
            return  # another zygote serves this socket (or is starting to)
        raise
    os.ftruncate(lock_fd, 0)
    os.write(lock_fd, b"%d\n" % os.getpid())  # who serves the socket (for `kill`, and the test suite)
    os.chdir("/")
    zygote = Zygote(path, lock_fd)
    first = watched()
    before = stamps(first)
    preload()
    zygote.watched = watched()
    zygote.stamps = stamps(zygote.watched)
    if stamps(first) != before:  # an install or a checkout while it imported: it may hold old and new code
        zygote.log("files changed while it imported them: not serving")
        return
    if threading.active_count() > 1:
        zygote.log("an import started a thread: not serving (a fork would inherit its locks)")
        return
    gc.freeze()  # what was imported stays shared with the kernels: the collector does not touch its pages
    zygote.listen()
    zygote.serve()


if __name__ == "__main__":
    main(sys.argv[1])
