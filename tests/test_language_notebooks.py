"""The language notebooks run start to finish with nbclient against a real scalebox-local: notebooks/languages.ipynb
in a plain python3 kernel (`%%scalebox --language ...` cells), and one notebook per Scalebox kernel language.
Cells tagged `raises-exception` demonstrate errors: they must fail, with the error's name.

A Scalebox kernel relays its sandbox kernel's messages unchanged, so these notebooks show what the native kernels
show: IRkernel's and tslab's values arrive as display_data, tslab reports a thrown error as output (no `error`
message), bash_kernel's error has no name and jjava calls its exceptions RuntimeException."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from conftest import REPO, LocalServer
from kernel_support import scalebox_kernels
from language_support import OTHER_LANGUAGES, skip_reason
from nbclient import NotebookClient

pytestmark = pytest.mark.timeout(300)  # a first run may install the runtimes (about a minute)


@pytest.fixture(scope="module", autouse=True)
def scalebox_env(local_server: LocalServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with scalebox_kernels(local_server, tmp_path_factory, MPLBACKEND="agg"):
        yield


def outputs(cell: Any, output_type: str) -> list[Any]:
    return [out for out in cell.outputs if out.output_type == output_type]


#: Native kernels that report a failing cell in its reply only, with no `error` output (tslab shows the error as
#: display_data).
NO_ERROR_OUTPUT = {"nodejs"}


def execute(name: str, tmp_path: Path) -> list[Any]:
    notebook = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    kernel = notebook.metadata.kernelspec.name
    NotebookClient(notebook, kernel_name=kernel, timeout=120, resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    for cell in code:
        failed = bool(outputs(cell, "error"))
        raises = "raises-exception" in cell.metadata.get("tags", [])
        assert failed == (raises and name not in NO_ERROR_OUTPUT), (cell.source, cell.outputs)
    return code


#: Per notebook: (index of a code cell, a text its main result or stdout must contain).
EXPECTED = {
    "r": [(0, "mean: 3.875"), (0, "Min. 1st Qu."), (1, "square")],
    "nodejs": [(0, "sorted: 1 1 2 3 4 5 6 9"), (0, "31"), (1, "10, 18, 4, 12")],
    "typescript": [(0, "lengths: [ 5, 10 ]"), (0, "15")],
    "java": [(0, "points: [Point[x=3, y=4], Point[x=6, y=8]]"), (0, "15.0")],
    "bash": [(0, "line 3"), (1, "3"), (2, "still in demo")],
}
ERROR_NAMES = {"r": "ERROR", "typescript": "RangeError", "java": "RuntimeException", "bash": ""}
RICH = {"r": (2, "image/png"), "nodejs": (2, "text/html"), "typescript": (1, "text/html"), "java": (1, "text/html")}
RICH["bash"] = (3, "text/html")


def text_of(cell: Any) -> str:
    streams = "".join(out.text for out in outputs(cell, "stream"))
    values = outputs(cell, "execute_result") + outputs(cell, "display_data")
    return streams + "".join(out.data.get("text/plain", "") for out in values)


@pytest.mark.parametrize("language", OTHER_LANGUAGES)
def test_language_notebook_runs(language: str, tmp_path: Path) -> None:
    why = skip_reason(language)
    if why:
        pytest.skip(why)
    code = execute(language, tmp_path)
    for index, expected in EXPECTED[language]:
        assert expected in text_of(code[index]), (code[index].source, text_of(code[index]))
    index, mime = RICH[language]
    assert any(
        mime in out.data for out in outputs(code[index], "display_data") + outputs(code[index], "execute_result")
    )
    if language in NO_ERROR_OUTPUT:
        assert "SyntaxError" in str(code[-1].outputs), code[-1].outputs  # shown as output by tslab itself
    else:
        assert outputs(code[-1], "error")[0].ename == ERROR_NAMES[language]


def test_languages_notebook_runs(tmp_path: Path) -> None:
    missing = [lang for lang in OTHER_LANGUAGES if skip_reason(lang)]
    if missing:
        pytest.skip("; ".join(skip_reason(lang) for lang in missing))
    code = execute("languages", tmp_path)
    by_source = {cell.source.splitlines()[0]: cell for cell in code}
    assert outputs(code[1], "execute_result")[0].data["text/plain"] == "3.875"
    assert "Min. 1st Qu." in text_of(code[2])
    assert any("image/png" in out.data for out in outputs(code[3], "display_data"))
    assert text_of(code[4]) == "[ 3, 1, 1, 5, 9 ]"
    assert "<b>3</b> words" in outputs(code[5], "execute_result")[0].data["text/html"]
    assert text_of(code[6]) == "110"
    assert text_of(code[7]).startswith("bash 5")
    assert text_of(by_source["evens"]) == "[4, 2, 6]"
    assert "closed" in text_of(by_source["%scalebox close"])
