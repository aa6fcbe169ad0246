"""The Filesystem service's unary RPCs: Stat, MakeDir, Move, ListDir and Remove, inside one sandbox's root.

Errors carry the texts the SDKs match on (PROTOCOL.md 3.6) and name sandbox paths, never host paths.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import shutil
import stat
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from ...protocol import pb
from ...protocol.connect import ConnectError
from .paths import SandboxPaths


def missing(path: str, op: str = "stat") -> ConnectError:
    """The not-found error both SDKs recognise (Python wants one substring, JS the other)."""
    return ConnectError("not_found", f"{op} {path}: no such file or directory (not found)")


def os_error(exc: OSError, op: str, path: str) -> ConnectError:
    """An OSError as a Connect error that names the sandbox path (the exception's text names the host path)."""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOENT:
        return missing(path, op)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ConnectError("permission_denied", f"{op} {path}: permission denied")
    if exc.errno == errno.EEXIST:
        return ConnectError("already_exists", f"{op} {path}: file already exists")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ConnectError("resource_exhausted", f"{op} {path}: no space left on device")
    if exc.errno in (errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY, errno.EINVAL, errno.ELOOP, errno.ENAMETOOLONG):
        return ConnectError("invalid_argument", f"{op} {path}: {reason.lower()}")
    return ConnectError("internal", f"{op} {path}: {reason.lower()}")


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
    """Stat, MakeDir, Move, ListDir, Remove over a sandbox's tree (blocking calls; run them in a thread)."""

    def __init__(self, paths: SandboxPaths) -> None:
        self.paths = paths

    def entry_info(self, host: Path) -> pb.EntryInfo:
        """EntryInfo for a host path inside the root; a symlink reports its target's type and size when the
        target is inside the sandbox, and its own otherwise."""
        info = os.lstat(host)
        target: str | None = None
        if stat.S_ISLNK(info.st_mode):
            resolved = Path(os.path.realpath(host))
            if self.paths.contains(resolved):
                target = self.paths.to_sandbox(resolved)
                with contextlib.suppress(OSError):  # a dangling link: describe the link itself
                    info = os.stat(host)
            else:
                target = os.readlink(host)
        if stat.S_ISDIR(info.st_mode):
            kind = pb.FILE_TYPE_DIRECTORY
        elif stat.S_ISLNK(info.st_mode):
            kind = pb.FILE_TYPE_UNSPECIFIED
        else:
            kind = pb.FILE_TYPE_FILE
        modified = Timestamp()
        modified.FromNanoseconds(info.st_mtime_ns)
        sandbox_path = self.paths.to_sandbox(host)
        entry = pb.EntryInfo(
            name=host.name if sandbox_path != "/" else "/",
            type=kind,
            path=sandbox_path,
            size=info.st_size,
            mode=stat.S_IMODE(info.st_mode),
            permissions=stat.filemode(info.st_mode)[1:],
            owner=_user_name(info.st_uid),
            group=_group_name(info.st_gid),
            modified_time=modified,
        )
        if target is not None:
            entry.symlink_target = target
        return entry

    def stat(self, request: pb.StatRequest) -> pb.StatResponse:
        path = self.paths.normalize(request.path)
        host = self.paths.to_host(path)
        if not os.path.lexists(host):
            raise missing(path)
        return pb.StatResponse(entry=self._info(host, "stat", path))

    def make_dir(self, request: pb.MakeDirRequest) -> pb.MakeDirResponse:
        path = self.paths.normalize(request.path)
        host = self.paths.to_host(path)
        if host.is_dir():
            raise ConnectError("already_exists", f"directory already exists: {path}")
        if os.path.lexists(host):
            raise ConnectError("already_exists", f"mkdir {path}: a file with that name exists (not a directory)")
        try:
            os.makedirs(host)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                raise ConnectError("already_exists", f"directory already exists: {path}") from None
            raise os_error(exc, "mkdir", path) from None
        self.paths.own(host)
        return pb.MakeDirResponse(entry=self._info(host, "mkdir", path))

    def move(self, request: pb.MoveRequest) -> pb.MoveResponse:
        source = self.paths.normalize(request.source)
        destination = self.paths.normalize(request.destination)
        source_host = self.paths.to_host(source, follow=False)
        destination_host = self.paths.to_host(destination, follow=False)
        if source_host == self.paths.root:
            raise ConnectError("permission_denied", "cannot move the sandbox's root directory")
        if not os.path.lexists(source_host):
            raise missing(source, "rename")
        if destination_host.is_relative_to(source_host) and destination_host != source_host:
            raise ConnectError("invalid_argument", f"cannot move {source} into itself ({destination})")
        try:
            destination_host.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source_host, destination_host)
        except OSError as exc:
            raise os_error(exc, "rename", source) from None
        self.paths.own(destination_host)
        return pb.MoveResponse(entry=self._info(destination_host, "rename", destination))

    def list_dir(self, request: pb.ListDirRequest) -> pb.ListDirResponse:
        path = self.paths.normalize(request.path)
        host = self.paths.to_host(path)
        if not os.path.lexists(host):
            raise missing(path, "list")
        if not host.is_dir():
            raise ConnectError("invalid_argument", f"list {path}: not a directory")
        depth = max(1, request.depth)  # proto3 JSON omits 0; the SDKs mean 1
        entries: list[pb.EntryInfo] = []
        self._walk(host, depth, entries, path)
        return pb.ListDirResponse(entries=entries)

    def _walk(self, directory: Path, depth: int, entries: list[pb.EntryInfo], path: str) -> None:
        try:
            names = sorted(os.listdir(directory))
        except OSError as exc:
            raise os_error(exc, "list", self.paths.to_sandbox(directory)) from None
        for name in names:
            child = directory / name
            try:
                entries.append(self.entry_info(child))
            except FileNotFoundError:
                continue  # removed while we listed
            # Never descend through symlinks: they may loop or lead out of the sandbox.
            if depth > 1 and child.is_dir() and not child.is_symlink():
                self._walk(child, depth - 1, entries, path)

    def remove(self, request: pb.RemoveRequest) -> pb.RemoveResponse:
        path = self.paths.normalize(request.path)
        host = self.paths.to_host(path, follow=False)  # a symlink is removed itself, never its target
        if host == self.paths.root:
            raise ConnectError("permission_denied", "cannot remove the sandbox's root directory")
        if not os.path.lexists(host):
            raise missing(path, "remove")
        try:
            if host.is_dir() and not host.is_symlink():
                shutil.rmtree(host)
            else:
                host.unlink()
        except OSError as exc:
            raise os_error(exc, "remove", path) from None
        return pb.RemoveResponse()

    def _info(self, host: Path, op: str, path: str) -> pb.EntryInfo:
        try:
            return self.entry_info(host)
        except OSError as exc:
            raise os_error(exc, op, path) from None
