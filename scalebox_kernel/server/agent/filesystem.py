"""The Filesystem service's unary RPCs: Stat, MakeDir, Move, ListDir and Remove, inside one sandbox.

Every call runs on the sandbox's own file threads (`..isolation.tree`): paths are resolved inside the sandbox as
its processes would resolve them (a symlink to `/etc` means the sandbox's `/etc`), permissions are checked for the
sandbox's uid, and nothing can reach the host. Errors carry the texts the SDKs match on (PROTOCOL.md 3.6) and
name sandbox paths, never host paths.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import posixpath
import pwd
import stat

from google.protobuf.timestamp_pb2 import Timestamp

from ...protocol import pb
from ...protocol.connect import ConnectError
from ..isolation.layout import SANDBOX_USER
from ..isolation.tree import SandboxTree, split
from .paths import SandboxPaths

#: Most levels a ListDir or a recursive watch goes down; most entries one ListDir returns.
MAX_DEPTH = 64
MAX_ENTRIES = 50_000


def missing(path: str, op: str = "stat") -> ConnectError:
    """The not-found error both SDKs recognise (Python wants one substring, JS the other)."""
    return ConnectError("not_found", f"{op} {path}: no such file or directory (not found)")


def os_error(exc: OSError, op: str, path: str) -> ConnectError:
    """An OSError as a Connect error that names the sandbox path (the exception's own text is never used: it may
    name a host path)."""
    code = exc.errno
    reason = os.strerror(code).lower() if code else "failed"
    if code == errno.ENOENT:
        return missing(path, op)
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ConnectError("permission_denied", f"{op} {path}: permission denied")
    if code == errno.EEXIST:
        return ConnectError("already_exists", f"{op} {path}: file already exists")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return ConnectError("resource_exhausted", f"{op} {path}: no space left on device (the sandbox's disk is full)")
    if code == errno.EBUSY:
        return ConnectError("failed_precondition", f"{op} {path}: busy (a mount point of the sandbox)")
    if code == errno.EXDEV:
        return ConnectError("invalid_argument", f"{op} {path}: cannot move across file systems of the sandbox")
    if code in (errno.ENXIO, errno.ENODEV, errno.ESPIPE):  # a socket or device: nothing a file API reads
        return ConnectError("invalid_argument", f"{op} {path}: not a regular file")
    if code in (errno.EMFILE, errno.ENFILE, errno.EAGAIN):  # the server is busy: worth a retry
        return ConnectError("unavailable", f"{op} {path}: {reason}; try again")
    if code == errno.EMLINK:
        return ConnectError("invalid_argument", f"{op} {path}: {reason}")
    if code == errno.E2BIG:
        return ConnectError("resource_exhausted", f"{op} {path}: too many entries; ask for a subdirectory")
    if code in (errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY, errno.EINVAL, errno.ELOOP, errno.ENAMETOOLONG):
        return ConnectError("invalid_argument", f"{op} {path}: {reason}")
    return ConnectError("internal", f"{op} {path}: {reason}")


def text(name: str) -> str:
    """A path or name as valid UTF-8 for the wire: bytes that are not UTF-8 (which os.listdir keeps as
    surrogates) become U+FFFD, since protobuf strings cannot carry them."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


class Filesystem:
    """Stat, MakeDir, Move, ListDir, Remove over a sandbox's files (blocking: run them on the tree's threads)."""

    def __init__(self, paths: SandboxPaths, tree: SandboxTree) -> None:
        self.paths = paths
        self.tree = tree

    def _owner(self, uid: int) -> str:
        return SANDBOX_USER if self.tree.uid == uid else _user_name(uid)

    def entry_info(self, path: str, info: os.stat_result) -> pb.EntryInfo:
        """EntryInfo for the entry at sandbox `path` whose lstat is `info`; a symlink reports its target's type
        and size (as the sandbox resolves it) unless it dangles."""
        target: str | None = None
        if stat.S_ISLNK(info.st_mode):
            link = self.tree.readlink(path)
            target = posixpath.normpath(posixpath.join(split(path)[0], link))
            with contextlib.suppress(OSError):  # a dangling link: describe the link itself
                info = self.tree.stat(path)
        if stat.S_ISDIR(info.st_mode):
            kind = pb.FILE_TYPE_DIRECTORY
        elif stat.S_ISLNK(info.st_mode):
            kind = pb.FILE_TYPE_UNSPECIFIED
        else:
            kind = pb.FILE_TYPE_FILE
        modified = Timestamp()
        modified.FromNanoseconds(info.st_mtime_ns)
        entry = pb.EntryInfo(
            name=text(split(path)[1] or "/"),
            type=kind,
            path=text(path),
            size=info.st_size,
            mode=stat.S_IMODE(info.st_mode),
            permissions=stat.filemode(info.st_mode)[1:],
            owner=self._owner(info.st_uid),
            group=_group_name(info.st_gid) if self.tree.uid != info.st_gid else SANDBOX_USER,
            modified_time=modified,
        )
        if target is not None:
            entry.symlink_target = text(target)
        return entry

    def _info(self, path: str, op: str) -> pb.EntryInfo:
        try:
            return self.entry_info(path, self.tree.lstat(path))
        except OSError as exc:
            raise os_error(exc, op, path) from None

    def stat(self, request: pb.StatRequest) -> pb.StatResponse:
        return pb.StatResponse(entry=self._info(self.paths.normalize(request.path), "stat"))

    def make_dir(self, request: pb.MakeDirRequest) -> pb.MakeDirResponse:
        path = self.paths.normalize(request.path)
        try:
            if self.tree.exists(path, follow=False):
                if self.tree.is_dir(path):
                    raise ConnectError("already_exists", f"directory already exists: {path}")
                raise ConnectError("already_exists", f"mkdir {path}: a file with that name exists (not a directory)")
            self.tree.makedirs(path)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                raise ConnectError("already_exists", f"directory already exists: {path}") from None
            raise os_error(exc, "mkdir", path) from None
        return pb.MakeDirResponse(entry=self._info(path, "mkdir"))

    def move(self, request: pb.MoveRequest) -> pb.MoveResponse:
        source = self.paths.normalize(request.source)
        destination = self.paths.normalize(request.destination)
        if source == "/" or destination == "/":
            raise ConnectError("permission_denied", "cannot move the sandbox's root directory")
        if destination.startswith(source + "/"):
            raise ConnectError("invalid_argument", f"cannot move {source} into itself ({destination})")
        try:
            if not self.tree.exists(source, follow=False):
                raise missing(source, "rename")
            self.tree.makedirs(split(destination)[0])
            self.tree.rename(source, destination)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise ConnectError("invalid_argument", f"cannot move {source} into itself ({destination})") from None
            raise os_error(exc, "rename", source) from None
        return pb.MoveResponse(entry=self._info(destination, "rename"))

    def list_dir(self, request: pb.ListDirRequest) -> pb.ListDirResponse:
        path = self.paths.normalize(request.path)
        depth = min(max(1, request.depth), MAX_DEPTH)  # proto3 JSON omits 0; the SDKs mean 1
        try:
            if not self.tree.exists(path):
                raise missing(path, "list")
            if not self.tree.is_dir(path):
                raise ConnectError("invalid_argument", f"list {path}: not a directory")
            found = self.tree.walk(path, depth, MAX_ENTRIES)
            entries = []
            for item in found:
                try:
                    entries.append(self.entry_info(item.path, item.info))
                except FileNotFoundError:
                    continue  # removed while we listed
        except OSError as exc:
            raise os_error(exc, "list", path) from None
        return pb.ListDirResponse(entries=entries)

    def remove(self, request: pb.RemoveRequest) -> pb.RemoveResponse:
        path = self.paths.normalize(request.path)
        if path == "/":
            raise ConnectError("permission_denied", "cannot remove the sandbox's root directory")
        try:
            if not self.tree.exists(path, follow=False):
                raise missing(path, "remove")
            self.tree.remove(path)  # a symlink is removed itself, never its target
        except OSError as exc:
            raise os_error(exc, "remove", path) from None
        return pb.RemoveResponse()
