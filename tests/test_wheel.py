"""A built wheel, not the editable checkout: `pip wheel .` installed into a fresh venv carries the six kernelspecs
(kernelspecs/, each with its own logo) and the demo notebook, and `jupyter scalebox demo` works from it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import LocalServer

from scalebox_kernel.kernel.languages import LANGUAGES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (found,) = out.glob("scalebox_kernel-*.whl")
    return found


def test_the_wheel_ships_the_kernelspecs_and_the_notebooks(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for lang in LANGUAGES.values():
        for part in ("kernel.json", "logo-32x32.png", "logo-64x64.png", "logo-svg.svg"):
            assert f"scalebox_kernel/kernelspecs/{lang.kernel_name}/{part}" in names
    assert "scalebox_kernel/notebooks/quickstart.ipynb" in names


def test_a_wheel_install_gives_six_kernelspecs_and_a_working_demo(
    wheel: Path, local_server: LocalServer, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    # The venv sees the machine's packages (the dependencies), but scalebox_kernel only from the wheel.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "--no-deps", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*install, str(wheel)], check=True, timeout=300)
    where = subprocess.run(
        [str(python), "-c", "import scalebox_kernel; print(scalebox_kernel.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    ).stdout
    assert where.startswith(str(venv)), where  # not the checkout

    prefix = tmp_path / "prefix"
    done = subprocess.run(
        [str(python), "-m", "scalebox_kernel", "install", "--prefix", str(prefix)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    kernels = prefix / "share" / "jupyter" / "kernels"
    specs = sorted(p.name for p in kernels.iterdir())
    assert specs == sorted(lang.kernel_name for lang in LANGUAGES.values())
    logos = {hashlib.sha256((kernels / name / "logo-64x64.png").read_bytes()).hexdigest() for name in specs}
    assert len(logos) == 6, "each language has its own logo"
    for name in specs:
        spec = json.loads((kernels / name / "kernel.json").read_text())
        assert spec["argv"][0] == str(python)

    env = {k: v for k, v in os.environ.items() if not k.startswith("SCALEBOX_API")}
    env.update(local_server.env())
    env["JUPYTER_PATH"] = ""  # the demo installs its kernelspec into the venv, from the wheel
    demo = subprocess.run(
        [str(python), "-m", "scalebox_kernel", "demo", "--output-dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=400,
    )
    assert demo.returncode == 0, (demo.stdout[-3000:], demo.stderr[-3000:])
    assert "Done. The executed notebook is" in demo.stdout
    assert (venv / "share" / "jupyter" / "kernels" / "scalebox-python" / "logo-64x64.png").is_file()
    assert (tmp_path / "out" / "quickstart.ipynb").is_file()
