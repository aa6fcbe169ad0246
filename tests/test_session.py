"""The session layer against a real scalebox-local: SandboxSession (create, attach, resume, replace, contexts,
packages, files) and the seed SDK's Session API (stages, timing, insights, reuse, auto-resume, other processes)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from collections.abc import Iterator

import pytest
from conftest import LocalServer

from scalebox_kernel.client import AsyncSandbox, Sandbox
from scalebox_kernel.errors import InvalidArgument, SandboxExpired, SandboxNotFound, ScaleboxError
from scalebox_kernel.session import STAGES, Attach, ProgressInfo, SandboxSession, Session
from scalebox_kernel.session._progress import insights


def tiny_wheel(name: str = "tinypkg", version: str = "0.1") -> tuple[str, bytes]:
    """A pure-Python wheel built in memory (no network, no build backend): (file name, bytes)."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VALUE = 'hello from {name} {version}'\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: scalebox-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    buffer, record = io.BytesIO(), ""
    with zipfile.ZipFile(buffer, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record += f"{path},sha256={digest},{len(text)}\n"
        archive.writestr(f"{dist}/RECORD", record + f"{dist}/RECORD,,\n")
    return f"{name}-{version}-py3-none-any.whl", buffer.getvalue()


def tiny_npm_package(name: str = "tinyjs", version: str = "1.2.3") -> tuple[str, bytes]:
    """An npm package tarball built in memory (no registry): (file name, bytes); `require(name)` is a greeting."""
    files = {
        "package/package.json": json.dumps({"name": name, "version": version, "main": "index.js"}),
        "package/index.js": f"module.exports = 'hello from {name} {version}';\n",
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path, text in files.items():
            member = tarfile.TarInfo(path)
            member.size, member.mode = len(text.encode()), 0o644
            archive.addfile(member, io.BytesIO(text.encode()))
    return f"{name}-{version}.tgz", buffer.getvalue()


@pytest.fixture(scope="module", autouse=True)
def server_env(local_server: LocalServer) -> Iterator[LocalServer]:
    """Point every client in this module (and its subprocesses) at the shared scalebox-local."""
    saved = dict(os.environ)
    os.environ.update(local_server.env())
    yield local_server
    os.environ.clear()
    os.environ.update(saved)


def _sandbox_ids() -> set[str]:
    return {info.sandbox_id for info in Sandbox.list(state=["running", "paused"])}


# ---------------------------------------------------------------------------------------------- Session.run


def test_run_reports_every_stage_in_order_with_timing_and_insights() -> None:
    name, wheel = tiny_wheel()
    seen: list[ProgressInfo] = []
    before = _sandbox_ids()
    result = Session.run(
        "import tinypkg\nprint(tinypkg.VALUE)\nopen('out.txt', 'w').write(tinypkg.VALUE.upper())",
        files={name: wheel},
        packages=[f"./{name}"],
        download_files=["out.txt"],
        on_progress=seen.append,
    )
    assert result.success and result.exit_code == 0 and result.error is None
    assert result.stdout == "hello from tinypkg 0.1\n"
    assert result.files == {"out.txt": b"HELLO FROM TINYPKG 0.1"}
    order = list(dict.fromkeys(p.stage for p in seen))
    assert order == ["initializing", "connecting", "uploading", "installing", "executing", "downloading", "completed"]
    for stage in order:  # every stage starts at 0 and ends at 100 with "<message> completed"
        reports = [p for p in seen if p.stage == stage]
        assert reports[0].percent == 0 and reports[-1].percent == 100
        assert reports[-1].message.endswith("completed") and "completed completed" not in reports[-1].message
        assert all(0 <= p.percent <= 100 for p in reports)
    shown = [str(p) for p in seen]  # what on_progress=print shows: a line a person reads, not a dataclass
    assert not [line for line in shown if "ProgressInfo(" in line or "\n" in line]
    assert shown[-1].startswith("[completed 100%] Execution completed (")
    assert [p.total_elapsed_ms for p in seen] == sorted(p.total_elapsed_ms for p in seen)
    timing = result.timing
    assert set(timing) == {"total_ms", "started_at", "completed_at", "stages", "distribution"}
    assert set(timing["stages"]) == set(order)
    assert set(timing["distribution"]) == set(STAGES[:6])
    assert sum(timing["stages"].values()) <= timing["total_ms"] + 1
    slowest = max(timing["stages"], key=timing["stages"].get)
    assert result.insights["bottleneck"] == slowest
    # Without keep_alive the sandbox is not left behind, and no id is handed out.
    assert result.session_id is None
    assert _sandbox_ids() == before


def test_insights_name_the_slowest_stage_and_advise_past_thresholds() -> None:
    result = Session.run("import time; time.sleep(1.2)")
    assert result.insights["bottleneck"] == "executing"
    assert result.timing["stages"]["executing"] >= 1200
    assert result.insights["suggestions"] is None  # 1.2 s is below the 60 s threshold
    advice = insights({"connecting": 200.0, "installing": 31_000.0, "executing": 900.0})
    assert advice["bottleneck"] == "installing" and len(advice["suggestions"]) == 3
    assert insights({"uploading": 5_001.0})["suggestions"] and not insights({"uploading": 4_999.0})["suggestions"]


def test_reusing_a_session_is_faster_than_a_new_one_and_keeps_state() -> None:
    new = Session.run("x = 41", keep_alive=True)
    try:
        assert new.session_id is not None
        reuse = Session.run("print(x + 1)", session_id=new.session_id)
        assert reuse.stdout == "42\n" and reuse.session_id == new.session_id
        # A new session creates a sandbox and starts its kernel; reuse does neither.
        assert reuse.timing["total_ms"] < new.timing["total_ms"]
        assert reuse.timing["stages"]["connecting"] < new.timing["stages"]["connecting"]
    finally:
        Session.close(new.session_id)
    with pytest.raises(SandboxNotFound, match="not found or expired"):
        Session.run("1", session_id=new.session_id)


def test_paused_session_is_resumed_by_the_next_run() -> None:
    first = Session.run("state = 'kept'", keep_alive=True)
    sid = first.session_id
    assert sid is not None
    try:
        assert Session.pause(sid) is True
        assert Session.get(sid).status == "paused"
        stages: list[str] = []
        again = Session.run("print(state)", session_id=sid, on_progress=lambda p: stages.append(p.message))
        assert again.stdout == "kept\n"
        assert "Resuming paused sandbox" in stages
        info = Session.get(sid)
        assert info.status == "running" and info.remaining_time and info.remaining_time > 0
    finally:
        Session.close(sid)


def test_a_second_process_attaches_by_session_id() -> None:
    name, wheel = tiny_wheel("attachpkg")
    first = Session.run("shared = 6 * 7", keep_alive=True, files={name: wheel}, packages=[f"./{name}"])
    sid = first.session_id
    assert sid is not None
    script = textwrap.dedent(
        f"""
        from scalebox_kernel.session import Session
        r = Session.run("import attachpkg; print(shared, attachpkg.VALUE)", session_id={sid!r},
                        packages=["./{name}"], files={{"{name}": b"changed"}},
                        on_progress=lambda p: p.stage == "installing" and p.percent == 100
                        and print("details", p.details))
        print(r.stdout, end="")
        info = Session.get({sid!r})
        print(sorted(info.installed_packages["python"]), info.uploaded_files)
        """
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ), timeout=120
        )
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        # The other process knows the package is there (nothing installed), shares the variables...
        assert "details {'packagesInstalled': 0, 'totalPackages': 1}" in lines
        assert "42 hello from attachpkg 0.1" in lines
        assert f"['./{name}'] ['/workspace/{name}']" in lines
        # ...and re-uploaded the file whose content changed.
        assert Sandbox.connect(sid).files.read(f"/workspace/{name}", format="bytes") == b"changed"
    finally:
        Session.close(sid)


def test_list_and_keep_alive_see_sessions_of_any_process() -> None:
    first = Session.run("pass", keep_alive=True, timeout=120)
    sid = first.session_id
    assert sid is not None
    try:
        assert sid in {s.session_id for s in Session.list()}
        assert Session.get(sid).remaining_time <= 120  # type: ignore[operator]
        extended = Session.keep_alive(sid, 900)
        assert extended.new_timeout == 900
        assert Session.get(sid).remaining_time > 800  # type: ignore[operator]
    finally:
        Session.close(sid)
    assert sid not in {s.session_id for s in Session.list()}
    Session.close(sid)  # closing twice is fine


def test_code_errors_are_results_and_failures_are_reported_as_failed() -> None:
    result = Session.run("1 / 0")
    assert not result.success and result.exit_code == 1
    assert result.error is not None and result.error.name == "ZeroDivisionError"
    stages: list[str] = []
    with pytest.raises(InvalidArgument):
        Session.run("x", language="bash", packages=["left-pad"], on_progress=lambda p: stages.append(p.stage))
    assert stages[-1] == "failed"
    assert Session.run("print('still serving')").stdout == "still serving\n"


# ---------------------------------------------------------------------------------------------- SandboxSession


async def test_open_attach_resume_replace() -> None:
    created = await SandboxSession.open()
    sid = created.session_id
    try:
        assert created.attach is Attach.CREATED and created.notice is None
        await created.run_code("value = 'from the first door'")
        attached = await SandboxSession.open(sid)
        assert attached.attach is Attach.ATTACHED and attached.session_id == sid
        # The same context (the id is kept inside the sandbox), so the same variables.
        assert (await attached.run_code("value")).text == "'from the first door'"
        await attached.pause()
        assert (await created.info()).state == "paused"
        resumed = await SandboxSession.open(sid)
        assert resumed.attach is Attach.RESUMED
        assert (await resumed.run_code("value")).text == "'from the first door'"
        await attached.close(kill=False)
        await resumed.close(kill=False)
    finally:
        await created.close()
    with pytest.raises(SandboxNotFound):
        await SandboxSession.open(sid, replace_missing=False)
    replaced = await SandboxSession.open(sid)
    try:
        assert replaced.attach is Attach.REPLACED and replaced.session_id != sid
        assert replaced.notice and sid in replaced.notice and replaced.session_id in replaced.notice
    finally:
        await replaced.close()


async def test_run_code_resumes_a_paused_sandbox_and_announces_a_vanished_one() -> None:
    session = await SandboxSession.open()
    try:
        await session.run_code("n = 1")
        await session.pause()
        chunks: list[str] = []
        execution = await session.run_code("n += 1; print(n)", on_stdout=lambda m: chunks.append(m.line))
        assert chunks == ["2\n"] and execution.error is None
        assert await AsyncSandbox.kill_by_id(session.session_id)
        with pytest.raises(SandboxExpired, match=session.session_id):
            await session.run_code("n")
    finally:
        await session.close()


async def test_restart_clears_state_and_keep_alive_extends() -> None:
    session = await SandboxSession.open(timeout=60)
    try:
        await session.run_code("gone = True")
        await session.restart()
        execution = await session.run_code("gone")
        assert execution.error is not None and execution.error.name == "NameError"
        before = await session.info()
        info = await session.keep_alive(3600)
        assert before.end_at and info.end_at and (info.end_at - before.end_at).total_seconds() > 3000
    finally:
        await session.close()


async def test_packages_and_files_are_not_repeated_and_stay_in_their_sandbox() -> None:
    name, wheel = tiny_wheel("onlyhere")
    session = await SandboxSession.open()
    other = await SandboxSession.open()
    try:
        assert await session.upload({name: wheel}) == [f"/workspace/{name}"]
        assert await session.upload({name: wheel}) == []  # same content: not sent again
        assert await session.upload({"notes.txt": "v1"}) == ["/workspace/notes.txt"]
        assert await session.upload({"notes.txt": "v2"}) == ["/workspace/notes.txt"]  # changed: sent again
        assert (await session.download(["notes.txt"])) == {"notes.txt": b"v2"}
        output: list[str] = []
        assert await session.install([f"./{name}"], on_output=output.append) == [f"./{name}"]
        assert await session.install([f"./{name}"]) == []
        assert (await session.run_code("import onlyhere; onlyhere.VALUE")).text == "'hello from onlyhere 0.1'"
        missing = await other.run_code("import onlyhere")
        assert missing.error is not None and missing.error.name == "ModuleNotFoundError"
        # A fresh context of the same session sees the package again (its directory is put on sys.path).
        await session.restart()
        assert (await session.run_code("import onlyhere; onlyhere.VALUE")).error is None
        with pytest.raises(ScaleboxError, match="exit code"):
            await session.install(["./no-such-file.whl"])
        with pytest.raises(InvalidArgument, match="bash"):
            await session.install(["x"], language="bash")
    finally:
        await session.close()
        await other.close()


async def test_progress_of_open_and_unknown_language() -> None:
    stages: list[tuple[str, float]] = []
    session = await SandboxSession.open(on_progress=lambda p: stages.append((p.stage, p.percent)))
    try:
        assert stages[0] == ("connecting", 0) and stages[-1] == ("connecting", 100)
        with pytest.raises(ScaleboxError, match=r"(?i)language"):
            await session.run_code("x", language="cobol")
        assert (await session.run_code("1 + 1")).text == "2"
    finally:
        await session.close()


def test_an_install_reports_the_installers_own_steps_as_they_come() -> None:
    (a_name, a), (b_name, b) = tiny_wheel("tinya"), tiny_wheel("tinyb")
    seen: list[ProgressInfo] = []
    result = Session.run(
        "import tinya, tinyb\nprint(tinya.VALUE, tinyb.VALUE)",
        files={a_name: a, b_name: b},
        packages=[f"./{a_name}", f"./{b_name}"],
        on_progress=seen.append,
    )
    assert result.success, result.error
    assert result.stdout == "hello from tinya 0.1 hello from tinyb 0.1\n"
    steps = list(dict.fromkeys(p.message for p in seen if p.stage == "installing" and p.percent < 100))
    assert len(steps) >= 3, steps  # the installer's own lines, not one frozen message
    assert any("Successfully installed" in step and "tinya" in step for step in steps), steps


def test_a_failing_r_install_fails_and_names_what_is_missing() -> None:
    from language_support import skip_reason

    why = skip_reason("r")
    if why:
        pytest.skip(why)
    with pytest.raises(ScaleboxError) as caught:  # no such package (and CRAN is not reachable from here)
        Session.run("1 + 1", language="r", packages=["no.such.package.scalebox"])
    assert "not installed: no.such.package.scalebox" in str(caught.value)


def test_an_npm_install_says_what_it_installed_and_a_failing_one_fails() -> None:
    from language_support import skip_reason

    why = skip_reason("nodejs")
    if why:
        pytest.skip(why)
    name, tarball = tiny_npm_package()
    seen: list[ProgressInfo] = []
    code = "console.log(require('tinyjs'))"
    result = Session.run(
        code, language="nodejs", files={name: tarball}, packages=[f"./{name}"], on_progress=seen.append
    )
    assert result.success and result.stdout == "hello from tinyjs 1.2.3\n", result.error
    installing = [p.message for p in seen if p.stage == "installing"]
    assert any("installed: tinyjs@1.2.3" in message for message in installing), installing
    with pytest.raises(ScaleboxError) as caught:
        Session.run("1", language="nodejs", packages=["./no-such-package.tgz"])
    assert "Installing ./no-such-package.tgz failed" in str(caught.value) and "ENOENT" in str(caught.value)


def test_the_sync_forms_name_their_parameters() -> None:
    """What an IDE shows for Session.run(…) and the rest: the parameters themselves, as the async forms have."""
    import inspect

    for name in ("run", "pause", "close", "keep_alive", "get", "list"):
        sync = inspect.signature(getattr(Session, name)).parameters
        same = inspect.signature(getattr(Session, "a" + name)).parameters
        assert list(sync) == list(same) and "kwargs" not in sync, name
        assert [p.default for p in sync.values()] == [p.default for p in same.values()], name


def test_a_big_upload_reports_its_bytes_and_rate_as_it_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    from scalebox_kernel.session import _sandbox

    monkeypatch.setattr(_sandbox, "PROGRESS_EVERY", 0.02)  # loopback is fast: look often
    seen: list[ProgressInfo] = []
    size = 96 * 1024 * 1024
    result = Session.run(
        "import os\nprint(os.path.getsize('big.bin'))", files={"big.bin": b"x" * size}, on_progress=seen.append
    )
    assert result.success and result.stdout == f"{size}\n", result.error
    live = [p.message for p in seen if p.stage == "uploading" and "MiB of" in p.message]
    assert live and all("/s)" in message and "big.bin" in message for message in live), live
    sent = [p.details["bytesTransferred"] for p in seen if p.stage == "uploading" and p.details and "file" in p.details]
    assert sent == sorted(sent) and 0 < sent[-1] <= size, sent


def test_a_big_download_of_a_run_reports_its_bytes_and_rate_as_it_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    from scalebox_kernel.session import _sandbox

    monkeypatch.setattr(_sandbox, "PROGRESS_EVERY", 0.02)  # loopback is fast: look often
    seen: list[ProgressInfo] = []
    size = 96 * 1024 * 1024
    code = f"with open('out.bin', 'wb') as f:\n    f.write(b'y' * {size})\nopen('small.txt', 'w').write('ok')"
    result = Session.run(code, download_files=["out.bin", "small.txt"], on_progress=seen.append)
    assert result.success, result.error
    assert result.files is not None and len(result.files["out.bin"]) == size and result.files["small.txt"] == b"ok"
    live = [p for p in seen if p.stage == "downloading" and p.details and "file" in p.details]
    assert live and all("/s)" in p.message and "out.bin" in p.message for p in live), [p.message for p in live]
    got = [p.details["bytesTransferred"] for p in live if p.details]
    assert got == sorted(got) and 0 < got[-1] <= size, got
    done = [p.details for p in seen if p.stage == "downloading" and p.percent == 100]
    assert done and done[-1] == {"filesDownloaded": 2, "bytesTransferred": size + 2}, done
