"""notebooks/quickstart.ipynb runs start to finish on the Scalebox (Python) kernel with nbclient (what
`jupyter execute --kernel_name=scalebox-python` does), against a real scalebox-local."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from client_support import config_for
from conftest import REPO, LocalServer
from kernel_support import KERNEL, scalebox_kernels
from nbclient import NotebookClient

from scalebox_kernel.client import Sandbox

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


@pytest.fixture(scope="module", autouse=True)
def scalebox_env(local_server: LocalServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with scalebox_kernels(local_server, tmp_path_factory):
        yield


def outputs_of(cell: Any, output_type: str) -> list[Any]:
    return [out for out in cell.outputs if out.output_type == output_type]


def test_quickstart_runs_start_to_finish(local_server: LocalServer, tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata.kernelspec.name == KERNEL
    before = {i.sandbox_id for i in Sandbox.list(config=config_for(local_server)) if i.state == "running"}
    NotebookClient(nb, kernel_name=KERNEL, timeout=120, resources={"metadata": {"path": str(tmp_path)}}).execute()

    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(not outputs_of(cell, "error") for cell in code)
    hello, compute, plot, table, info = code
    assert "Hello from a Scalebox sandbox!" in "".join(o.text for o in outputs_of(hello, "stream"))
    assert outputs_of(compute, "execute_result")[0].data["text/plain"] == "(46, 4227)"
    png = [o.data["image/png"] for o in outputs_of(plot, "display_data") if "image/png" in o.data]
    assert len(png) == 1 and base64.b64decode(png[0]).startswith(b"\x89PNG")
    html = outputs_of(table, "execute_result")[0].data["text/html"]
    assert "<table" in html and "square" in html
    assert [c.execution_count for c in code] == [1, 2, 3, 4, 5]
    text = "".join(o.text for o in outputs_of(info, "stream"))
    sandbox_id = next(
        line.split(":", 1)[1].strip() for line in text.splitlines() if line.strip().startswith("sandbox:")
    )
    assert sandbox_id not in before
    after = {i.sandbox_id for i in Sandbox.list(config=config_for(local_server)) if i.state == "running"}
    assert sandbox_id not in after, "the kernel's shutdown at the end kills the notebook's sandbox"
