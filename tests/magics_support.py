"""Helpers for tests that drive the IPython extension in a real in-process IPython shell."""

from __future__ import annotations

from IPython.core.interactiveshell import ExecutionResult, InteractiveShell
from IPython.utils.capture import CapturedIO, capture_output

from scalebox_kernel.magics import ScaleboxMagics


def magics() -> ScaleboxMagics:
    found = InteractiveShell.instance().magics_manager.registry["ScaleboxMagics"]
    assert isinstance(found, ScaleboxMagics)
    return found


def run(ip: InteractiveShell, code: str) -> tuple[ExecutionResult, CapturedIO]:
    with capture_output() as captured:
        result = ip.run_cell(code)
    return result, captured


def ok(ip: InteractiveShell, code: str) -> CapturedIO:
    result, captured = run(ip, code)
    assert result.success, f"{code!r} failed: {result.error_in_exec!r}\n{captured.stdout}\n{captured.stderr}"
    return captured
