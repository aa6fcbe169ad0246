"""Sandbox paths <-> host paths: a sandbox's `/` is its root directory on the host, and nothing may leave it.

Absolute sandbox paths are taken relative to the root, relative ones against `/home/user`; `..` cannot climb
above `/`. Symlinks (in any component, the last one included) are followed the way the host would follow them,
and a path that ends up outside the root is refused.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable
from pathlib import Path

from ...protocol.connect import ConnectError
from ..isolation.layout import HOME


class SandboxPaths:
    """Maps the paths a client names to host paths under one sandbox's root, refusing escapes."""

    def __init__(self, root: Path, owner: Callable[[Path], None] | None = None) -> None:
        self.root = Path(os.path.realpath(root))
        self._owner = owner

    def own(self, host: Path) -> None:
        """Hand what the server just wrote into the tree to the sandbox's own user (when it has one)."""
        if self._owner is not None:
            self._owner(host)

    def normalize(self, path: str) -> str:
        """The absolute, normalised sandbox path for what a client sent (no symlinks resolved)."""
        if not path:
            raise ConnectError("invalid_argument", "path must not be empty")
        if "\x00" in path:
            raise ConnectError("invalid_argument", "path must not contain NUL bytes")
        joined = path if path.startswith("/") else posixpath.join(HOME, path)
        normal = posixpath.normpath(joined)
        # normpath keeps a leading "//" (POSIX allows it to be special); a sandbox has no such thing.
        return "/" + normal.lstrip("/")

    def to_host(self, path: str, *, follow: bool = True) -> Path:
        """The host path for a sandbox path, after checking that it (or, with follow=False, its parent) stays
        inside the root once symlinks are followed. The returned path itself is not resolved, so that callers
        act on the name the client gave (a symlink stays a symlink)."""
        sandbox_path = self.normalize(path)
        host = self.root / sandbox_path.lstrip("/") if sandbox_path != "/" else self.root
        check = host if follow or host == self.root else host.parent
        if not self.contains(Path(os.path.realpath(check))):
            raise ConnectError("permission_denied", f"path {sandbox_path} is outside the sandbox")
        return host

    def cwd(self, path: str) -> tuple[str, Path]:
        """(sandbox path, host path) of the working directory a client named (empty: the home directory)."""
        sandbox_path = self.normalize(path or HOME)
        host = self.to_host(sandbox_path)
        if not host.is_dir():
            raise ConnectError("invalid_argument", f"cwd {sandbox_path} is not a directory in this sandbox")
        return sandbox_path, host

    def contains(self, host: Path) -> bool:
        """Whether an already resolved host path is the root or below it."""
        return host == self.root or host.is_relative_to(self.root)

    def to_sandbox(self, host: Path) -> str:
        """The sandbox path of a host path below the root (for EntryInfo.path and messages)."""
        relative = Path(host).relative_to(self.root)
        return "/" + relative.as_posix() if relative.parts else "/"
