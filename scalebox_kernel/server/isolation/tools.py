"""The host programs isolation runs as root (mount, mkfs.ext4, ip, nsenter, ...): where they are looked up, with
what PATH they run, and how a short one is run to its end."""

from __future__ import annotations

import asyncio
import os
import shutil

#: PATH of the privileged programs (never the sandbox's PATH, nor the server's alone: /usr/sbin may be missing).
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The environment they run with.
SYSTEM_ENV = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"}


def which(name: str) -> str | None:
    """`name` on the server's PATH, else in the system directories."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), SYSTEM_PATH]))


async def run_tool(argv: list[str], *, stdin: bytes | None = None, timeout: float, what: str) -> None:
    """Run a short program to its end; OSError naming `what` with the end of its stderr if it fails or takes
    longer than `timeout` seconds (then it is killed)."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=SYSTEM_ENV,
    )
    try:
        _, err = await asyncio.wait_for(process.communicate(stdin), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise OSError(f"{what}: {os.path.basename(argv[0])} did not finish within {timeout:.0f} s") from None
    if process.returncode:
        raise OSError(f"{what}: {os.path.basename(argv[0])} failed: {err.decode(errors='replace').strip()[-300:]}")
