"""The official `scalebox-sdk==1.0.10` from PyPI, unchanged, in its own venv, against the default scalebox-local:
the SDK speaks HTTPS only, which the server's one port answers beside HTTP, with its self-signed certificate."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import LocalServer

SDK_VERSION = "1.0.10"
VENV = (
    Path.home()
    / ".cache"
    / "scalebox-kernel-tests"
    / f"sdk-venv-{SDK_VERSION}-py{sys.version_info[0]}{sys.version_info[1]}"
)
MARKER = "@@RESULT@@"

SCRIPT = textwrap.dedent(
    '''
    import json, time
    from scalebox.code_interpreter import Sandbox
    from scalebox.sandbox.sandbox_api import SandboxQuery

    out = {}
    sbx = Sandbox.create(timeout=300, metadata={"suite": "official-sdk"})
    out["sandbox_id"] = sbx.sandbox_id
    out["running"] = sbx.is_running()

    ex = sbx.run_code("print('hello')")
    out["print"] = {"stdout": ex.logs.stdout, "error": ex.error is not None}
    ex = sbx.run_code("x = 40\\nx + 2")
    out["expr"] = {"text": ex.text, "count": ex.execution_count}
    ex = sbx.run_code(
        "import matplotlib.pyplot as plt\\nplt.plot([1, 2, 3], [1, 4, 9])\\nplt.show()"
    )
    out["plot"] = {"png": [len(r.png or "") for r in ex.results], "error": repr(ex.error) if ex.error else None}
    ex = sbx.run_code("1 / 0")
    out["error"] = {"name": ex.error.name if ex.error else None, "value": ex.error.value if ex.error else None}
    ex = sbx.run_code("x")
    out["state"] = ex.text

    ctx = sbx.create_code_context()
    out["ctx_language"] = ctx.language
    sbx.run_code("y = 'in-context'", context=ctx)
    out["ctx_state"] = sbx.run_code("y", context=ctx).text
    out["ctx_isolated"] = sbx.run_code("'y' in dir()").text
    sbx.destroy_context(ctx)

    sbx.files.write("/home/user/notes/a.txt", "hello file")
    out["read"] = sbx.files.read("/home/user/notes/a.txt")
    out["list"] = sorted(e.name for e in sbx.files.list("/home/user/notes"))
    out["exists"] = [sbx.files.exists("/home/user/notes/a.txt"), sbx.files.exists("/home/user/nope.txt")]
    out["make_dir"] = [sbx.files.make_dir("/home/user/newdir"), sbx.files.make_dir("/home/user/newdir")]
    sbx.files.remove("/home/user/notes/a.txt")
    out["removed"] = sbx.files.exists("/home/user/notes/a.txt")

    r = sbx.commands.run("echo out; echo err >&2")
    out["cmd"] = {"stdout": r.stdout, "stderr": r.stderr, "exit_code": r.exit_code}
    try:
        sbx.commands.run("exit 3")
        out["cmd_fail"] = None
    except Exception as exc:
        out["cmd_fail"] = type(exc).__name__
    started = time.monotonic()
    r = sbx.commands.run("sleep 35; echo done", timeout=120)
    out["long_cmd"] = {"stdout": r.stdout, "seconds": time.monotonic() - started}

    sbx.set_timeout(600)
    info = sbx.get_info()
    out["info"] = {"id": info.sandbox_id, "template": info.template_id, "metadata": info.metadata,
                   "timeout": info.timeout}
    metrics = sbx.get_metrics()
    out["metrics"] = {"n": len(metrics), "mem_used": metrics[0].mem_used, "disk_used": metrics[0].disk_used}
    listed = Sandbox.list(query=SandboxQuery(metadata={"suite": "official-sdk"}))
    out["list_ids"] = [s.sandbox_id for s in listed]
    out["list_states"] = [s.state.value for s in listed]

    sbx.beta_pause()
    out["paused_info"] = Sandbox.get_info(sbx.sandbox_id).sandbox_id
    out["paused_running"] = sbx.is_running()
    sbx.beta_pause()  # 409: already paused, taken as success
    out["killed"] = sbx.kill()
    out["list_after_kill"] = [s.sandbox_id for s in Sandbox.list()]
    print("'''
    + MARKER
    + """" + json.dumps(out))
    """
)


def sdk_venv_python() -> Path:
    """The venv's python, made once (with a lock against parallel sessions) and reused."""
    python = VENV / "bin" / "python"
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(VENV.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (VENV / ".complete").exists():
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
            subprocess.run(
                [
                    str(python),
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--disable-pip-version-check",
                    f"scalebox-sdk=={SDK_VERSION}",
                ],
                check=True,
            )
            (VENV / ".complete").write_text(SDK_VERSION)
    return python


def sdk_env(server: LocalServer) -> dict[str, str]:
    """The environment a user sets for the SDK against this server (PROTOCOL.md 8.1), and none of ours."""
    assert server.certfile
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SCALEBOX_", "SBX_", "PYTHON"))}
    env.update(
        SBX_API_KEY=server.api_key,
        SBX_DOMAIN=server.url.split("://", 1)[1] + "/v1",
        SSL_CERT_FILE=server.certfile,
    )
    return env


@pytest.fixture(scope="module")
def sdk_python() -> Path:
    try:
        return sdk_venv_python()
    except subprocess.CalledProcessError as exc:  # no package index here: say so rather than pass
        pytest.fail(f"could not build the scalebox-sdk=={SDK_VERSION} venv: {exc}")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_official_sdk_end_to_end(sdk_python: Path, local_server: LocalServer, tmp_path: Path) -> None:
    server = local_server
    assert server.url.startswith("http://127.0.0.1:") and "--tls" not in server.argv  # the default server
    assert server.certfile
    script = tmp_path / "sdk_flow.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [str(sdk_python), str(script)], env=sdk_env(server), capture_output=True, text=True, timeout=380, cwd=tmp_path
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    assert proc.returncode == 0 and lines, f"SDK script failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    out = json.loads(lines[-1][len(MARKER) :])

    assert out["running"] is True
    assert out["print"] == {"stdout": ["hello\n"], "error": False}
    assert out["expr"]["text"] == "42"
    assert out["expr"]["count"] >= 1
    assert out["plot"]["error"] is None
    assert any(n > 1000 for n in out["plot"]["png"]), out["plot"]
    assert out["error"]["name"] == "ZeroDivisionError"
    assert "division by zero" in out["error"]["value"]
    assert out["state"] == "40"  # the default context kept x

    assert out["ctx_language"] == "python3" or out["ctx_language"].startswith("python")
    assert out["ctx_state"] == "'in-context'"
    assert out["ctx_isolated"] == "False"  # the default context does not see y

    assert out["read"] == "hello file"
    assert out["list"] == ["a.txt"]
    assert out["exists"] == [True, False]
    assert out["make_dir"] == [True, False]
    assert out["removed"] is False

    assert out["cmd"] == {"stdout": "out\n", "stderr": "err\n", "exit_code": 0}
    assert out["cmd_fail"] == "CommandExitException"
    assert out["long_cmd"]["stdout"] == "done\n"
    assert out["long_cmd"]["seconds"] >= 35

    assert out["info"]["id"] == out["sandbox_id"]
    assert out["info"]["template"] == "code-interpreter"
    assert out["info"]["metadata"] == {"suite": "official-sdk"}
    assert out["info"]["timeout"] == 600
    assert out["metrics"]["n"] == 1 and out["metrics"]["mem_used"] > 0 and out["metrics"]["disk_used"] > 0
    assert out["list_ids"] == [out["sandbox_id"]]
    assert out["list_states"] == ["running"]

    assert out["paused_info"] == out["sandbox_id"]
    assert out["paused_running"] is False
    assert out["killed"] in (True, None)
    assert out["sandbox_id"] not in out["list_after_kill"]

    # What our server sent never carried the API key (the SDK prints its own config; that is not ours).
    assert server.api_key not in server.log_text()
