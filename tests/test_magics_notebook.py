"""notebooks/magics.ipynb runs start to finish in a plain python3 kernel (nbclient) against scalebox-local."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat
import pytest
from conftest import REPO, LocalServer
from nbclient import NotebookClient

NOTEBOOK = REPO / "notebooks" / "magics.ipynb"


def _outputs(cell: Any, output_type: str) -> list[Any]:
    return [out for out in cell.outputs if out.output_type == output_type]


def test_magics_notebook_runs(local_server: LocalServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in local_server.env().items():  # the kernel nbclient starts inherits os.environ
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MPLBACKEND", "agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, kernel_name="python3", timeout=180, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    by_source = {cell.source.splitlines()[0] if "%%" in cell.source else cell.source: cell for cell in code}
    for cell in code:  # nothing failed, nothing went to stderr
        assert not _outputs(cell, "error"), cell.source
        assert all(out.name == "stdout" for out in _outputs(cell, "stream")), cell.source
    hello = code[1]
    assert _outputs(hello, "stream")[0].text == "hello from the sandbox, working in workspace\n"
    assert _outputs(hello, "execute_result")[0].data["text/plain"] == "285"
    assert any("image/png" in out.data for out in _outputs(code[2], "display_data"))
    assert _outputs(code[4], "stream")[0].text == "5 rows in, 3 regions out\n"
    table = _outputs(by_source["summary"], "execute_result")[0].data
    assert "north" in table["text/plain"] and "219.5" in table["text/plain"] and "text/html" in table
    info = "".join(out.text for out in _outputs(by_source["%scalebox info"], "stream"))
    assert "sandbox: sbx-" in info and "state: running" in info and "time left" in info
    closed = "".join(out.text for out in _outputs(by_source["%scalebox close"], "stream"))
    assert "closed" in closed
