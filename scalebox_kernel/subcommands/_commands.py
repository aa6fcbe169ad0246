"""The `%scalebox` subcommands, once for both doors: sessions, lifetime, files, packages, env, shell commands,
status and help. `Commands(sessions, out).run(line)` carries out one line on the loop that owns the sessions."""

from __future__ import annotations

import argparse
import contextlib
import os
import posixpath
import shlex
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

from ..client import ObjectStorage
from ..client.models import DEFAULT_MOUNT_POINT
from ..errors import SandboxNotFound
from ..session import WORKSPACE, Attach, SandboxSession, Session, canonical_language
from ._output import Output, SubcommandError, say, streamer
from ._sessions import NamedSession, Sessions
from ._status import StatusPanel, duration, info_rows, info_text, parse_duration, time_left

COMMANDS_HELP = """\
%scalebox new [NAME] [--language L] [--timeout 30m] [--keep] [--template T] [--cpu N] [--memory MiB]
              [--no-internet] [--env K=V ...] [--mount s3://BUCKET/PREFIX/ [/mnt/oss] ...]
                                              start a session (its sandbox so made) and make it current
%scalebox use NAME|SANDBOX_ID [--as NAME]     switch to a session, or attach to a sandbox by id
%scalebox list [--all]                        the sessions here (--all: every session on the server)
%scalebox info [NAME]                         sandbox id, state, time left, packages, files
%scalebox status [NAME]                       the same as a panel with Pause, Resume, Extend and Kill buttons
%scalebox close [NAME | --all] [--keep]       kill the session's sandbox (--keep: only forget it here;
                                              --all lets go of sandboxes attached with `use`, unkilled)
%scalebox keep [on|off]                       keep the sandbox when {exit} (default: it is killed)
%scalebox pause [NAME]                        pause the sandbox (files and variables are kept)
%scalebox resume [NAME]                       resume it (running a cell also does)
%scalebox timeout 30m [NAME]                  let the sandbox live 30 more minutes (s, m, h)
%scalebox restart [--language L]              a fresh context in the same sandbox (its variables are gone)
%scalebox upload LOCAL [REMOTE]               copy a file or folder into the sandbox (default /workspace/NAME)
%scalebox download REMOTE [LOCAL]             copy a file or folder out of the sandbox (LOCAL/: into that folder)
%scalebox ls [PATH]                           list a folder in the sandbox (relative paths: from /workspace)
%scalebox pip install PKG ... | install PKG ...   install packages for the session's language, in it only
%scalebox env [K=V ...] [--unset K]           environment for the session's cells and commands
%scalebox run CMD                             run a shell command in the sandbox
%scalebox help                                this text
"""


#: Levels of folders a folder download goes down.
DOWNLOAD_DEPTH = 32


def _remote(path: str) -> str:
    """A sandbox path of a file command: relative ones are from /workspace, where the session's cells run (the one
    rule of every %scalebox file command)."""
    return posixpath.normpath(path if path.startswith("/") else posixpath.join(WORKSPACE, path))


def _below(local: Path, remote: str, path: str) -> Path:
    """Where the sandbox file `path`, inside the folder `remote`, goes below `local`; SubcommandError for a path
    the sandbox made up to climb out (`..`, another folder)."""
    rel = posixpath.relpath(posixpath.normpath(path), remote)
    parts = rel.split("/")
    if rel.startswith("/") or ".." in parts or "." in parts or not path.startswith(remote.rstrip("/") + "/"):
        raise SubcommandError(f"the sandbox listed {path!r} inside {remote}: not downloading it")
    target = local.joinpath(*parts)
    if not target.resolve().is_relative_to(local.resolve()):
        raise SubcommandError(f"{target} would land outside {local} (a symlink there?): not downloading {path!r}")
    return target


class _HelpShown(Exception):
    """`--help` of a subcommand: its help text, to show instead of running it."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise SubcommandError(f"{message}\n{self.format_usage().strip()}")

    def print_help(self, file: Any = None) -> None:  # argparse's -h/--help: shown by the caller, no exit
        raise _HelpShown(self.format_help().rstrip())


def parser(prog: str, *, add_help: bool = True) -> argparse.ArgumentParser:
    """An argument parser whose errors are SubcommandErrors with the usage line; `-h`/`--help` shows its help."""
    return _Parser(prog=prog, add_help=add_help)


def cell_parser() -> argparse.ArgumentParser:
    """The options of a `%%scalebox` cell."""
    cell = parser("%%scalebox", add_help=False)
    cell.add_argument("--language", "-l", default=None)
    cell.add_argument("--session", "-s", default=None)
    cell.add_argument("--timeout", "-t", type=float, default=None, help="seconds before the cell is interrupted")
    cell.add_argument("--env", "-e", action="append", default=[], metavar="K=V")
    cell.add_argument("-i", dest="inputs", action="extend", nargs="+", default=[], metavar="VAR")
    cell.add_argument("-o", dest="outputs", action="extend", nargs="+", default=[], metavar="VAR")
    cell.add_argument("--unsafe-pickle", action="store_true", help="-o may return pickles (runs sandbox code here)")
    return cell


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SubcommandError(f"expected KEY=VALUE, got {pair!r}")
        env[key.strip()] = value
    return env


def _mount(values: list[str]) -> ObjectStorage:
    """`--mount URI [MOUNT_POINT]`: a bucket whose keys come from the AWS variables (never typed in a cell)."""
    if len(values) > 2:
        raise SubcommandError(f"--mount takes a uri and a mount point, not {len(values)} values: {' '.join(values)}")
    if not values[0].startswith(("s3://", "oss://", "cos://")):
        raise SubcommandError(f"--mount wants a bucket uri like s3://bucket/prefix/, not {values[0]!r}")
    return ObjectStorage(uri=values[0], mount_point=values[1] if len(values) == 2 else DEFAULT_MOUNT_POINT)


def seconds(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise SubcommandError(str(exc)) from None


def _clock(moment: Any) -> str:
    return moment.astimezone().strftime("%H:%M:%S") if moment else "unknown"


class Commands:
    """`cmd_<name>(args)` for each `%scalebox <name>`, against a door's sessions and output."""

    def __init__(self, sessions: Sessions, out: Output, help_text: str) -> None:
        self.sessions = sessions
        self.out = out
        self.help_text = help_text

    async def run(self, line: str) -> None:
        """Carry out one `%scalebox` line (without the `%scalebox`)."""
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise SubcommandError(f"%scalebox: {exc}") from None
        if not words or words[0] in ("-h", "--help"):
            return await self.cmd_help([])
        name, args = words[0].lower(), words[1:]
        if name == "run":  # the command goes to the sandbox's shell as typed
            args = [line.strip()[len(words[0]) :].strip()]
        handler: Callable[[list[str]], Awaitable[None]] | None = getattr(self, f"cmd_{name.replace('-', '_')}", None)
        if handler is None:
            raise SubcommandError(f"%scalebox: unknown subcommand {name!r} (%scalebox help lists them)")
        try:
            await handler(args)
        except _HelpShown as shown:
            self.say(str(shown))

    def say(self, text: str) -> None:
        say(self.out, text)

    async def _session(self, name: str | None = None) -> tuple[NamedSession, SandboxSession]:
        """A named session (the current one by default), its sandbox opened if it was not yet."""
        entry = self.sessions.entry() if name is None else self.sessions.find(name)
        if entry is None:
            raise SubcommandError(f"no session named {name!r}; %scalebox list shows them")
        return entry, await self.sessions.open(entry, self.out)

    async def cmd_help(self, args: list[str]) -> None:
        self.say(self.help_text)

    # ------------------------------------------------------------------------------------------ sessions

    async def cmd_new(self, args: list[str]) -> None:
        new = parser("%scalebox new")
        new.add_argument("name", nargs="?")
        new.add_argument("--language", "-l", default=self.sessions.language)
        new.add_argument("--timeout", "-t", default=None)
        new.add_argument("--keep", action="store_true")
        new.add_argument("--template", default=None, help="the sandbox's template")
        new.add_argument("--cpu", type=int, default=None, metavar="N", help="CPUs of the sandbox")
        new.add_argument("--memory", type=int, default=None, metavar="MiB", help="memory of the sandbox")
        new.add_argument("--no-internet", action="store_true", help="no internet access in the sandbox")
        new.add_argument("--env", "-e", action="append", default=[], metavar="K=V", help="the sandbox's environment")
        new.add_argument(
            "--mount",
            action="append",
            nargs="+",
            default=[],
            metavar="URI [MOUNT_POINT]",
            help="mount a bucket prefix (keys from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)",
        )
        opts = new.parse_args(args)
        named = self.sessions.named
        name = opts.name or next(f"session{i}" for i in range(1, 10_000) if f"session{i}" not in named)
        existing = named.get(name)
        if existing is not None and existing.session is not None:
            raise SubcommandError(f"session {name!r} exists; `%scalebox use {name}` switches to it, close it to renew")
        timeout = seconds(opts.timeout) if opts.timeout else None
        entry = self.sessions.entry(name)
        entry.language = canonical_language(opts.language)
        entry.timeout = timeout
        self.sessions.set_keep(entry, opts.keep)
        create: dict[str, Any] = {"template": opts.template, "cpu_count": opts.cpu, "memory_mb": opts.memory}
        create = {k: v for k, v in create.items() if v is not None}
        if opts.no_internet:
            create["allow_internet_access"] = False
        if opts.env:
            create["envs"] = parse_env(opts.env)
        if opts.mount:
            create["object_storage"] = [_mount(values) for values in opts.mount]
        entry.create = create
        try:
            session = await self.sessions.open(entry, self.out, entry.language)
        except BaseException:  # no language of that name, say: nothing of this command is left behind
            made, entry.session = entry.session, None
            if existing is None:
                self.sessions.named.pop(name, None)
            else:
                entry.session_id = None
            if made is not None:
                with contextlib.suppress(Exception):  # only a sandbox this command made; one it attached to lives on
                    await made.close(kill=made.attach in (Attach.CREATED, Attach.REPLACED))
            raise
        self.sessions.current = name
        self.say(f"Session {name}: sandbox {session.session_id} ({entry.language}); it is now the current session.")

    async def cmd_use(self, args: list[str]) -> None:
        use = parser("%scalebox use")
        use.add_argument("target", help="a session name or a sandbox id")
        use.add_argument("--as", dest="alias", default=None)
        opts = use.parse_args(args)
        entry = self.sessions.find(opts.target)
        if entry is not None:
            self.sessions.current = entry.name
            self.say(f"Using session {entry.name} ({entry.sandbox_id or 'no sandbox yet'}).")
            return
        if not self.sessions.looks_like_id(opts.target):
            raise SubcommandError(f"no session named {opts.target!r}, and it does not look like a sandbox id")
        entry = self.sessions.entry(opts.alias or opts.target)
        entry.session_id = opts.target
        entry.keep = entry.attached = True  # someone else's sandbox: never killed at exit, nor by close --all
        try:
            session = await self.sessions.open(entry, self.out, replace_missing=False)
        except BaseException:
            self.sessions.named.pop(entry.name, None)
            raise
        self.sessions.current = entry.name
        how = "resumed" if session.attach is Attach.RESUMED else "attached"
        self.say(f"Using session {entry.name}: sandbox {session.session_id} ({how}).")

    async def cmd_list(self, args: list[str]) -> None:
        listing = parser("%scalebox list")
        listing.add_argument("--all", action="store_true")
        if listing.parse_args(args).all:
            found = await Session.alist(config=self.sessions.config)
            if not found:
                self.say("No sessions on the server.")
            for item in found:
                left = duration(item.remaining_time) if item.remaining_time is not None else "?"
                self.say(f"{item.session_id}  {item.status:8}  {left} left")
            return
        if not self.sessions.named:
            self.say("No sessions yet: the first cell starts one (or %scalebox new NAME).")
        for name, entry in self.sessions.named.items():
            marker = "*" if name == self.sessions.current else " "
            self.say(f"{marker} {name:12} {entry.sandbox_id or '(no sandbox yet)'}  {entry.language}")

    async def cmd_info(self, args: list[str]) -> None:
        entry, session = await self._session(args[0] if args else None)
        self.say(info_text(await self._rows(entry, session)))

    async def _rows(self, entry: NamedSession, session: SandboxSession) -> list[tuple[str, str]]:
        rows = info_rows(entry.name, session, await session.info(), entry.envs)
        rows.append(("kept at exit", "yes" if entry.keep else "no"))
        rows += self.sessions.lifetime_rows(entry, session)
        channel = self.sessions.channel_of(entry)
        if channel:
            rows.append(("channel", channel))
        return rows

    async def cmd_close(self, args: list[str]) -> None:
        close = parser("%scalebox close")
        close.add_argument("name", nargs="?")
        close.add_argument("--keep", action="store_true", help="only forget the session here; the sandbox lives on")
        close.add_argument("--all", action="store_true", help="close every session of this notebook or shell")
        opts = close.parse_args(args)
        if opts.all:
            if opts.name:
                raise SubcommandError("%scalebox close --all takes no session name")
            open_ = [named for named in list(self.sessions.named.values()) if named.sandbox_id]
            # A sandbox attached to with `use` is someone else's: let go, not killed.
            theirs = [named for named in open_ if opts.keep or named.attached]
            names = ", ".join(f"{e.name} ({e.sandbox_id})" for e in open_ if e not in theirs) or "none were open"
            for named in open_:
                await self.sessions.close(named, kill=named not in theirs)
            if opts.keep:
                names = ", ".join(f"{e.name} ({e.sandbox_id})" for e in theirs) or "none were open"
                self.say(f"Sessions forgotten (their sandboxes keep running): {names}.")
                return
            self.say(f"Sessions closed: {names}.")
            if theirs:
                kept = ", ".join(f"{e.name} ({e.sandbox_id})" for e in theirs)
                self.say(f"Attached, not made here, so forgotten and left running: {kept}.")
            return
        entry = self.sessions.find(opts.name or self.sessions.current)
        if entry is None:
            raise SubcommandError(f"no session named {opts.name or self.sessions.current!r}")
        sandbox, was_current = entry.sandbox_id, entry.name == self.sessions.current
        await self.sessions.close(entry, kill=not opts.keep)
        verb = "forgotten (the sandbox keeps running)" if opts.keep else "closed"
        self.say(f"Session {entry.name} {verb}" + (f": sandbox {sandbox}." if sandbox else "."))
        if was_current and self.sessions.current != entry.name:
            self.say(f"The current session is now {self.sessions.current}.")

    async def cmd_keep(self, args: list[str]) -> None:
        if len(args) > 1 or (args and args[0].lower() not in ("on", "off")):
            raise SubcommandError("usage: %scalebox keep [on|off]")
        entry = self.sessions.entry()
        self.sessions.set_keep(entry, not args or args[0].lower() == "on")
        what = f"sandbox {entry.sandbox_id}" if entry.sandbox_id else f"sandbox of session {entry.name}"
        self.say(f"The {what} will be {'kept' if entry.keep else 'killed'} when {self.sessions.exit_event}.")

    # ------------------------------------------------------------------------------------------ lifetime

    async def cmd_pause(self, args: list[str]) -> None:
        entry, session = await self._session(args[0] if args else None)
        await session.pause()
        entry.paused = True
        self.say(f"Sandbox {session.session_id} paused; its state is kept. %scalebox resume (or any cell) resumes it.")

    async def cmd_resume(self, args: list[str]) -> None:
        entry, session = await self._session(args[0] if args else None)
        await session.resume()
        entry.paused = False
        self.say(f"Sandbox {session.session_id} is running.")

    async def cmd_timeout(self, args: list[str]) -> None:
        if not 1 <= len(args) <= 2:
            raise SubcommandError("usage: %scalebox timeout DURATION [NAME]   (e.g. 30m, 1h, 90s)")
        lifetime = seconds(args[0])
        entry, session = await self._session(args[1] if len(args) > 1 else None)
        info = await session.keep_alive(lifetime)
        entry.timeout = lifetime
        self.say(f"Sandbox {session.session_id} now lives {time_left(info)} more (until {_clock(info.end_at)}).")

    async def cmd_restart(self, args: list[str]) -> None:
        restart = parser("%scalebox restart")
        restart.add_argument("--language", "-l", default=None)
        opts = restart.parse_args(args)
        entry, session = await self._session()
        language = canonical_language(opts.language or entry.language)
        await session.restart(language)
        self.say(f"Started a fresh {language} context in sandbox {session.session_id}; its variables are gone.")

    # ------------------------------------------------------------------------------------------ files

    async def cmd_upload(self, args: list[str]) -> None:
        if not 1 <= len(args) <= 2:
            raise SubcommandError("usage: %scalebox upload LOCAL [REMOTE]")
        local = Path(args[0]).expanduser()
        if not local.exists():
            raise SubcommandError(f"no local file or folder {str(local)!r} (this runs in {Path.cwd()})")
        remote = _remote(args[1]) if len(args) > 1 else posixpath.join(WORKSPACE, local.name)
        if len(args) > 1 and args[1].endswith("/"):  # into that folder
            remote = posixpath.join(remote, local.name)
        if local.is_dir():
            files = {
                posixpath.join(remote, p.relative_to(local).as_posix()): p.read_bytes()
                for p in sorted(local.rglob("*"))
                if p.is_file()
            }
        else:
            files = {remote: local.read_bytes()}
        _entry, session = await self._session()
        written = await self.out.progress(lambda cb: session.upload(files, on_progress=cb), f"Uploading {local.name}")
        same = len(files) - len(written)
        note = f" ({same} unchanged, not sent again)" if same else ""
        total = sum(len(v) for v in files.values())
        self.say(f"Uploaded {len(written)} file(s), {total} bytes, to {remote}{note}.")

    async def cmd_download(self, args: list[str]) -> None:
        if not 1 <= len(args) <= 2:
            raise SubcommandError("usage: %scalebox download REMOTE [LOCAL]")
        remote = _remote(args[0])
        name = posixpath.basename(remote.rstrip("/")) or "root"
        given = args[1] if len(args) > 1 else None
        local = Path(given).expanduser() if given else Path(name)
        if given is not None and (given.endswith(("/", os.sep)) or local.is_dir()):  # into that folder
            local = local / name
        _entry, session = await self._session()
        files = session.sandbox.files
        info = await files.get_info(remote)
        if str(info.type) == "dir":
            entries = await files.list(remote, depth=DOWNLOAD_DEPTH)
            # The sandbox names the files: only paths below the folder, each written below `local`.
            wanted = {e.path: _below(local, remote, e.path) for e in entries if str(e.type) == "file"}
            data = await self.out.progress(
                lambda cb: session.download(list(wanted), on_progress=cb), f"Downloading {name}"
            )
            total = 0
            for path, content in data.items():
                target = wanted[path]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
                total += len(content)
            local.mkdir(parents=True, exist_ok=True)  # an empty folder is downloaded too
            self.say(f"Downloaded {remote}/ ({len(data)} file(s), {total} bytes) to {local}/.")
            return
        fetched = await self.out.progress(lambda cb: session.download([remote], on_progress=cb), f"Downloading {name}")
        content = fetched[remote]
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(content)
        self.say(f"Downloaded {remote} ({len(content)} bytes) to {local}.")

    async def cmd_ls(self, args: list[str]) -> None:
        path = _remote(args[0]) if args else WORKSPACE
        _entry, session = await self._session()
        entries = await session.sandbox.files.list(path)
        if not entries:
            self.say(f"{path} is empty.")
        for item in sorted(entries, key=lambda e: (str(e.type) != "dir", e.name)):
            kind = "d" if str(item.type) == "dir" else "-"
            self.say(f"{kind} {item.size:>10}  {item.name}{'/' if kind == 'd' else ''}")

    # ------------------------------------------------------------------------------------------ packages, env, commands

    async def cmd_pip(self, args: list[str]) -> None:
        if not args or args[0] != "install":
            raise SubcommandError("usage: %scalebox pip install PACKAGE ...")
        await self._install(args[1:], "python")

    async def cmd_install(self, args: list[str]) -> None:
        await self._install(args, None)

    async def _install(self, packages: list[str], language: str | None) -> None:
        if not packages:
            raise SubcommandError("name at least one package")
        entry, session = await self._session()
        lang = language or entry.language
        done = await self.out.progress(
            lambda cb: session.install(packages, lang, on_progress=cb), f"Installing {' '.join(packages)}"
        )
        skipped = [p for p in packages if p not in done]
        if done:
            said = f" ({session.install_summary})" if session.install_summary else ""
            self.say(f"Installed {' '.join(done)} in sandbox {session.session_id} ({lang}){said}.")
        if skipped:
            self.say(f"Already installed in this session: {' '.join(skipped)}.")

    async def cmd_env(self, args: list[str]) -> None:
        entry = self.sessions.entry()
        unset = False
        for word in args:
            if word == "--unset":
                unset = True
            elif unset:
                entry.envs.pop(word, None)
                unset = False
            else:
                entry.envs.update(parse_env([word]))
        if args:
            self.say(f"Session {entry.name} env: {', '.join(sorted(entry.envs)) or 'empty'}.")
        elif not entry.envs:
            self.say(f"No environment variables set for session {entry.name}.")
        for key in sorted(entry.envs) if not args else ():
            self.say(f"{key}={entry.envs[key]}")

    async def cmd_run(self, args: list[str]) -> None:
        command = " ".join(args).strip()
        if not command:
            raise SubcommandError("usage: %scalebox run COMMAND")
        entry, session = await self._session()
        await session._call(
            lambda: session.sandbox.commands.run(
                command,
                cwd=WORKSPACE,
                envs=entry.envs or None,
                on_stdout=streamer(self.out, "stdout"),
                on_stderr=streamer(self.out, "stderr"),
                timeout=None,
            )
        )

    # ------------------------------------------------------------------------------------------ status

    async def cmd_status(self, args: list[str]) -> None:
        entry, session = await self._session(args[0] if args else None)
        rows = await self._rows(entry, session)
        if not self.out.widgets:
            self.say(info_text(rows))
            self.say("(pause, resume, timeout 30m and close are %scalebox subcommands)")
            return

        async def pause() -> str:
            await session.pause()
            entry.paused = True
            return "Paused."

        async def resume() -> str:
            await session.resume()
            entry.paused = False
            return "Resumed."

        async def extend() -> str:
            info = await session.keep_alive(max(600, entry.timeout or 0))
            return f"Extended: {time_left(info)} left."

        killed = False

        async def kill() -> str:
            nonlocal killed
            killed = True
            if self.sessions.named.get(entry.name) is entry and entry.session is session:
                with contextlib.suppress(SandboxNotFound):
                    await self.sessions.close(entry, kill=True)
            else:  # the session was closed (or renewed) since: kill only the sandbox this panel shows
                with contextlib.suppress(SandboxNotFound):
                    await session.sandbox.kill()
            return f"Sandbox {session.session_id} killed."

        actions: dict[str, Callable[[], Awaitable[str]]] = {
            "Pause": pause,
            "Resume": resume,
            "Extend": extend,
            "Kill": kill,
        }

        async def refresh() -> list[tuple[str, str]]:
            if killed:  # nothing to ask any more: say what happened
                return [("session", entry.name), ("sandbox", session.session_id), ("state", "killed")]
            return await self._rows(entry, session)

        warning = f"Click again to kill sandbox {session.session_id}: its files and variables are lost."
        self.out.panel(
            StatusPanel(rows, refresh, actions, self.sessions.secrets(), confirm={"Kill": warning}, watch=entry.watch)
        )
