"""A sandbox's disk limit: its whole tree lives on an ext4 image of `disk_mb` MiB, loop-mounted where the tree is.

The image is a sparse file in the sandbox's private directory (it takes only what is written; `discard` gives
freed blocks back). Filling it is ENOSPC inside that sandbox only; the host's filesystem, the server and the other
sandboxes never notice. `nosuid,nodev` keep set-uid files and device nodes inert even if one were ever made.

Formatting an image is about a tenth of a cold create's wait before the sandbox's kernel can start, so one image of
the size last asked for is formatted ahead, in the background, in a root-only directory (`SpareImage`): a create
then moves it into place. It is an empty file system that no sandbox has seen, made for one sandbox only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from .tools import run_tool, which

log = logging.getLogger(__name__)

IMAGE = "disk.img"
MOUNT_OPTIONS = "loop,nosuid,nodev,noatime,discard"
COMMAND_TIMEOUT = 60.0
#: Seconds after an image is taken before the next spare is formatted: not while the create that took it runs.
SPARE_DELAY = 0.25


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


async def make_image(path: Path, size_mb: int, *, background: bool = False) -> None:
    """A new sparse image of `size_mb` MiB at `path`, formatted ext4 (root's, 0600); nothing is left on failure.
    `background`: formatted on CPU that nothing else wants (nice 19)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size_mb * 1024 * 1024)
    finally:
        os.close(fd)
    try:
        # No reserved blocks (root's writes count too), fewer inodes than the default, lazy init: fast.
        nice = which("nice") if background else None
        await _run(
            [*([nice, "-n", "19"] if nice else []), "mkfs.ext4", "-q", "-F", "-m", "0", "-i", "32768", "-E",
             "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0", str(path)],
        )  # fmt: skip
    except BaseException:
        path.unlink(missing_ok=True)
        raise


class SpareImage:
    """One formatted image made ahead, of the size the last new disk had, in `directory` (root-only). `take` moves
    it into a sandbox (a rename: two creates can never both get it); each take formats the next one a moment later,
    in the background."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._making: asyncio.Task[None] | None = None

    def _spare(self, size_mb: int) -> Path:
        return self.directory / f"spare-{size_mb}.img"

    def take(self, size_mb: int, image: Path) -> bool:
        """Move the spare of `size_mb` MiB to `image` (same file system); False when there is none. Either way the
        next spare, of this size, is formatted after SPARE_DELAY."""
        taken = False
        with contextlib.suppress(OSError):  # none yet (or another file system: the next disk is formatted)
            os.rename(self._spare(size_mb), image)
            taken = True
        with contextlib.suppress(RuntimeError):  # no loop: nothing is made ahead
            asyncio.get_running_loop().call_later(SPARE_DELAY, self._make, size_mb)
        return taken

    def _make(self, size_mb: int) -> None:
        making = self._making
        if making is None or making.done() or making.get_loop().is_closed():  # one at a time, on this loop
            self._making = asyncio.get_running_loop().create_task(self._made(size_mb), name="spare disk image")

    async def _made(self, size_mb: int) -> None:
        spare = self._spare(size_mb)
        if spare.exists():
            return
        partial = self.directory / ".partial.img"  # never taken: a spare is only ever its final name
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)
            partial.unlink(missing_ok=True)
            await make_image(partial, size_mb, background=True)
            for other in self.directory.glob("spare-*.img"):  # one spare: the size asked for last
                other.unlink(missing_ok=True)
            os.rename(partial, spare)
        except OSError as exc:  # the next disk is made on its create, as without a spare
            log.info("no spare disk image of %d MiB: %s", size_mb, exc)


#: The spare of each spares directory (one per server data dir).
_SPARES: dict[Path, SpareImage] = {}


def spare_image(directory: Path) -> SpareImage:
    """The SpareImage of `directory`, shared by every sandbox of the server that keeps its spares there."""
    return _SPARES.setdefault(directory, SpareImage(directory))


class DiskImage:
    """The image behind one sandbox's tree (a new one is a spare when there is one: `spares`)."""

    def __init__(self, private_dir: Path, mount_point: Path, size_mb: int, spares: SpareImage | None = None) -> None:
        self.image = private_dir / IMAGE
        self.mount_point = mount_point
        self.size_mb = size_mb
        self.spares = spares

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
            if self.spares is None or not self.spares.take(self.size_mb, self.image):
                await make_image(self.image, self.size_mb)
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
