"""`%scalebox …` lines inside the Scalebox kernel, carried out here against the notebook's own sandbox session.
The texts and formats are the IPython extension's (`scalebox_kernel.magics`), so both doors read the same."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CommandExitError, InvalidArgument
from ..magics._status import info_rows, info_text, parse_duration, time_left
from .relay import CellRelay, OpeningProgress

if TYPE_CHECKING:
    from .kernel import ScaleboxKernel

_LINE = re.compile(r"^%scalebox(\s|$)")
WORKSPACE = "/workspace"

HELP = """\
In the Scalebox kernel every cell runs in this notebook's sandbox; %scalebox lines at the top of a cell run here:

%scalebox info                     sandbox id, state, time left, contexts, packages, files
%scalebox pause / resume           pause the sandbox (state kept; the next cell resumes it) / resume it now
%scalebox timeout 30m              let the sandbox live 30 more minutes (s, m, h)
%scalebox keep [on|off]            keep the sandbox when the kernel shuts down (default: it is killed)
%scalebox restart                  a fresh context in the same sandbox (variables are gone)
%scalebox upload LOCAL [REMOTE]    copy a file into the sandbox (default /workspace/NAME)
%scalebox download REMOTE [LOCAL]  copy a file out of the sandbox
%scalebox ls [PATH]                list a folder in the sandbox (default /workspace)
%scalebox pip install PKG ... | install PKG ...   install packages for this kernel's language, in this sandbox only
%scalebox env [K=V ...] [--unset K]               environment for the following cells and commands
%scalebox run CMD                  run a shell command in the sandbox
%scalebox help                     this text
(Several named sessions, %%scalebox and the status panel belong to the IPython extension: %load_ext scalebox_kernel
in an ordinary Python kernel.)
"""


def split_cell(code: str) -> tuple[list[str], str]:
    """The `%scalebox` lines at the top of a cell, and the code after them."""
    lines = code.split("\n")
    commands: list[str] = []
    index = 0
    while index < len(lines) and (not lines[index].strip() or _LINE.match(lines[index])):
        if lines[index].strip():
            commands.append(lines[index])
        index += 1
    return commands, "\n".join(lines[index:]) if commands else code


def misplaced(code: str) -> str | None:
    """A usage error when `%scalebox` lines come after code (they must come first, they do not run remotely)."""
    if any(_LINE.match(line) for line in code.split("\n")):
        return "put %scalebox lines at the top of the cell, before any code: they run here, not in the sandbox."
    return None


def _usage(message: str) -> InvalidArgument:
    return InvalidArgument(f"{message} (%scalebox help lists the commands)")


async def run(kernel: ScaleboxKernel, line: str, relay: CellRelay) -> None:
    """Carry out one `%scalebox` line, printing what it did to the cell's stdout."""
    try:
        words = shlex.split(line)[1:]
    except ValueError as exc:
        raise _usage(f"%scalebox: {exc}") from None
    command, args = (words[0].lower(), words[1:]) if words else ("help", [])

    def say(text: str) -> None:
        relay.stream("stdout", text.rstrip("\n") + "\n")

    if command == "help":
        say(HELP)
        return
    if command == "keep":
        if args and args[0].lower() not in ("on", "off"):
            raise _usage("%scalebox keep takes on or off")
        kernel.sandbox.keep = not args or args[0].lower() == "on"
        kernel.sandbox.remember()
        say(f"The sandbox will be {'kept' if kernel.sandbox.keep else 'killed'} when the kernel shuts down.")
        return
    if command == "env":
        _env(kernel, args, say)
        return
    if command not in _NEEDS_SESSION:
        if command in ("new", "use", "list", "close", "status"):
            raise _usage(f"%scalebox {command} is not available in the Scalebox kernel: a notebook has one sandbox")
        raise _usage(f"unknown %scalebox command {command!r}")
    session = await kernel.open_session(relay)
    sandbox = session.sandbox
    if command == "info":
        rows = info_rows(kernel.sandbox.notebook, session, await session.info(), kernel.envs)
        rows.append(("kept at shutdown", "yes" if kernel.sandbox.keep else "no"))
        say(info_text(rows))
    elif command == "pause":
        await session.pause()
        kernel.paused = True
        say(f"Sandbox {session.session_id} paused; its state is kept. %scalebox resume (or any cell) resumes it.")
    elif command == "resume":
        await session.resume()
        say(f"Sandbox {session.session_id} is running.")
    elif command == "timeout":
        if len(args) != 1:
            raise _usage("usage: %scalebox timeout DURATION   (e.g. 30m, 1h, 90s)")
        try:
            seconds = parse_duration(args[0])
        except ValueError as exc:
            raise _usage(str(exc)) from None
        info = await session.keep_alive(seconds)
        say(f"Sandbox {session.session_id} now lives {time_left(info)} more.")
    elif command == "restart":
        await session.restart(kernel.lang.wire)
        say(f"Started a fresh {kernel.lang.display} context in sandbox {session.session_id}; variables are gone.")
    elif command == "ls":
        path = args[0] if args else WORKSPACE
        entries = await sandbox.files.list(path)
        if not entries:
            say(f"{path} is empty.")
        for item in sorted(entries, key=lambda e: (str(e.type) != "dir", e.name)):
            kind = "d" if str(item.type) == "dir" else "-"
            say(f"{kind} {item.size:>10}  {item.name}{'/' if kind == 'd' else ''}")
    elif command in ("pip", "install"):
        if command == "pip" and (not args or args[0] != "install"):
            raise _usage("usage: %scalebox pip install PACKAGE ...")
        packages = args[1:] if command == "pip" else args
        if not packages:
            raise _usage("name at least one package")
        progress = OpeningProgress(relay, kernel.progress_delay, f"Installing {' '.join(packages)}")
        language = "python" if command == "pip" else kernel.lang.wire
        done = await progress.wait(session.install(packages, language, on_progress=progress.update))
        skipped = [p for p in packages if p not in done]
        if done:
            say(f"Installed {' '.join(done)} in sandbox {session.session_id}.")
        if skipped:
            say(f"Already installed in this session: {' '.join(skipped)}.")
    elif command == "run":
        if not args:
            raise _usage("usage: %scalebox run COMMAND")
        try:
            await sandbox.commands.run(
                " ".join(args) if len(args) > 1 else args[0],
                cwd=WORKSPACE,
                envs=kernel.envs or None,
                on_stdout=lambda out: relay.stream("stdout", str(out)),
                on_stderr=lambda out: relay.stream("stderr", str(out)),
                timeout=None,
            )
        except CommandExitError as exc:
            raise InvalidArgument(f"the command exited with code {exc.exit_code}") from None
    elif command == "upload":
        if not 1 <= len(args) <= 2:
            raise _usage("usage: %scalebox upload LOCAL [REMOTE]")
        local = Path(args[0]).expanduser()
        if not local.is_file():
            raise _usage(f"no file {str(local)!r} here (the kernel runs in {Path.cwd()})")
        remote = args[1] if len(args) > 1 else f"{WORKSPACE}/{local.name}"
        written = await session.upload({remote: local.read_bytes()})
        say(f"Uploaded {local} to {remote}." if written else f"{remote} already has that content.")
    elif command == "download":
        if not 1 <= len(args) <= 2:
            raise _usage("usage: %scalebox download REMOTE [LOCAL]")
        data = (await session.download([args[0]]))[args[0]]
        target = Path(args[1] if len(args) > 1 else Path(args[0]).name).expanduser()
        target.write_bytes(data)
        say(f"Downloaded {args[0]} to {target} ({len(data)} bytes).")


_NEEDS_SESSION = {"info", "pause", "resume", "timeout", "restart", "ls", "pip", "install", "run", "upload", "download"}


def _env(kernel: ScaleboxKernel, args: list[str], say: Callable[[str], None]) -> None:
    unset = False
    for word in args:
        if word == "--unset":
            unset = True
        elif unset:
            kernel.envs.pop(word, None)
            unset = False
        else:
            key, sep, value = word.partition("=")
            if not sep or not key:
                raise _usage(f"expected KEY=VALUE, got {word!r}")
            kernel.envs[key] = value
    lines = [f"{k}={kernel.envs[k]}" for k in sorted(kernel.envs)] if not args else []
    text = "\n".join(lines) if lines else f"Environment: {', '.join(sorted(kernel.envs)) or 'empty'}."
    say(text)
