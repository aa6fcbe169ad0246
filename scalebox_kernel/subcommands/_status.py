"""`%scalebox info` and `%scalebox status`: a sandbox described in text, or as a panel with buttons."""

from __future__ import annotations

import html
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..client import SandboxInfo
from ..errors import redact
from ..session import SandboxSession


def duration(seconds: float) -> str:
    """`1h 02m`, `4m 05s`, `12s`."""
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def parse_duration(text: str) -> int:
    """Seconds in `90`, `90s`, `30m`, `1h`, `1h30m`; ValueError otherwise."""
    text = text.strip().lower()
    if text.isdigit():
        return int(text)
    total, number = 0, ""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    for char in text:
        if char.isdigit():
            number += char
        elif char in units and number:
            total += int(number) * units[char]
            number = ""
        else:
            raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 30m, 1h)")
    if number or total <= 0:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 30m, 1h)")
    return total


def time_left(info: SandboxInfo) -> str:
    if info.end_at is None:
        return "unknown"
    return duration((info.end_at - datetime.now(UTC)).total_seconds())


def _clock(moment: datetime | None) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else "unknown"


def info_rows(name: str, session: SandboxSession, info: SandboxInfo, envs: dict[str, str]) -> list[tuple[str, str]]:
    """(label, value) pairs describing a session and its sandbox."""
    state = session.state
    rows = [
        ("session", name),
        ("sandbox", session.session_id),
        ("state", info.state),
        ("template", info.template_id or "unknown"),
        ("started", _clock(info.started_at)),
        ("ends", _clock(info.end_at)),
        ("time left", time_left(info)),
        ("timeout", f"{info.timeout} s" if info.timeout is not None else "unknown"),
        ("resources", f"{info.cpu_count} CPU, {info.memory_mb} MiB"),
    ]
    if info.isolation is not None:
        rows.append(("isolation", ", ".join(f"{k}={v}" for k, v in info.isolation.items()) or "none"))
    if isinstance(info.raw.get("warm"), bool):
        rows.append(("warm start", "yes: taken from the server's warm pool" if info.raw["warm"] else "no"))
    if info.object_storage:
        rows.append(("mounts", ", ".join(_mount(item) for item in info.object_storage)))
    rows.append(("contexts", ", ".join(f"{lang} ({cid})" for lang, cid in state.contexts.items()) or "none yet"))
    packages = [f"{p} ({lang})" for lang, names in state.packages.items() for p in names]
    rows.append(("packages", ", ".join(packages) or "none installed"))
    rows.append(("files", ", ".join(sorted(state.files)) or "none uploaded"))
    rows.append(("env", ", ".join(sorted(envs)) or "none set"))
    return rows


def _mount(item: dict[str, Any]) -> str:
    """One object storage mount: where it is, what it is, and whether it is mounted (never a key)."""
    text = f"{item.get('uri', '?')} at {item.get('mount_point', '?')}"
    if item.get("mounted") is False:
        text += f" (not mounted: {item.get('problem') or 'unknown why'})"
    return text


def info_text(rows: list[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.rjust(width)}: {value}" for label, value in rows)


Rows = list[tuple[str, str]]
#: Runs a coroutine on the loop that owns the session and calls back with its result or exception (on a thread
#: that may touch widgets). Each door has its own: the magics run it at once, the kernel in the background.
Runner = Callable[[Coroutine[Any, Any, Any], Callable[[Any], None]], None]


@dataclass
class StatusPanel:
    """What `%scalebox status` shows: the session's rows now, how to read them again, and its buttons."""

    rows: Rows
    refresh: Callable[[], Awaitable[Rows]]
    actions: dict[str, Callable[[], Awaitable[str]]]
    secrets: list[str] = field(default_factory=list)
    #: Actions that act only on a second click (within CONFIRM_WINDOW s), and what the first click says.
    confirm: dict[str, str] = field(default_factory=dict)
    #: Subscribes a callback to the session's pause and resume (a cell resuming it), to read the rows again.
    watch: Callable[[Callable[[], None]], None] | None = None


#: Seconds a first click on a confirmed action (Kill) stays armed.
CONFIRM_WINDOW = 10.0


_PANEL_ROWS = ("session", "sandbox", "state", "time left", "ends", "template")


def _table(rows: Rows | BaseException) -> str:
    if isinstance(rows, BaseException):
        return f"<b>Unavailable</b>: {html.escape(str(rows))}"
    body = "".join(
        f"<tr><th style='text-align:right;padding-right:1em'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
        for k, v in rows
        if k in _PANEL_ROWS
    )
    return f"<table>{body}</table>"


def status_widget(panel: StatusPanel, runner: Runner) -> Any:
    """An ipywidgets panel: the session's rows, then a button per action; a click runs the action through
    `runner`, shows its message and refreshes the rows."""
    import ipywidgets as w

    table = w.HTML(_table(panel.rows))
    message = w.HTML()

    async def click(action: Callable[[], Awaitable[str]]) -> tuple[str, Rows | BaseException]:
        said = await action()
        try:
            return said, await panel.refresh()
        except Exception as exc:
            return said, exc

    def done(outcome: Any) -> None:
        if isinstance(outcome, BaseException):
            text = redact(str(outcome) or type(outcome).__name__, panel.secrets)
            message.value = f"<span style='color:#b00'>{html.escape(text)}</span>"
            return
        said, rows = outcome
        message.value = html.escape(said)
        table.value = _table(rows)

    armed: dict[str, float] = {}  # a confirmed action's label -> when its first click came

    def clicked(label: str, action: Callable[[], Awaitable[str]], button: Any) -> Callable[[Any], None]:
        def on_click(_button: Any) -> None:
            first = armed.pop(label, None)
            if label in panel.confirm and (first is None or time.monotonic() - first > CONFIRM_WINDOW):
                armed[label] = time.monotonic()
                message.value = f"<span style='color:#b00'>{html.escape(panel.confirm[label])}</span>"
                button.description = f"Confirm {label.lower()}"
                return
            button.description = label
            runner(click(action), done)

        return on_click

    async def nothing() -> str:
        return ""

    buttons = []
    for label, action in [*panel.actions.items(), ("Refresh", nothing)]:
        button = w.Button(description=label, layout=w.Layout(width="auto"))
        button.on_click(clicked(label, action, button))
        buttons.append(button)

    def refreshed(outcome: Any) -> None:  # a refresh nobody clicked for: a failure of it is not shown
        if not isinstance(outcome, BaseException):
            done(outcome)

    if panel.watch is not None:
        panel.watch(lambda: runner(click(nothing), refreshed))
    return w.VBox([table, w.HBox(buttons), message])
