"""Sandbox paths as clients send them: normalised, validated, and mapped to host paths only as text.

Absolute sandbox paths are taken from the sandbox's `/`, relative ones from `/home/user`; `..` cannot climb above
`/`. No file is ever opened by the host path this gives: file work goes through `..isolation.tree`, which
resolves paths inside the sandbox. The host path only names, lexically, a directory the sandbox has (a kernel's
working directory, its home in an environment variable).
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from ...protocol.connect import ConnectError
from ..isolation.layout import HOME
from ..isolation.tree import SandboxTree
from ..validation import path_problem


class SandboxPaths:
    """Normalises the paths a client names and checks them against one sandbox."""

    def __init__(self, root: Path, tree: SandboxTree) -> None:
        self.root = Path(root)
        self.tree = tree

    def normalize(self, path: str) -> str:
        """The absolute, normalised sandbox path for what a client sent (no symlinks resolved)."""
        if not path:
            raise ConnectError("invalid_argument", "path must not be empty")
        problem = path_problem(path)
        if problem:
            raise ConnectError("invalid_argument", problem)
        joined = path if path.startswith("/") else posixpath.join(HOME, path)
        normal = posixpath.normpath(joined)
        # normpath keeps a leading "//" (POSIX allows it to be special); a sandbox has no such thing.
        return "/" + normal.lstrip("/")

    def to_host(self, path: str) -> Path:
        """The host path, lexically, of a sandbox path in the sandbox's own tree (never opened as such)."""
        sandbox_path = self.normalize(path)
        return self.root / sandbox_path.lstrip("/") if sandbox_path != "/" else self.root

    def cwd(self, path: str) -> tuple[str, Path]:
        """(sandbox path, host path) of the working directory a client named (empty: the home directory)."""
        sandbox_path = self.normalize(path or HOME)
        if not self.tree.call(self.tree.is_dir, sandbox_path):
            raise ConnectError("invalid_argument", f"cwd {sandbox_path} is not a directory in this sandbox")
        return sandbox_path, self.to_host(sandbox_path)
