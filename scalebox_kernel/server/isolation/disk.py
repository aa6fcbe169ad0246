"""A sandbox's disk limit: its whole tree lives on an ext4 image of `disk_mb` MiB, loop-mounted where the tree is.

The image is a sparse file in the sandbox's private directory (it takes only what is written; `discard` gives
freed blocks back). Filling it is ENOSPC inside that sandbox only; the host's filesystem, the server and the other
sandboxes never notice. `nosuid,nodev` keep set-uid files and device nodes inert even if one were ever made.
"""

from __future__ import annotations

import os
from pathlib import Path

from .tools import run_tool, which

IMAGE = "disk.img"
MOUNT_OPTIONS = "loop,nosuid,nodev,noatime,discard"
COMMAND_TIMEOUT = 60.0


class DiskError(OSError):
    """The sandbox's disk image could not be made or mounted."""


def disk_tools() -> dict[str, str | None]:
    """The programs a disk limit needs (util-linux's mount/umount, e2fsprogs' mkfs.ext4)."""
    return {name: which(name) for name in ("mkfs.ext4", "mount", "umount")}


def can_limit_disk() -> str | None:
    """None when this machine can give sandboxes a disk limit, else why not."""
    if os.geteuid() != 0:
        return "needs root (loop mounts)"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices (/dev/loop-control)"
    missing = [name for name, path in disk_tools().items() if path is None]
    if missing:
        return f"{', '.join(missing)} not installed (e2fsprogs, util-linux)"
    return None


def _unescape(field: str) -> str:
    """A path of /proc/self/mountinfo (spaces, tabs, newlines and backslashes are octal escapes)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def is_mounted(path: Path) -> bool:
    """Whether something is mounted exactly at `path` in this process's mount namespace."""
    target = os.path.abspath(path)
    with open("/proc/self/mountinfo") as handle:
        return any(_unescape(line.split()[4]) == target for line in handle)


async def _run(argv: list[str]) -> None:
    await run_tool(argv, timeout=COMMAND_TIMEOUT, what="the sandbox's disk")


class DiskImage:
    """The image behind one sandbox's tree."""

    def __init__(self, private_dir: Path, mount_point: Path, size_mb: int) -> None:
        self.image = private_dir / IMAGE
        self.mount_point = mount_point
        self.size_mb = size_mb

    @property
    def exists(self) -> bool:
        return self.image.is_file()

    async def mount(self) -> None:
        """Make the image (first start only) and mount it on the tree; idempotent."""
        if is_mounted(self.mount_point):
            return
        self.mount_point.mkdir(parents=True, exist_ok=True)
        if not self.exists:
            if any(self.mount_point.iterdir()):
                raise DiskError("the sandbox's tree already has files, so no disk image can be put under it")
            fd = os.open(self.image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, self.size_mb * 1024 * 1024)
            finally:
                os.close(fd)
            try:
                # No reserved blocks (root's writes count too), fewer inodes than the default, lazy init: fast.
                await _run(
                    ["mkfs.ext4", "-q", "-F", "-m", "0", "-i", "32768", "-E",
                     "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0", str(self.image)],
                )  # fmt: skip
            except BaseException:
                self.image.unlink(missing_ok=True)
                raise
        await _run(["mount", "-o", MOUNT_OPTIONS, str(self.image), str(self.mount_point)])
        lost = self.mount_point / "lost+found"
        if lost.is_dir() and not lost.is_symlink() and not any(lost.iterdir()):
            lost.rmdir()
        os.chmod(self.mount_point, 0o755)

    async def unmount(self) -> None:
        """Detach the image from the tree (lazily: an fd still open elsewhere only delays the release)."""
        if is_mounted(self.mount_point):
            await _run(["umount", "--lazy", str(self.mount_point)])

    def usage(self) -> tuple[int, int]:
        """(total, used) bytes of the sandbox's disk."""
        info = os.statvfs(self.mount_point)
        total = info.f_blocks * info.f_frsize
        return total, total - info.f_bfree * info.f_frsize
