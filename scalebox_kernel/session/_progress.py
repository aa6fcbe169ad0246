"""Progress stages, timing and insights of a session run (PROTOCOL.md §6.3)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..client.callbacks import call_back

STAGES = ("initializing", "connecting", "uploading", "installing", "executing", "downloading", "completed", "failed")
# The stages whose share of the total appears in `timing["distribution"]`.
MEASURED_STAGES = STAGES[:6]

STAGE_MESSAGES = {
    "initializing": "Initializing session",
    "connecting": "Connecting to sandbox",
    "uploading": "Uploading files",
    "installing": "Installing packages",
    "executing": "Executing code",
    "downloading": "Downloading files",
    "completed": "Execution completed",
    "failed": "Execution failed",
}

# (stage, seconds it must exceed to count as a problem, suggestions) as in the seed SDK's insights.
_THRESHOLDS: dict[str, tuple[float, tuple[str, ...]]] = {
    "uploading": (
        5.0,
        (
            "Upload large inputs once and reuse the session (keep_alive=True) instead of sending them every run.",
            "Compress files before uploading, or fetch them from inside the sandbox.",
        ),
    ),
    "installing": (
        30.0,
        (
            "Reuse the session (keep_alive=True): packages already installed are not installed again.",
            "Use a sandbox template that already has these packages.",
            "Install fewer or lighter packages.",
        ),
    ),
    "executing": (
        60.0,
        (
            "Split the work into smaller runs in the same session.",
            "Check the code for slow loops or unnecessary work.",
        ),
    ),
    "connecting": (
        10.0,
        (
            "Reuse the session (keep_alive=True) instead of creating a sandbox for every run.",
            "Use a lighter sandbox template.",
        ),
    ),
    "downloading": (
        10.0,
        (
            "Download only the files you need.",
            "Compress results inside the sandbox before downloading them.",
        ),
    ),
}


@dataclass
class ProgressInfo:
    """One progress report: the stage, its percent (0-100 within the stage) and elapsed times."""

    stage: str
    percent: float
    message: str
    stage_started_at: float  # time.time() when the stage began
    stage_elapsed_ms: float
    total_elapsed_ms: float
    details: dict[str, Any] | None = None

    def __str__(self) -> str:
        """One line for a person (`on_progress=print`): `[installing  40%] Installing packages (3.2 s)`."""
        return f"[{self.stage} {self.percent:3.0f}%] {self.message} ({self.total_elapsed_ms / 1000:.1f} s)"


ProgressCallback = Callable[[ProgressInfo], Any]


@dataclass
class Tracker:
    """Reports stages to a callback and measures how long each took."""

    on_progress: ProgressCallback | None = None
    started_at: float = field(default_factory=time.time)
    _t0: float = field(default_factory=time.monotonic)
    stage: str | None = None
    _stage_t0: float = 0.0
    _stage_wall: float = 0.0
    durations: dict[str, float] = field(default_factory=dict)  # ms per finished stage

    async def start(self, stage: str, message: str | None = None, details: dict[str, Any] | None = None) -> None:
        if self.stage is not None:
            await self.finish()
        self.stage = stage
        self._stage_t0 = time.monotonic()
        self._stage_wall = time.time()
        await self.update(0, message or STAGE_MESSAGES[stage], details)

    async def update(self, percent: float, message: str | None = None, details: dict[str, Any] | None = None) -> None:
        if self.on_progress is None or self.stage is None:
            return
        now = time.monotonic()
        info = ProgressInfo(
            stage=self.stage,
            percent=float(max(0.0, min(100.0, percent))),
            message=message or STAGE_MESSAGES[self.stage],
            stage_started_at=self._stage_wall,
            stage_elapsed_ms=(now - self._stage_t0) * 1000,
            total_elapsed_ms=(now - self._t0) * 1000,
            details=details,
        )
        await call_back(self.on_progress, info)

    async def finish(self, details: dict[str, Any] | None = None) -> None:
        """End the current stage at 100%, with the message "<default message> completed" (the seed's; the
        `completed` stage's own message says it once)."""
        if self.stage is None:
            return
        stage = self.stage
        message = STAGE_MESSAGES[stage]
        await self.update(100, message if message.endswith(" completed") else f"{message} completed", details)
        self.durations[stage] = self.durations.get(stage, 0.0) + (time.monotonic() - self._stage_t0) * 1000
        self.stage = None

    def timing(self) -> dict[str, Any]:
        """`{total_ms, started_at, completed_at, stages, distribution}` for the run so far."""
        total = (time.monotonic() - self._t0) * 1000
        return {
            "total_ms": total,
            "started_at": datetime.fromtimestamp(self.started_at, UTC).isoformat(),
            "completed_at": datetime.now(UTC).isoformat(),
            "stages": dict(self.durations),
            "distribution": {s: (self.durations.get(s, 0.0) / total * 100 if total else 0.0) for s in MEASURED_STAGES},
        }

    def insights(self) -> dict[str, Any]:
        return insights(self.durations)


def insights(durations: dict[str, float]) -> dict[str, Any]:
    """`{bottleneck, suggestions}`: the slowest stage, and advice when it crossed its threshold."""
    if not durations:
        return {"bottleneck": None, "suggestions": None}
    bottleneck = max(durations, key=lambda s: durations[s])
    threshold = _THRESHOLDS.get(bottleneck)
    suggestions = None
    if threshold and durations[bottleneck] > threshold[0] * 1000:
        suggestions = list(threshold[1])
    return {"bottleneck": bottleneck, "suggestions": suggestions}
