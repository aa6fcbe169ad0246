"""The start of `python -m scalebox_kernel.kernel` (what the kernelspecs run): have the kernel forked by the zygote.

A kernel process of its own costs about 90 ms of imports before it can answer `kernel_info`, and 150 ms more
before its first cell. This process asks a resident, pre-imported parent (the zygote, `zygote.py`) to fork the
kernel instead, and stands in for it: jupyter_client, VS Code or papermill see this process's pid, and

- the kernel's stdin, stdout and stderr are this process's own (passed over the zygote's socket);
- the signals it gets (SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2) are sent on to the kernel;
- it ends when the kernel ends, with its exit status (or of its signal), and the kernel is killed at once when
  this process dies (SIGKILL from a frontend's restart: the ports are then free for the next kernel).

Without a zygote that can serve this process (the first start, SCALEBOX_ZYGOTE=0, interpreter options such as
`-X importtime` the zygote was not started with, another copy of the package, a zygote that does not answer
within HANDSHAKE seconds), `launch` returns and the kernel runs in this process, as it always did. The first
start also spawns the zygote, in a session of its own, with default signal dispositions, no inherited descriptor
and an environment stripped of everything but what locates Python's modules, so it holds no credential; a
kernel's environment reaches only that kernel.

The exchange: the zygote says `R` once it took the connection (only then do this process's streams go to it, so
a zygote that is stuck never holds them); the request (`_request`) goes with the streams; the zygote answers
`P <pid>` after the fork, or `E <why>` when it declines; `X <code>` when the kernel has ended.

Only modules that are built in, or that `site` imported already, are imported before the zygote has answered.
"""

import _signal
import _socket
import contextlib  # already imported by `site`
import os
import sys

#: Environment variables that decide which modules the zygote imports and how its interpreter runs: every
#: PYTHON* variable, and these. They are part of its socket's name, and the only ones it is given.
KEY_ENV = ("HOME", "LANG", "LC_ALL", "LC_CTYPE")
PASSED_ENV = (*KEY_ENV, "PATH", "TMPDIR", "USER", "LOGNAME")
FORWARDED = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
SCM_RIGHTS = 1
SOL_SOCKET = 1
MAX_LINE = 64
#: Longest Unix socket path (sun_path holds 108 bytes, the zygote's log and lock add to the name).
MAX_SOCKET_PATH = 100
#: Seconds the zygote has to take the connection, and then to fork, before the kernel runs in this process.
HANDSHAKE = 2.0
FORK_WAIT = 10.0


def _off(value: str | None) -> bool:
    return (value or "").strip().lower() in ("0", "false", "no", "off")


def interpreter() -> str:
    """What a fork would keep of this interpreter's options (-X, -W, -O, -B, -E, …): the zygote serves only
    launchers whose interpreter runs as its own does (`-u` alone is not told apart)."""
    flags = [getattr(sys.flags, name) for name in dir(sys.flags) if name[0] != "_" and name not in SKIPPED_FLAGS]
    return repr((flags, sorted(getattr(sys, "_xoptions", {}).items()), sys.warnoptions))


#: sys.flags that differ between the launcher and the zygote by design (`-P`), or are no option (counts).
SKIPPED_FLAGS = ("safe_path", "count", "index", "n_fields", "n_sequence_fields", "n_unnamed_fields")


def zygote_dir() -> str | None:
    """The directory of the zygote's socket: SCALEBOX_ZYGOTE_DIR, else one of this user's under XDG_RUNTIME_DIR or
    /tmp, made 0700; None if it is not a directory of this user's that only this user can enter."""
    chosen = os.environ.get("SCALEBOX_ZYGOTE_DIR")
    if not chosen:
        base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
        chosen = os.path.join(base, f"scalebox-zygote-{os.getuid()}")
    try:
        os.mkdir(chosen, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        found = os.lstat(chosen)
    except OSError:
        return None
    is_dir = (found.st_mode & 0o170000) == 0o040000  # a symlink is not followed: it is refused
    if not is_dir or found.st_uid != os.getuid() or found.st_mode & 0o077:
        return None
    return chosen


def key_env() -> list[str]:
    return sorted(f"{n}={v}" for n, v in os.environ.items() if n.startswith("PYTHON") or n in KEY_ENV)


def zygote_name() -> str:
    """The socket's file name: one zygote per interpreter, package, module search path and locale."""
    import binascii  # a small C module

    key = "\0".join([sys.executable, __file__, *key_env()])
    return f"zygote-{binascii.crc32(key.encode()):08x}.sock"


def spawn_zygote(path: str) -> None:
    """Start a zygote for `path` in the background (it locks, so that racing launchers start one between them)."""
    env = {n: v for n, v in os.environ.items() if n.startswith("PYTHON") or n in PASSED_ENV}
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, path + ".log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    for entry in os.listdir("/proc/self/fd"):  # what this process's parent let it inherit stays here
        fd = int(entry)
        with contextlib.suppress(OSError):
            if fd > 2 and os.get_inheritable(fd):
                actions.append((os.POSIX_SPAWN_CLOSE, fd))
    defaults = [s for s in _signal.valid_signals() if s not in (_signal.SIGKILL, _signal.SIGSTOP)]
    argv = [sys.executable, "-P", "-m", "scalebox_kernel.kernel.zygote", path]  # -P: not the cwd's modules
    with contextlib.suppress(OSError):
        os.posix_spawn(sys.executable, argv, env, file_actions=actions, setsid=True, setsigdef=defaults, setsigmask=())


def open_streams() -> list[int]:
    """Which of the standard streams are open (looked at before any socket could take a free number)."""
    streams = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            continue
        streams.append(fd)
    return streams


def _request(args: list[str], streams: list[int]) -> bytes:
    """What the zygote needs to make the kernel this process would be: argv, working directory, umask, the
    streams passed with it, which package and interpreter ask, and the environment (NUL-separated)."""
    umask = os.umask(0o077)
    os.umask(umask)
    env = [b"%s=%s" % item for item in os.environb.items()]
    env.append(b"SCALEBOX_LAUNCHER_PID=%d" % os.getpid())
    fields = [
        b"%d" % len(args),
        *(os.fsencode(a) for a in args),
        os.fsencode(os.getcwd()),
        b"%o" % umask,
        b",".join(b"%d" % fd for fd in streams),
        os.fsencode(os.path.realpath(__file__)),
        interpreter().encode(),
        *env,
    ]
    body = b"\0".join(fields)
    return len(body).to_bytes(8, "big") + body


class Zygote:
    """The connection to the zygote, once it forked the kernel `pid`."""

    def __init__(self, sock: _socket.socket, pid: int) -> None:
        self.sock = sock
        self.pid = pid
        self.buffer = b""

    def forward(self, signum: int, _frame: object) -> None:
        """A signal this process got, for the kernel (sent to it directly: the zygote is not needed for it)."""
        with contextlib.suppress(OSError):
            os.kill(self.pid, signum)

    def wait(self) -> int:
        """The kernel's exit code (negative: the signal that ended it)."""
        while True:
            try:
                chunk = self.sock.recv(4096)
            except InterruptedError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                return self._outlive_zygote()
            self.buffer += chunk
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                if line.startswith(b"X "):
                    return int(line[2:])

    def _outlive_zygote(self) -> int:
        """The zygote went away before its kernel (it was killed): wait for the kernel itself, whose status
        nobody can read any more (it ends by itself at once if this process dies: it watches it)."""
        os.write(2, b"scalebox: the zygote that forked this kernel is gone; the kernel goes on\n")
        try:
            handle = os.pidfd_open(self.pid)
        except OSError:
            return 0  # already gone
        wait_for_exit(handle)
        return 0


def wait_for_exit(pidfd: int) -> None:
    """Block until the process of `pidfd` has ended (its pidfd turns readable), then close it."""
    import select

    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    while not poller.poll():
        pass
    os.close(pidfd)


def _read_line(sock: _socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n") and len(line) < MAX_LINE:
        chunk = sock.recv(1)
        if not chunk:
            break
        line += chunk
    return line.strip()


def _forked(path: str, args: list[str], streams: list[int]) -> tuple[_socket.socket | None, bytes]:
    """Ask the zygote at `path`: its connection and `P <pid>` when it forked the kernel, else (None, what it
    said: `E <why>`, or b"" when there is no zygote or it did not answer in time)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(HANDSHAKE)  # a zygote that is stuck (a full backlog) does not hold the start up
        sock.connect(path)
        if _read_line(sock) != b"R":
            raise OSError("no handshake")
        body = _request(args, streams)
        fds = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in streams)
        sock.settimeout(FORK_WAIT)
        sent = sock.sendmsg([body], [(SOL_SOCKET, SCM_RIGHTS, fds)])
        if sent < len(body):
            sock.sendall(body[sent:])
        reply = _read_line(sock)
        if reply.startswith(b"P "):
            sock.settimeout(None)
            return sock, reply
    except OSError:
        reply = b""
    sock.close()
    return None, reply


def exit_like(code: int) -> None:
    """End as the kernel ended: with its exit code, or killed by its signal."""
    if code < 0:
        with contextlib.suppress(OSError, ValueError):
            _signal.signal(-code, _signal.SIG_DFL)  # refused for SIGKILL, whose default cannot change
        with contextlib.suppress(OSError):
            os.kill(os.getpid(), -code)
        os._exit(128 - code)
    os._exit(code)


def launch() -> None:
    """Have the zygote fork the kernel, and end as it ends (never returns then); return when the kernel is to run
    in this process."""
    if _off(os.environ.get("SCALEBOX_ZYGOTE")):
        return
    try:
        directory = zygote_dir()
        if directory is None:
            return
        path = os.path.join(directory, zygote_name())
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            return
        streams = open_streams()
        sock, reply = _forked(path, sys.argv[1:], streams)
    except Exception:  # whatever stops the zygote's way (a deleted working directory…), the kernel runs here
        return
    if sock is None:
        if reply in (b"", b"E stale"):
            spawn_zygote(path)  # none, or one retiring: for the next start (this one runs in this process)
        return
    zygote = Zygote(sock, int(reply[2:]))
    for name in FORWARDED:
        _signal.signal(getattr(_signal, name), zygote.forward)
    exit_like(zygote.wait())
