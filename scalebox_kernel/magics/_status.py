"""`%scalebox info` and `%scalebox status`: a sandbox described in text, or as a panel with buttons."""

from __future__ import annotations

import html
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ..client import SandboxInfo
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
    rows.append(("contexts", ", ".join(f"{lang} ({cid})" for lang, cid in state.contexts.items()) or "none yet"))
    packages = [f"{p} ({lang})" for lang, names in state.packages.items() for p in names]
    rows.append(("packages", ", ".join(packages) or "none installed"))
    rows.append(("files", ", ".join(sorted(state.files)) or "none uploaded"))
    rows.append(("env", ", ".join(sorted(envs)) or "none set"))
    return rows


def info_text(rows: list[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.rjust(width)}: {value}" for label, value in rows)


def status_panel(
    rows_of: Callable[[], list[tuple[str, str]]],
    actions: dict[str, Callable[[], str]],
) -> Any:
    """An ipywidgets panel: the session's rows, then a button per action; a click runs the action, shows its
    message and refreshes the rows."""
    import ipywidgets as w

    def render() -> str:
        try:
            rows = rows_of()
        except Exception as exc:
            return f"<b>Unavailable</b>: {html.escape(str(exc))}"
        body = "".join(
            f"<tr><th style='text-align:right;padding-right:1em'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
            for k, v in rows
            if k in ("session", "sandbox", "state", "time left", "ends", "template")
        )
        return f"<table>{body}</table>"

    table = w.HTML(render())
    message = w.HTML()

    def refresh() -> None:
        table.value = render()

    def clicked(action: Callable[[], str]) -> Callable[[Any], None]:
        def handler(_button: Any) -> None:
            try:
                message.value = html.escape(action())
            except Exception as exc:
                message.value = f"<span style='color:#b00'>{html.escape(str(exc))}</span>"
            refresh()

        return handler

    buttons = []
    for label, action in [*actions.items(), ("Refresh", lambda: "")]:
        button = w.Button(description=label, layout=w.Layout(width="auto"))
        button.on_click(clicked(action))
        buttons.append(button)
    return w.VBox([table, w.HBox(buttons), message])
