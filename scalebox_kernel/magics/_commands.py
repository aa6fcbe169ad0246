"""The `%scalebox` subcommands (sessions, lifetime, files, packages, env, shell commands, status, help)."""

from __future__ import annotations

import argparse
import contextlib
import posixpath
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from IPython.core.error import UsageError
from IPython.display import display

from ..errors import CommandExitError, SandboxNotFound
from ..session import Attach, SandboxSession, Session, canonical_language
from ._display import Relay, cell_error
from ._sessions import NamedSession, Sessions
from ._status import duration, info_rows, info_text, parse_duration, status_panel, time_left

if TYPE_CHECKING:
    from ._display import ScaleboxCellError

T = TypeVar("T")
WORKSPACE = "/workspace"

HELP = """\
Scalebox magics: run cells in a sandbox (scalebox-local, or the Scalebox cloud with SCALEBOX_API_KEY).

%%scalebox [--language L] [--session NAME] [--timeout S] [--env K=V ...] [-i VAR ...] [-o VAR ...]
    Run the cell in the sandbox; output, plots and errors show here as it runs. -i sends local variables in
    before the cell, -o brings sandbox variables back after it (pickle for Python, JSON for other languages).
%autoscalebox on [options] | off
    Run every following cell in the sandbox (cells starting with % still run here).

%scalebox new [NAME] [--language L] [--timeout 30m] [--keep]   start a session (a sandbox) and make it current
%scalebox use NAME|SANDBOX_ID [--as NAME]     switch to a session, or attach to a sandbox by id
%scalebox list [--all]                        this shell's sessions (--all: every session on the server)
%scalebox info [NAME]                         sandbox id, state, time left, packages, files
%scalebox status [NAME]                       the same as a panel with Pause, Resume, Extend and Kill buttons
%scalebox close [NAME] [--keep]               kill the session's sandbox (--keep: only forget it here)
%scalebox pause [NAME]                        pause the sandbox (files and variables are kept)
%scalebox resume [NAME]                       resume it (a %%scalebox cell also does)
%scalebox timeout 30m [NAME]                  let the sandbox live 30 more minutes (s, m, h)
%scalebox upload LOCAL [REMOTE]               copy a file or folder into the sandbox (default /workspace/NAME)
%scalebox download REMOTE [LOCAL]             copy a file out of the sandbox
%scalebox ls [PATH]                           list a folder in the sandbox (default /workspace)
%scalebox pip install PKG ... | install PKG ...   install packages for the session's language, in it only
%scalebox env [K=V ...] [--unset K]           environment for the session's cells and commands
%scalebox run CMD                             run a shell command in the sandbox
%scalebox help                                this text
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}\n{self.format_usage()}")


def _parser(prog: str) -> _Parser:
    return _Parser(prog=f"%scalebox {prog}", add_help=False)


class SubCommands:
    """`cmd_<name>(args)` for each `%scalebox <name>`; mixed into ScaleboxMagics."""

    if TYPE_CHECKING:
        sessions: Sessions
        widgets: bool

        def run(self, coro: Coroutine[Any, Any, T], relay: Relay | None = None) -> T: ...
        def relay(self, *, show_main_result: bool = True) -> Relay: ...
        async def open_session(
            self, entry: NamedSession, relay: Relay, language: str | None = None
        ) -> SandboxSession: ...
        def secrets(self) -> list[str]: ...

    def _session(self, name: str | None = None) -> tuple[NamedSession, SandboxSession]:
        """A named session (the current one by default), its sandbox opened if it was not yet."""
        if name is not None and self.sessions.find(name) is None:
            raise UsageError(f"no session named {name!r}; %scalebox list shows them")
        entry = self.sessions.find(name) if name else self.sessions.entry()
        assert entry is not None
        relay = self.relay()
        return entry, self.run(self.open_session(entry, relay), relay)

    def cmd_help(self, args: list[str]) -> None:
        print(HELP)

    # ------------------------------------------------------------------------------------------ sessions

    def cmd_new(self, args: list[str]) -> None:
        parser = _parser("new")
        parser.add_argument("name", nargs="?")
        parser.add_argument("--language", "-l", default="python")
        parser.add_argument("--timeout", "-t", default=None)
        parser.add_argument("--keep", action="store_true", help="leave the sandbox running when the shell exits")
        opts = parser.parse_args(args)
        name = opts.name or next(f"session{i}" for i in range(1, 10_000) if f"session{i}" not in self.sessions.named)
        existing = self.sessions.named.get(name)
        if existing is not None and existing.session is not None:
            raise UsageError(f"session {name!r} exists; `%scalebox use {name}` switches to it, close it first to renew")
        entry = self.sessions.entry(name)
        entry.language = canonical_language(opts.language)
        entry.keep = opts.keep
        entry.timeout = _seconds(opts.timeout) if opts.timeout else None
        relay = self.relay()
        session = self.run(self.open_session(entry, relay, entry.language), relay)
        self.sessions.current = name
        print(f"Session {name}: sandbox {session.session_id} ({entry.language}); it is now the current session.")

    def cmd_use(self, args: list[str]) -> None:
        parser = _parser("use")
        parser.add_argument("target", help="a session name or a sandbox id")
        parser.add_argument("--as", dest="alias", default=None)
        opts = parser.parse_args(args)
        entry = self.sessions.find(opts.target)
        if entry is not None:
            self.sessions.current = entry.name
            where = entry.session.session_id if entry.session else "no sandbox yet"
            print(f"Using session {entry.name} ({where}).")
            return
        if not self.sessions.looks_like_id(opts.target):
            raise UsageError(f"no session named {opts.target!r}, and it does not look like a sandbox id")
        entry = self.sessions.entry(opts.alias or opts.target)
        entry.session_id = opts.target
        entry.keep = True  # someone else's sandbox: never killed at exit
        relay = self.relay()
        try:
            session = self.run(self.sessions.open(entry, relay.on_progress, replace_missing=False), relay)
        except BaseException:
            self.sessions.named.pop(entry.name, None)
            raise
        self.sessions.current = entry.name
        how = "resumed" if session.attach is Attach.RESUMED else "attached"
        print(f"Using session {entry.name}: sandbox {session.session_id} ({how}).")

    def cmd_list(self, args: list[str]) -> None:
        parser = _parser("list")
        parser.add_argument("--all", action="store_true")
        opts = parser.parse_args(args)
        if opts.all:
            found = self.run(Session.alist(config=self.sessions.config))
            if not found:
                print("No sessions on the server.")
            for item in found:
                left = duration(item.remaining_time) if item.remaining_time is not None else "?"
                print(f"{item.session_id}  {item.status:8}  {left} left")
            return
        if not self.sessions.named:
            print("No sessions yet: the first %%scalebox cell starts one (or %scalebox new NAME).")
            return
        for name, entry in self.sessions.named.items():
            marker = "*" if name == self.sessions.current else " "
            sandbox = entry.session.session_id if entry.session else (entry.session_id or "(no sandbox yet)")
            print(f"{marker} {name:12} {sandbox}  {entry.language}")

    def cmd_info(self, args: list[str]) -> None:
        entry, session = self._session(args[0] if args else None)
        info = self.run(session.info())
        print(info_text(info_rows(entry.name, session, info, entry.envs)))

    def cmd_close(self, args: list[str]) -> None:
        parser = _parser("close")
        parser.add_argument("name", nargs="?")
        parser.add_argument("--keep", action="store_true", help="only forget the session here; the sandbox lives on")
        opts = parser.parse_args(args)
        entry = self.sessions.find(opts.name) if opts.name else self.sessions.named.get(self.sessions.current)
        if entry is None:
            raise UsageError(f"no session named {opts.name or self.sessions.current!r}")
        sandbox = entry.session.session_id if entry.session else entry.session_id
        self.run(self.sessions.close(entry, kill=not opts.keep))
        verb = "forgotten (the sandbox keeps running)" if opts.keep else "closed"
        print(f"Session {entry.name} {verb}" + (f": sandbox {sandbox}." if sandbox else "."))

    # ------------------------------------------------------------------------------------------ lifetime

    def cmd_pause(self, args: list[str]) -> None:
        _entry, session = self._session(args[0] if args else None)
        self.run(session.pause())
        print(f"Sandbox {session.session_id} paused; its state is kept. %scalebox resume (or any cell) resumes it.")

    def cmd_resume(self, args: list[str]) -> None:
        _entry, session = self._session(args[0] if args else None)
        self.run(session.resume())
        print(f"Sandbox {session.session_id} is running.")

    def cmd_timeout(self, args: list[str]) -> None:
        if not args:
            raise UsageError("usage: %scalebox timeout DURATION [NAME]   (e.g. 30m, 1h, 90s)")
        seconds = _seconds(args[0])
        entry, session = self._session(args[1] if len(args) > 1 else None)
        info = self.run(session.keep_alive(seconds))
        entry.timeout = seconds
        print(f"Sandbox {session.session_id} now lives {time_left(info)} more (until {_clock(info.end_at)}).")

    # ------------------------------------------------------------------------------------------ files

    def cmd_upload(self, args: list[str]) -> None:
        if not 1 <= len(args) <= 2:
            raise UsageError("usage: %scalebox upload LOCAL [REMOTE]")
        local = Path(args[0]).expanduser()
        if not local.exists():
            raise UsageError(f"no local file or folder {str(local)!r}")
        remote = args[1] if len(args) > 1 else posixpath.join(WORKSPACE, local.name)
        remote = remote if remote.startswith("/") else posixpath.join(WORKSPACE, remote)
        if local.is_dir():
            files = {
                posixpath.join(remote, p.relative_to(local).as_posix()): p.read_bytes()
                for p in sorted(local.rglob("*"))
                if p.is_file()
            }
        else:
            files = {remote: local.read_bytes()}
        _entry, session = self._session()
        relay = self.relay()
        written = self.run(session.upload(files, on_progress=relay.on_progress), relay)
        total = sum(len(v) for v in files.values())
        same = len(files) - len(written)
        note = f" ({same} unchanged, not sent again)" if same else ""
        print(f"Uploaded {len(written)} file(s), {total} bytes, to {remote}{note}.")

    def cmd_download(self, args: list[str]) -> None:
        if not 1 <= len(args) <= 2:
            raise UsageError("usage: %scalebox download REMOTE [LOCAL]")
        remote = args[0] if args[0].startswith("/") else posixpath.join(WORKSPACE, args[0])
        local = Path(args[1]).expanduser() if len(args) > 1 else Path(posixpath.basename(remote))
        if local.is_dir():
            local = local / posixpath.basename(remote)
        _entry, session = self._session()
        data = self.run(session.download([remote]))[remote]
        local.write_bytes(data)
        print(f"Downloaded {remote} ({len(data)} bytes) to {local}.")

    def cmd_ls(self, args: list[str]) -> None:
        path = args[0] if args else WORKSPACE
        _entry, session = self._session()
        entries = self.run(session.sandbox.files.list(path))
        if not entries:
            print(f"{path} is empty.")
        for item in sorted(entries, key=lambda e: (str(e.type) != "dir", e.name)):
            kind = "d" if str(item.type) == "dir" else "-"
            print(f"{kind} {item.size:>10}  {item.name}{'/' if kind == 'd' else ''}")

    # ------------------------------------------------------------------------------------------ packages, env, commands

    def cmd_pip(self, args: list[str]) -> None:
        if not args or args[0] != "install":
            raise UsageError("usage: %scalebox pip install PACKAGE ...")
        self._install(args[1:], "python")

    def cmd_install(self, args: list[str]) -> None:
        self._install(args, None)

    def _install(self, packages: list[str], language: str | None) -> None:
        if not packages:
            raise UsageError("name at least one package")
        entry, session = self._session()
        lang = language or entry.language
        relay = self.relay()
        done = self.run(session.install(packages, lang, on_progress=relay.on_progress), relay)
        skipped = [p for p in packages if p not in done]
        if done:
            print(f"Installed {' '.join(done)} in sandbox {session.session_id} ({lang}).")
        if skipped:
            print(f"Already installed in this session: {' '.join(skipped)}.")

    def cmd_env(self, args: list[str]) -> None:
        entry = self.sessions.entry()
        unset = False
        for word in args:
            if word == "--unset":
                unset = True
            elif unset:
                entry.envs.pop(word, None)
                unset = False
            else:
                key, sep, value = word.partition("=")
                if not sep or not key:
                    raise UsageError(f"expected KEY=VALUE, got {word!r}")
                entry.envs[key] = value
        if not args:
            if not entry.envs:
                print(f"No environment variables set for session {entry.name}.")
            for key in sorted(entry.envs):
                print(f"{key}={entry.envs[key]}")
        else:
            print(f"Session {entry.name} env: {', '.join(sorted(entry.envs)) or 'empty'}.")

    def cmd_run(self, args: list[str]) -> None:
        command = " ".join(args).strip()
        if not command:
            raise UsageError("usage: %scalebox run COMMAND")
        entry, session = self._session()
        relay = self.relay()

        async def job() -> Any:
            return await session._call(
                lambda: session.sandbox.commands.run(
                    command,
                    cwd=WORKSPACE,
                    envs=entry.envs or None,
                    on_stdout=relay.on_stdout,
                    on_stderr=relay.on_stderr,
                    timeout=None,
                )
            )

        try:
            self.run(job(), relay)
        except KeyboardInterrupt:
            raise KeyboardInterrupt("the command was stopped") from None
        except CommandExitError as exc:
            raise _command_failed(exc) from None

    # ------------------------------------------------------------------------------------------ status

    def cmd_status(self, args: list[str]) -> None:
        entry, session = self._session(args[0] if args else None)

        def rows() -> list[tuple[str, str]]:
            return info_rows(entry.name, session, self.run(session.info()), entry.envs)

        if not self.widgets:
            print(info_text(rows()))
            print("(pause, resume, timeout 30m and close are %scalebox subcommands)")
            return

        def pause() -> str:
            self.run(session.pause())
            return "Paused."

        def resume() -> str:
            self.run(session.resume())
            return "Resumed."

        def extend() -> str:
            minutes = max(600, entry.timeout or 0)
            info = self.run(session.keep_alive(minutes))
            return f"Extended: {time_left(info)} left."

        def kill() -> str:
            with contextlib.suppress(SandboxNotFound):
                self.run(self.sessions.close(entry, kill=True))
            return f"Sandbox {session.session_id} killed."

        display(status_panel(rows, {"Pause": pause, "Resume": resume, "Extend": extend, "Kill": kill}))


def _seconds(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _clock(moment: Any) -> str:
    return moment.astimezone().strftime("%H:%M:%S") if moment else "unknown"


def _command_failed(exc: CommandExitError) -> ScaleboxCellError:
    return cell_error("CommandExitError", f"the command exited with code {exc.exit_code}")
