"""The start of `python -m scalebox_kernel.kernel` (what the kernelspecs run): have the kernel forked by the zygote.

A kernel process of its own costs about 90 ms of imports before it can answer `kernel_info`, and 150 ms more
before its first cell. This process asks a resident, pre-imported parent (the zygote, `zygote.py`) to fork the
kernel instead, and stands in for it: jupyter_client, VS Code or papermill see this process's pid, and

- the kernel's stdin, stdout and stderr are this process's own (passed over the zygote's socket);
- the signals it gets (SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2) are sent on to the kernel;
- it ends when the kernel ends, with its exit status (or of its signal), and the kernel is killed at once when
  this process dies (SIGKILL from a frontend's restart: the ports are then free for the next kernel).

Without a zygote (the first start, SCALEBOX_ZYGOTE=0, interpreter options such as `-X importtime` that a fork
would not have, a socket that cannot be used), `launch` returns and the kernel runs in this process, as it always
did. The first start also spawns the zygote, in a session of its own and with an environment stripped of
everything but what locates Python's modules, so it holds no credential; a kernel's environment reaches only
that kernel.

Only modules that are built in, or that `site` imported already, are imported before the zygote has answered.
"""

import _signal
import _socket
import contextlib  # already imported by `site`
import os
import sys

#: Environment variables that decide which modules the zygote imports: they are part of its socket's name, and
#: the only ones it is given.
PYTHON_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE", "PYTHONNOUSERSITE", "PYTHONPLATLIBDIR", "HOME")
PASSED_ENV = (*PYTHON_ENV, "PATH", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "USER", "LOGNAME")
FORWARDED = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
SCM_RIGHTS = 1
SOL_SOCKET = 1
MAX_LINE = 64
#: Longest Unix socket path (sun_path holds 108 bytes, the zygote's log and lock add to the name).
MAX_SOCKET_PATH = 100


def _off(value: str | None) -> bool:
    return (value or "").strip().lower() in ("0", "false", "no", "off")


def _plain_interpreter() -> bool:
    """Whether this interpreter runs as the zygote's does: no -X, -W, -O, -B… of its own, which a fork would lose."""
    flags = sys.flags
    changed = flags.optimize or flags.dev_mode or flags.isolated or flags.no_site or flags.verbose or flags.inspect
    return not (changed or sys.warnoptions or getattr(sys, "_xoptions", None))


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


def zygote_name() -> str:
    """The socket's file name: one zygote per interpreter, package and module search path."""
    import binascii  # a small C module

    key = "\0".join([sys.executable, __file__, *(f"{n}={os.environ.get(n, '')}" for n in PYTHON_ENV)])
    return f"zygote-{binascii.crc32(key.encode()):08x}.sock"


def spawn_zygote(path: str) -> None:
    """Start a zygote for `path` in the background (it locks, so that racing launchers start one between them)."""
    env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, path + ".log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    try:
        argv = [sys.executable, "-P", "-m", "scalebox_kernel.kernel.zygote", path]  # -P: not the cwd's modules
        os.posix_spawn(sys.executable, argv, env, file_actions=actions, setsid=True)
    except OSError:
        pass


def _request(args: list[str]) -> tuple[bytes, list[int]]:
    """What the zygote needs to make the kernel this process would be: argv, working directory, umask, environment
    (NUL-separated), and the standard streams that are open."""
    umask = os.umask(0o077)
    os.umask(umask)
    env = [b"%s=%s" % item for item in os.environb.items()]
    env.append(b"SCALEBOX_LAUNCHER_PID=%d" % os.getpid())
    streams = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            continue
        streams.append(fd)
    fields = [
        b"%d" % len(args),
        *(os.fsencode(a) for a in args),
        os.fsencode(os.getcwd()),
        b"%o" % umask,
        b",".join(b"%d" % fd for fd in streams),
        *env,
    ]
    body = b"\0".join(fields)
    return len(body).to_bytes(8, "big") + body, streams


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
        nobody can read any more (it ends by itself once this process is gone, as an orphan)."""
        import select

        os.write(2, b"scalebox: the zygote that forked this kernel is gone; the kernel goes on\n")
        try:
            handle = os.pidfd_open(self.pid)
        except OSError:
            return 0  # already gone
        poller = select.poll()
        poller.register(handle, select.POLLIN)
        while not poller.poll():
            pass
        os.close(handle)
        return 0


def _read_line(sock: "_socket.socket") -> bytes:
    line = b""
    while not line.endswith(b"\n") and len(line) < MAX_LINE:
        chunk = sock.recv(1)
        if not chunk:
            break
        line += chunk
    return line.strip()


def _connect(path: str) -> "_socket.socket | None":
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    return sock


def _forked(sock: "_socket.socket", args: list[str]) -> int | None:
    """The pid of the kernel the zygote forked for this request, or None if it would not."""
    body, streams = _request(args)
    fds = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in streams)
    sock.settimeout(10.0)
    try:
        sent = sock.sendmsg([body], [(SOL_SOCKET, SCM_RIGHTS, fds)])
        if sent < len(body):
            sock.sendall(body[sent:])
        reply = _read_line(sock)
    except OSError:
        return None
    if not reply.startswith(b"P "):
        return None
    sock.settimeout(None)
    return int(reply[2:])


def exit_like(code: int) -> None:
    """End as the kernel ended: with its exit code, or killed by its signal."""
    if code < 0:
        try:
            _signal.signal(-code, _signal.SIG_DFL)
            os.kill(os.getpid(), -code)
        except (OSError, ValueError):
            pass
        os._exit(128 - code)
    os._exit(code)


def launch() -> None:
    """Have the zygote fork the kernel, and end as it ends (never returns then); return when the kernel is to run
    in this process."""
    args = sys.argv[1:]
    if _off(os.environ.get("SCALEBOX_ZYGOTE")) or not _plain_interpreter():
        return
    directory = zygote_dir()
    if directory is None:
        return
    path = os.path.join(directory, zygote_name())
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        return
    sock = _connect(path)
    pid = _forked(sock, args) if sock is not None else None
    if sock is None or pid is None:
        if sock is not None:
            sock.close()
        spawn_zygote(path)  # for the next start: this one runs in this process
        return
    zygote = Zygote(sock, pid)
    for name in FORWARDED:
        _signal.signal(getattr(_signal, name), zygote.forward)
    exit_like(zygote.wait())
