"""Object storage mounts (PROTOCOL.md 1.9): a prefix of an S3-compatible bucket, read-write at a path of one sandbox.

s3fs (Debian's) mounts the bucket on the host, in the sandbox's private directory: root-only, so neither another
sandbox nor another user of the host reaches it. It presents every object as the sandbox's uid's, with
`allow_other` (the server is root, the sandbox is not) and `nosuid,nodev`. The jail then binds that directory at
the mount point the sandbox asked for, before anything of the sandbox runs.

The keys reach s3fs in a 0600 file beside the mount (its `passwd_file`), never on a command line or in an
environment another process could read; the record of the sandbox keeps only the uri, the mount point, the
endpoint and the region. The file stays while the sandbox lives, so that a restarted server can mount the bucket
again; it goes with the sandbox's directory when the sandbox is killed or expires.

s3fs checks the bucket with the keys as it starts (its FUSE init), and gives up when that fails: a create waits for
that check, so wrong keys, a missing bucket or an endpoint that does not answer are a 400 before the sandbox exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import posixpath
import re
import signal
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from secrets import token_hex
from typing import Any
from urllib.parse import urlsplit

from .disk import is_mounted
from .layout import HOST_ONLY, SANDBOX_RELAY, SANDBOX_RUN, SYSTEM_DIRS, USER_DIRS
from .tools import SYSTEM_ENV, run_tool, which

#: Where a sandbox's buckets are mounted on the host, inside its private directory.
BUCKETS_DIR = "buckets"
MAX_MOUNTS = 8
#: Seconds s3fs has to mount and check the bucket (a failing request is retried once, connecting for 5 s at most):
#: less than a client's default request timeout (30 s), so that a create is always answered.
MOUNT_TIMEOUT = 25.0
#: MiB s3fs leaves free on the sandbox's disk for the sandbox (beyond, a write to the bucket fails with ENOSPC).
DISK_FREE_MB = 16
#: What of s3fs's own messages is kept beside the mount (the rest is dropped).
LOG_BYTES = 1 << 20
#: Seconds an unmounted s3fs has to exit before it is killed.
EXIT_TIMEOUT = 10.0
#: Seconds an s3fs whose first answer to the storage failed has to exit and leave its reasons in its log.
PROBE_EXIT_TIMEOUT = 2.0
SCHEMES = ("s3", "oss", "cos")
#: The endpoint of each scheme's own cloud, for a region (used when no endpoint is given).
CLOUD_ENDPOINTS = {
    "s3": "https://s3.{region}.amazonaws.com",
    "oss": "https://oss-{region}.aliyuncs.com",
    "cos": "https://cos.{region}.myqcloud.com",
}
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]")
_PREFIX_CHARS = re.compile(r"[A-Za-z0-9!\-_.*'()=+@,~ /]*")
_REGION = re.compile(r"[A-Za-z0-9-]{1,64}")
_ACCESS_KEY = re.compile(r"[A-Za-z0-9+/=._-]{1,256}")
#: An endpoint's host: a name or IPv4 address, or a bracketed IPv6 one (nothing that s3fs's `-o` would split).
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")
#: Where no bucket may be mounted: the system (bound read-only from the host), the jail's own places, and `/`.
FORBIDDEN_TREES = (*SYSTEM_DIRS, "/proc", "/dev", "/sys", "/run", "/boot")
#: Directories a bucket may be mounted below but not over (it would hide the sandbox's own files there).
NOT_OVER = ("/", "/home", *USER_DIRS)
#: S3 error codes s3fs logs when its check of the bucket fails, and what to do about each.
S3_ERRORS = {
    "InvalidAccessKeyId": "the storage service does not know this access key: check access_key",
    "SignatureDoesNotMatch": "the secret key does not match the access key: check secret_key",
    "AccessDenied": "these credentials may not read bucket {bucket!r}: check the keys and the bucket's policy",
    "NoSuchBucket": "bucket {bucket!r} does not exist at {endpoint}: check the uri (or create the bucket)",
    "AuthorizationHeaderMalformed": "the region does not match the bucket's: check region",
    "PermanentRedirect": "bucket {bucket!r} is in another region: check region and endpoint",
    "InvalidBucketName": "{bucket!r} is not a valid bucket name for this service",
}


class BucketError(OSError):
    """A bucket that cannot be mounted, with what to fix (never a key)."""


@dataclass(frozen=True)
class Credentials:
    """The keys of one mount: kept only until they are written to its private file."""

    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)


@dataclass(frozen=True)
class Bucket:
    """One object storage mount of a sandbox, as its record keeps it (no keys)."""

    uri: str
    mount_point: str
    endpoint: str
    region: str | None = None

    @property
    def scheme(self) -> str:
        return self.uri.partition("://")[0]

    @property
    def bucket(self) -> str:
        return self.uri.partition("://")[2].partition("/")[0]

    @property
    def prefix(self) -> str:
        """The prefix inside the bucket, without slashes around it ("" for the whole bucket)."""
        return self.uri.partition("://")[2].partition("/")[2].strip("/")

    def public(self) -> dict[str, str]:
        """What get_info and list show of it (PROTOCOL.md 1.9)."""
        return {"uri": self.uri, "mount_point": self.mount_point}

    def to_json(self) -> dict[str, Any]:
        return {"uri": self.uri, "mount_point": self.mount_point, "endpoint": self.endpoint, "region": self.region}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Bucket:
        return cls(str(data["uri"]), str(data["mount_point"]), str(data["endpoint"]), data.get("region"))


# ---- the request ------------------------------------------------------------------------------------------------


def _text(entry: dict[str, Any], name: str, where: str, *, required: bool, limit: int = 2048) -> str | None:
    value = entry.get(name)
    if value is None or value == "":
        if required:
            raise ValueError(f"{where}.{name} is required")
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}.{name} must be a string, not {type(value).__name__}")
    if len(value) > limit or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{where}.{name} must be at most {limit} printable characters")
    return value


def _uri(value: str, where: str) -> str:
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError(f"{where}.uri must look like s3://bucket/prefix/ (or oss://, cos://)")
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.fullmatch(bucket):  # not shown: a mistaken `s3://KEY:SECRET@bucket/` must not be echoed
        raise ValueError(f"{where}.uri: the bucket is not a bucket name (3 to 63 letters, digits, '.', '-', '_')")
    parts = [p for p in prefix.split("/") if p]
    if not _PREFIX_CHARS.fullmatch(prefix) or any(p in (".", "..") for p in parts) or "//" in prefix.strip("/"):
        raise ValueError(
            f"{where}.uri: the prefix {prefix[:80]!r} may hold letters, digits, spaces and !-_.*'()=+@,~ between "
            "single slashes, and no '.' or '..' parts"
        )
    return f"{scheme}://{bucket}/" + "".join(f"{p}/" for p in parts)


def mount_point_problem(path: str, where: str = "object_storage") -> str | None:
    """Why `path` cannot be a mount point in a sandbox, or None."""
    if not path.startswith("/"):
        return f"{where}.mount_point must be an absolute path inside the sandbox (like /mnt/oss), not {path[:80]!r}"
    trimmed = path.rstrip("/") or "/"
    if "//" in trimmed or posixpath.normpath(trimmed) != trimmed:
        return f"{where}.mount_point {path[:80]!r} must be a plain path (no '.', '..' or '//' parts)"
    if trimmed in NOT_OVER:
        return (
            f"{where}.mount_point {trimmed!r} would hide the sandbox's own files; mount below it instead "
            "(like /mnt/oss or /workspace/data)"
        )
    for tree in (*FORBIDDEN_TREES, HOST_ONLY, SANDBOX_RUN, SANDBOX_RELAY):
        if trimmed == tree or trimmed.startswith(tree + "/"):
            return f"{where}.mount_point {trimmed[:80]!r} is over the system directory {tree}; use one like /mnt/oss"
    return None


def parse_object_storage(value: Any) -> list[tuple[Bucket, Credentials]]:
    """The create body's `object_storage` (one object, or a list of them, PROTOCOL.md 1.5): each checked, with
    its keys apart. ValueError says what is wrong (never showing a key)."""
    if value is None or value == [] or value == {}:
        return []
    entries = [value] if isinstance(value, dict) else value
    if not isinstance(entries, list):
        raise ValueError(f"object_storage must be an object or a list of objects, not {type(value).__name__}")
    if len(entries) > MAX_MOUNTS:
        raise ValueError(f"object_storage may have at most {MAX_MOUNTS} mounts, not {len(entries)}")
    found: list[tuple[Bucket, Credentials]] = []
    for index, entry in enumerate(entries):
        where = f"object_storage[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object, not {type(entry).__name__}")
        uri = _uri(_text(entry, "uri", where, required=True) or "", where)
        mount_point = _text(entry, "mount_point", where, required=True, limit=1024) or ""
        problem = mount_point_problem(mount_point, where)
        if problem:
            raise ValueError(problem)
        mount_point = mount_point.rstrip("/")
        access_key = _text(entry, "access_key", where, required=True, limit=256) or ""
        secret_key = _text(entry, "secret_key", where, required=True, limit=1024) or ""
        if not _ACCESS_KEY.fullmatch(access_key):
            raise ValueError(f"{where}.access_key must be letters, digits and +/=._- only (no ':' or spaces)")
        if not secret_key.isascii() or any(c.isspace() for c in secret_key):
            raise ValueError(f"{where}.secret_key must be ASCII without spaces")
        region = _text(entry, "region", where, required=False, limit=64)
        if region is not None and not _REGION.fullmatch(region):
            raise ValueError(f"{where}.region must be letters, digits and '-', like us-east-1")
        endpoint = _endpoint(_text(entry, "endpoint", where, required=False), where)
        if endpoint is None:
            if region is None:
                raise ValueError(f"{where} needs a region or an endpoint (the storage service's URL)")
            endpoint = CLOUD_ENDPOINTS[uri.partition("://")[0]].format(region=region)
        for other, _ in found:
            a, b = other.mount_point, mount_point
            if a == b or b.startswith(a + "/") or a.startswith(b + "/"):
                raise ValueError(f"{where}.mount_point {b!r} overlaps that of another mount ({a!r})")
        found.append((Bucket(uri, mount_point, endpoint, region), Credentials(access_key, secret_key)))
    return found


def _endpoint(value: str | None, where: str) -> str | None:
    if value is None:
        return None
    if "://" not in value:
        value = "https://" + value
    try:
        parts = urlsplit(value)
        port = parts.port  # a bad port raises here
    except ValueError:
        parts, port = None, None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{where}.endpoint must be the service's URL, like https://s3.example.com")
    host = parts.netloc.rpartition("@")[2]
    host = host[: -len(f":{port}")] if port is not None and host.endswith(f":{port}") else host
    if (
        parts.username
        or parts.password
        or parts.query
        or parts.fragment
        or parts.path not in ("", "/")
        or not _HOST.fullmatch(host)
    ):
        raise ValueError(f"{where}.endpoint must be a URL with only a scheme, a host and a port, like http://host:9000")
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


# ---- this machine -----------------------------------------------------------------------------------------------


def fuse_problem() -> str | None:
    """Why this machine cannot mount buckets into sandboxes, or None."""
    if os.geteuid() != 0:
        return "object storage mounts need scalebox-local to run as root (FUSE mounts with allow_other)"
    if not os.path.exists("/dev/fuse"):
        return "object storage mounts need FUSE, and this machine has no /dev/fuse"
    if which("s3fs") is None:
        return "object storage mounts need s3fs (apt-get install s3fs, or jupyter scalebox runtimes install)"
    return None


def s3fs_version() -> str | None:
    """s3fs's version ("1.90"), or None when it is not installed."""
    path = which("s3fs")
    if path is None:
        return None
    import subprocess

    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"V(\d+(?:\.\d+)+)", done.stdout)
    return found.group(1) if found else "unknown"


# ---- one mount --------------------------------------------------------------------------------------------------


def _failure(bucket: Bucket, log_text: str, secrets: list[str]) -> str:
    """What s3fs's log says went wrong, as a sentence that names what to fix (and never a key)."""
    # Only what s3fs reported (its first line repeats its command line, options and all).
    log_text = "\n".join(line for line in log_text.splitlines() if "s3fs version" not in line)
    codes = re.findall(r"<Code>([A-Za-z]+)</Code>", log_text)
    for code in codes:
        if code in S3_ERRORS:
            return S3_ERRORS[code].format(bucket=bucket.bucket, endpoint=bucket.endpoint)
    if codes:
        return f"the storage service at {bucket.endpoint} refused access to bucket {bucket.bucket!r} ({codes[0]})"
    lowered = log_text.lower()
    for needle, why in (
        ("could not resolve", "its host name does not resolve"),
        ("couldnt_resolve", "its host name does not resolve"),
        ("couldn't connect", "nothing answers there"),
        ("couldnt_connect", "nothing answers there"),
        ("connection refused", "nothing answers there"),
        ("timeout", "it did not answer in time"),
        ("timed out", "it did not answer in time"),
        ("ssl", "its TLS certificate was not accepted"),
        ("certificate", "its TLS certificate was not accepted"),
    ):
        if needle in lowered:
            return f"could not reach the endpoint {bucket.endpoint}: {why}; check endpoint (and region)"
    if "no enough disk space" in lowered:
        return (
            f"the sandbox's disk is too small for s3fs's write buffers (it needs {DISK_FREE_MB + 32} MiB free): "
            "ask for more disk_mb"
        )
    lines = [line for line in log_text.splitlines() if "[ERR]" in line or line.startswith("s3fs: ")]
    last = lines[-1].split("):", 1)[-1].strip() if lines else "s3fs gave up without saying why"
    for secret in secrets:
        last = last.replace(secret, "***")
    return f"s3fs could not mount bucket {bucket.bucket!r} from {bucket.endpoint}: {last[:200]}"


class BucketMount:
    """One bucket of one sandbox: its s3fs process and its host mount directory (`<private>/buckets/<n>`)."""

    def __init__(self, bucket: Bucket, index: int, private_dir: Path) -> None:
        self.bucket = bucket
        base = Path(private_dir) / BUCKETS_DIR
        self.host_dir = base / str(index)
        self.passwd = base / f"{index}.passwd"
        self.log = base / f"{index}.log"
        self.process: asyncio.subprocess.Process | None = None
        self._copier: asyncio.Task[None] | None = None  # s3fs's output, keys taken out, into `log`
        self.problem: str | None = None  # why it is not mounted now, when it is not

    def write_credentials(self, credentials: Credentials) -> None:
        """The keys, in the 0600 root-only file s3fs reads (made new, never through a link)."""
        self.passwd.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.passwd.parent, 0o700)
        self.passwd.unlink(missing_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.passwd, flags, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{credentials.access_key}:{credentials.secret_key}\n")

    def _argv(self, s3fs: str, uid: int, gid: int, tmpdir: Path) -> list[str]:
        bucket = self.bucket
        source = bucket.bucket + (f":/{bucket.prefix}" if bucket.prefix else "")
        options = [
            f"passwd_file={self.passwd}",
            f"url={bucket.endpoint}",
            "sigv4",
            f"uid={uid}",
            f"gid={gid}",
            "umask=0022",
            "mp_umask=0022",
            "allow_other",
            "nosuid",
            "nodev",
            "retries=1",
            "connect_timeout=5",
            "readwrite_timeout=60",
            f"tmpdir={tmpdir}",  # files being written wait on the sandbox's own disk, within its limit
            f"ensure_diskfree={DISK_FREE_MB}",
            "multipart_size=8",  # MiB per part, 4 at once: what s3fs needs free on that disk beside DISK_FREE_MB
            "parallel_count=4",
            "dbglevel=err",
        ]
        if bucket.region:
            options.append(f"endpoint={bucket.region}")  # s3fs's name for the region it signs for
        if bucket.scheme == "s3" and not bucket.endpoint.endswith(".amazonaws.com"):
            options.append("use_path_request_style")  # MinIO, Ceph, moto... (OSS and COS want virtual hosts)
        argv = [s3fs, source, str(self.host_dir), "-f"]
        for option in options:
            argv += ["-o", option]
        return argv

    @property
    def mounted(self) -> bool:
        return self.process is not None and self.process.returncode is None and is_mounted(self.host_dir)

    async def mount(self, uid: int, gid: int, *, tmpdir: Path, deadline: float) -> None:
        """Mount the bucket on the host (again, after a restart: what an earlier s3fs left goes first), and wait
        until s3fs has checked it, at most until `deadline` (monotonic); BucketError says what to fix. `tmpdir`
        is a root-only directory on the sandbox's own disk, where s3fs keeps the files being written."""
        if self.mounted:
            return
        await self.unmount()
        s3fs = which("s3fs")
        if s3fs is None:
            raise BucketError(errno.ENOENT, "s3fs is not installed (apt-get install s3fs)")
        if not self.passwd.is_file():
            raise BucketError(errno.ENOENT, "the keys of this mount are gone (its private file is missing)")
        self.host_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmpdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        env = dict(SYSTEM_ENV)
        for name in ("CURL_CA_BUNDLE", "SSL_CERT_FILE"):  # a private CA's certificates (paths, not secrets)
            if os.environ.get(name):
                env["CURL_CA_BUNDLE"] = os.environ[name]
                break
        self.process = await asyncio.create_subprocess_exec(
            *self._argv(s3fs, uid, gid, tmpdir),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        self._copier = asyncio.create_task(_copy_scrubbed(self.process.stdout, self.log, self._secrets()))
        try:
            await asyncio.wait_for(self._checked(), max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()  # stuck in its check: it would not end of itself
            await self.unmount()
            raise BucketError(
                errno.ETIMEDOUT,
                f"s3fs did not mount bucket {self.bucket.bucket!r} in time ({MOUNT_TIMEOUT:.0f} s for all the "
                f"mounts): the endpoint {self.bucket.endpoint} does not answer",
            ) from None
        except BucketError:
            await self.unmount()
            raise
        self.problem = None

    async def _checked(self) -> None:
        """Wait until the mount is there and s3fs's check of the bucket is done (a stat of its root waits for
        FUSE's init, where s3fs makes that check), or s3fs gave up."""
        process = self.process
        assert process is not None
        while not is_mounted(self.host_dir):
            if process.returncode is not None:
                raise BucketError(errno.EIO, await self._why())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 0.05)
        try:
            await asyncio.to_thread(os.stat, self.host_dir)
        except OSError:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), EXIT_TIMEOUT)
            raise BucketError(errno.EIO, await self._why()) from None
        # A failed check only asks s3fs's loop to end: a worker thread already waiting for a request may still
        # answer that first stat, and s3fs then exits (with status 0). So s3fs is asked a question only the
        # storage can answer, a name nobody made: "no such file" comes from a live s3fs whose keys work; an
        # error, or no answer until s3fs has gone, is the failure its log explains.
        probe = self.host_dir / f".scalebox-probe-{token_hex(8)}"
        try:
            await asyncio.to_thread(os.stat, probe)
        except FileNotFoundError:
            pass
        except OSError:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), PROBE_EXIT_TIMEOUT)
            raise BucketError(errno.EIO, await self._why()) from None
        if process.returncode is not None:
            raise BucketError(errno.EIO, await self._why())

    def _secrets(self) -> list[str]:
        with contextlib.suppress(OSError, ValueError):
            access, _, secret = self.passwd.read_text().strip().partition(":")
            return [s for s in (access, secret) if s]
        return []

    async def _why(self) -> str:
        if self._copier is not None:  # s3fs has exited (or is exiting): all it said is in the log
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._copier), 2.0)
        try:
            text = self.log.read_text(errors="replace")[-20000:]
        except OSError:
            text = ""
        return _failure(self.bucket, text, self._secrets())

    async def unmount(self) -> None:
        """Unmount the bucket (lazily: what a dead sandbox still held open is let go) and end its s3fs (or the
        one an earlier server left running)."""
        if is_mounted(self.host_dir):
            await run_tool(["umount", "--lazy", str(self.host_dir)], timeout=30.0, what="a bucket mount")
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            try:
                await asyncio.wait_for(process.wait(), EXIT_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        copier, self._copier = self._copier, None
        if copier is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(copier, 2.0)
        await end_leftovers(self.host_dir)

    def status(self) -> dict[str, Any]:
        info: dict[str, Any] = {**self.bucket.public(), "mounted": self.mounted}
        if not info["mounted"]:
            if self.process is not None and self.process.returncode is not None:
                self.problem = (
                    f"s3fs stopped (exit code {self.process.returncode}); the sandbox's next restart mounts it again"
                )
            if self.problem:
                info["problem"] = self.problem
        return info


async def _copy_scrubbed(stream: asyncio.StreamReader, log: Path, secrets: list[str]) -> None:
    """s3fs's output into `log` with the keys replaced (an S3 error can quote the access key), up to LOG_BYTES;
    read to its end whatever it writes, so that s3fs never blocks on a full pipe."""
    keys = [secret.encode() for secret in secrets if secret]
    keep = max((len(key) for key in keys), default=1) - 1  # bytes held back: a key cut in two is never written
    written = 0
    pending = b""
    with open(log, "wb") as out:

        def emit(data: bytes) -> None:
            nonlocal written
            if data and written + len(data) <= LOG_BYTES:
                with contextlib.suppress(OSError):  # a full disk loses the log, never s3fs
                    out.write(data)
                    out.flush()
                written += len(data)

        def scrub(data: bytes) -> bytes:
            for key in keys:
                data = data.replace(key, b"***")
            return data

        while chunk := await stream.read(65536):
            pending = scrub(pending + chunk)
            cut = pending.rfind(b"\n") + 1
            if not cut and len(pending) > 65536:
                cut = len(pending) - keep
            emit(pending[:cut])
            pending = pending[cut:]
        emit(scrub(pending))


def _leftovers(host_dir: Path) -> list[int]:
    """Pids of s3fs processes serving `host_dir` (an earlier server's, which it could not end)."""
    target = os.fsencode(host_dir)
    s3fs = which("s3fs")
    real = os.path.realpath(s3fs) if s3fs else ""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    argv = handle.read().split(b"\0")
            except OSError:
                continue
            if target not in argv or os.path.basename(argv[0]) != b"s3fs":
                continue
            try:  # ours: root's, running the real s3fs (a sandbox's process may look like one, but is not root)
                if os.stat(f"/proc/{entry}").st_uid != 0 or os.path.realpath(f"/proc/{entry}/exe") != real:
                    continue
            except OSError:
                continue
            found.append(int(entry))
    return found


async def end_leftovers(host_dir: Path) -> None:
    """End the s3fs processes an earlier server left serving `host_dir` (SIGTERM, then SIGKILL after a while)."""
    pids = await asyncio.to_thread(_leftovers, host_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        for _ in range(50):
            pids = [pid for pid in pids if os.path.exists(f"/proc/{pid}") and not _zombie(pid)]
            if not pids:
                return
            await asyncio.sleep(0.1)


def _zombie(pid: int) -> bool:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as handle:
        return handle.read().rpartition(")")[2].split()[0] == "Z"
    return False


async def unmount_all(private_dir: Path) -> None:
    """Unmount whatever buckets are still mounted in a sandbox's private directory (a sandbox removed after a
    server restart: its s3fs processes were not ours)."""
    base = Path(private_dir) / BUCKETS_DIR
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for name in sorted(os.listdir(base)):
            path = base / name
            if name.isdigit():
                if is_mounted(path):
                    await run_tool(["umount", "--lazy", str(path)], timeout=30.0, what="a bucket mount")
                await end_leftovers(path)


def prepare_mount_point(root: Path, mount_point: str, uid: int, gid: int) -> None:
    """Make `mount_point` a real directory in the tree at `root`, for the jail to bind a bucket on; nothing of the
    sandbox runs meanwhile. A link or file in the way is an error (the mount would follow it): every component is
    opened with O_NOFOLLOW from the root down. What is made below the sandbox's own directories is the sandbox's."""
    parts = [p for p in mount_point.split("/") if p]
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for part in parts:
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
                made = True
            except FileExistsError:
                made = False
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError:
                raise BucketError(
                    errno.ENOTDIR,
                    f"the mount point {mount_point} is not a directory in the sandbox (a file or link is in the way)",
                ) from None
            if made and os.fstat(fd).st_uid == uid:
                os.fchown(child, uid, gid)
            os.close(fd)
            fd = child
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise BucketError(errno.ENOTDIR, f"the mount point {mount_point} is not a directory in the sandbox")
    finally:
        os.close(fd)
