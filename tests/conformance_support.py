"""jupyter_kernel_test run both ways: against a language's native kernel started directly on this machine, and
against its Scalebox kernel, with the outcomes of every test (and sub-test) collected for comparison.

The native kernel is the one scalebox-local starts for a sandbox context: the same program, arguments and
environment (`Runtime.kernel_launch`), with the sandbox's home and temporary directory in a temporary folder, but
no sandbox, no server and no Scalebox kernel in between. What passes natively is what the language's kernel can do,
so it is what the Scalebox kernel must pass too.
"""

from __future__ import annotations

import json
import unittest
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import jupyter_kernel_test
from jupyter_client.manager import start_new_kernel

from scalebox_kernel.server.agent.agent import base_environment
from scalebox_kernel.server.agent.runtimes import (
    LaunchContext,
    default_registry,
)
from scalebox_kernel.server.settings import ServerSettings

#: The kernelspec name prefix of the native kernels (`native-r`, ...); scalebox-local's are `scalebox-<lang>`.
NATIVE_PREFIX = "native-"
STARTUP_TIMEOUT = 120  # seconds: a cold JVM or R with its packages may take a while


@dataclass(frozen=True)
class NativeKernel:
    """A native kernel's kernelspec dir and what it is started with (its environment and working directory)."""

    name: str
    spec_dir: Path
    env: dict[str, str]
    cwd: Path


def sandbox_env(root: Path) -> dict[str, str]:
    """The environment scalebox-local gives a sandbox's kernels, rooted at `root` instead of a sandbox's tree."""
    return base_environment(root)


def write_native_kernelspec(language: str, root: Path, jupyter_path: Path) -> NativeKernel:
    """`native-<language>` in `jupyter_path/kernels`, from the runtime's own launch (argv with
    `{connection_file}`, env, interrupt mode); home, TMPDIR and caches below `root`."""
    home, tmp = root / "home" / "user", root / "tmp"
    for directory in (home, tmp):
        directory.mkdir(parents=True, exist_ok=True)
    runtime = default_registry().resolve(language)
    settings = ServerSettings(data_dir=str(root / "data"))
    launch = runtime.kernel_launch(LaunchContext(settings=settings, home=home, env=sandbox_env(root)))
    name = NATIVE_PREFIX + runtime.name
    spec_dir = jupyter_path / "kernels" / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": launch.argv,
        "env": launch.env,
        "display_name": f"{runtime.display_name} (native, for conformance tests)",
        "language": runtime.name,
        "interrupt_mode": launch.interrupt_mode,
        "metadata": launch.metadata,
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    return NativeKernel(name=name, spec_dir=spec_dir, env=launch.env, cwd=home)


class LaunchedKernelTests(jupyter_kernel_test.KernelTests):
    """The suite, with the kernel started with `launch_options` (env, cwd) as scalebox-local would start it.
    Without options, the kernel inherits the test's environment (a Scalebox kernel, which needs the server's)."""

    __test__ = False  # a base for the classes run_suite() runs, not a suite pytest should collect itself
    launch_options: ClassVar[dict[str, Any]] = {}

    @classmethod
    def setUpClass(cls) -> None:
        cls.km, cls.kc = start_new_kernel(
            startup_timeout=STARTUP_TIMEOUT, kernel_name=cls.kernel_name, **cls.launch_options
        )


# ------------------------------------------------------------------------------------------------ outcomes

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


@dataclass
class SuiteOutcome:
    """Each test method and sub-test of one run: passed, failed (or errored) or skipped, with the first line of
    the failure or the skip reason; problems outside any test (setUpClass) separately."""

    kernel_name: str
    units: dict[str, str] = field(default_factory=dict)  # "test_x" or "test_x (code='1')" -> status
    details: dict[str, str] = field(default_factory=dict)
    class_errors: list[str] = field(default_factory=list)

    def with_status(self, status: str) -> list[str]:
        return sorted(name for name, value in self.units.items() if value == status)


def _first_line(err: Any) -> str:
    """What went wrong, in one line: the exception's type and its message (joined, cut at 200 characters)."""
    kind, value = err[0], err[1]
    message = " ".join(line.strip() for line in str(value).strip().splitlines() if line.strip())
    return f"{kind.__name__}: {message}"[:200] if message else kind.__name__


class _Recorder(unittest.TestResult):
    """A TestResult that keeps every outcome, sub-tests' successes included (the base class drops those)."""

    def __init__(self, outcome: SuiteOutcome) -> None:
        super().__init__()
        self.outcome = outcome

    @staticmethod
    def _name(test: unittest.TestCase) -> str | None:
        """`test_x` or `test_x (params)`; None for errors outside a test (setUpClass, tearDownClass)."""
        case = getattr(test, "test_case", None)
        if isinstance(case, unittest.TestCase):  # a sub-test, whose id() is its test's id() and its parameters
            return case._testMethodName + test.id().removeprefix(case.id())
        method = getattr(test, "_testMethodName", None)
        return method if isinstance(method, str) else None

    def _record(self, test: unittest.TestCase, status: str, detail: str = "") -> None:
        name = self._name(test)
        if name is None:
            self.outcome.class_errors.append(f"{test}: {detail}")
            return
        self.outcome.units[name] = status
        if detail:
            self.outcome.details[name] = detail

    def addSuccess(self, test: unittest.TestCase) -> None:
        super().addSuccess(test)
        self._record(test, PASSED)

    def addFailure(self, test: unittest.TestCase, err: Any) -> None:
        super().addFailure(test, err)
        self._record(test, FAILED, _first_line(err))

    def addError(self, test: unittest.TestCase, err: Any) -> None:
        super().addError(test, err)
        self._record(test, FAILED, _first_line(err))

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:
        super().addSkip(test, reason)
        self._record(test, SKIPPED, reason)

    def addSubTest(self, test: unittest.TestCase, subtest: unittest.TestCase, err: Any) -> None:
        super().addSubTest(test, subtest, err)
        if err is None:
            self._record(subtest, PASSED)
        else:
            self._record(subtest, FAILED, _first_line(err))


def run_suite(case: type[unittest.TestCase]) -> SuiteOutcome:
    """Run every test of `case` in this process (one kernel for the class, as the suite is designed)."""
    outcome = SuiteOutcome(kernel_name=str(getattr(case, "kernel_name", case.__name__)))
    suite = unittest.TestLoader().loadTestsFromTestCase(case)
    suite.run(_Recorder(outcome))
    return outcome


def comparison_table(native: SuiteOutcome, scalebox: SuiteOutcome) -> str:
    """Both runs side by side, one line per test method and sub-test, with why a test failed or was skipped."""
    names = sorted(set(native.units) | set(scalebox.units))
    width = max([len(name) for name in names] + [4])
    left_width = max(len(native.kernel_name), len(SKIPPED))
    lines = [f"{'test':<{width}}  {native.kernel_name:<{left_width}}  {scalebox.kernel_name}"]
    for name in names:
        left, right = native.units.get(name, "-"), scalebox.units.get(name, "-")
        lines.append(f"{name:<{width}}  {left:<{left_width}}  {right}")
    for outcome in (native, scalebox):
        for name in outcome.with_status(FAILED):
            lines.append(f"  {outcome.kernel_name} failed {name}: {outcome.details.get(name, '')}")
        for error in outcome.class_errors:
            lines.append(f"  {outcome.kernel_name} outside any test: {error}")
    return "\n".join(lines)


def lost_through_scalebox(native: SuiteOutcome, scalebox: SuiteOutcome) -> list[str]:
    """Tests and sub-tests that pass against the native kernel but not through the Scalebox kernel."""
    return [name for name in native.with_status(PASSED) if scalebox.units.get(name) != PASSED]
