"""A sandbox's lifecycle on the control plane: kill, set_timeout, get_info, get_metrics and pause, each in the two
forms of the seed SDK: on the class with a sandbox id (`AsyncSandbox.kill("sbx-...")`, on a connection of its own
from `config`/`api_key`/`api_url`), and on a sandbox (`await sandbox.kill()`, on the sandbox's connection)."""

from __future__ import annotations

from datetime import datetime

from ..config import ScaleboxConfig
from . import control_plane
from .control_plane import call_by_id
from .dual import class_or_instance
from .models import SandboxInfo, SandboxMetrics
from .transport import Transport


class SandboxLifecycle:
    """The lifecycle methods of `AsyncSandbox` (its base): what they need of it is its id and its connection."""

    sandbox_id: str
    _transport: Transport

    @staticmethod
    async def _kill_by_id(
        sandbox_id: str,
        *,
        config: ScaleboxConfig | None = None,
        api_key: str | None = None,
        api_url: str | None = None,
        request_timeout: float | None = None,
    ) -> bool:
        """Kill the sandbox `sandbox_id` (its files and kernels are gone); False when the server does not know it."""
        return await call_by_id(lambda t: control_plane.kill(t, sandbox_id), config, api_key, api_url, request_timeout)

    async def _kill(self) -> bool:
        """Kill the sandbox (its files and kernels are gone); False, not an error, when it was already gone."""
        return await control_plane.kill(self._transport, self.sandbox_id)

    kill = class_or_instance(_kill_by_id, _kill)

    @staticmethod
    async def _set_timeout_by_id(
        sandbox_id: str,
        timeout: int,
        *,
        config: ScaleboxConfig | None = None,
        api_key: str | None = None,
        api_url: str | None = None,
        request_timeout: float | None = None,
    ) -> None:
        """Let the sandbox `sandbox_id` live `timeout` seconds from now; SandboxNotFound when there is none."""
        await call_by_id(
            lambda t: control_plane.set_timeout(t, sandbox_id, timeout), config, api_key, api_url, request_timeout
        )

    async def _set_timeout(self, timeout: int) -> None:
        """Let the sandbox live `timeout` seconds from now (extends or shortens its life)."""
        await control_plane.set_timeout(self._transport, self.sandbox_id, timeout)

    set_timeout = class_or_instance(_set_timeout_by_id, _set_timeout)

    @staticmethod
    async def _get_info_by_id(
        sandbox_id: str,
        *,
        config: ScaleboxConfig | None = None,
        api_key: str | None = None,
        api_url: str | None = None,
        request_timeout: float | None = None,
    ) -> SandboxInfo:
        """What the control plane says about the sandbox `sandbox_id`; SandboxNotFound when there is none."""
        return await call_by_id(
            lambda t: control_plane.get_info(t, sandbox_id), config, api_key, api_url, request_timeout
        )

    async def _get_info(self) -> SandboxInfo:
        """What the control plane says about this sandbox (state, times, metadata, resources)."""
        return await control_plane.get_info(self._transport, self.sandbox_id)

    get_info = class_or_instance(_get_info_by_id, _get_info)

    @staticmethod
    async def _get_metrics_by_id(
        sandbox_id: str,
        start: datetime | None = None,
        end: datetime | None = None,
        *,
        config: ScaleboxConfig | None = None,
        api_key: str | None = None,
        api_url: str | None = None,
        request_timeout: float | None = None,
    ) -> list[SandboxMetrics]:
        """Resource use samples of the sandbox `sandbox_id` (between `start` and `end` when given)."""
        return await call_by_id(
            lambda t: control_plane.get_metrics(t, sandbox_id, start, end), config, api_key, api_url, request_timeout
        )

    async def _get_metrics(self, start: datetime | None = None, end: datetime | None = None) -> list[SandboxMetrics]:
        """Resource use samples of this sandbox: CPU, memory and disk (between `start` and `end` when given)."""
        return await control_plane.get_metrics(self._transport, self.sandbox_id, start, end)

    get_metrics = class_or_instance(_get_metrics_by_id, _get_metrics)

    @staticmethod
    async def _pause_by_id(
        sandbox_id: str,
        *,
        config: ScaleboxConfig | None = None,
        api_key: str | None = None,
        api_url: str | None = None,
        request_timeout: float | None = None,
    ) -> None:
        """Pause the sandbox `sandbox_id`; pausing a paused one is fine."""
        await call_by_id(lambda t: control_plane.pause(t, sandbox_id), config, api_key, api_url, request_timeout)

    async def _pause(self) -> None:
        """Pause the sandbox (files and, where supported, memory are kept); pausing a paused one is fine."""
        await control_plane.pause(self._transport, self.sandbox_id)

    pause = class_or_instance(_pause_by_id, _pause)
