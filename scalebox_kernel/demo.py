"""`jupyter scalebox demo`: the quick-start notebook, run cell by cell in a sandbox, shown in the terminal."""

from __future__ import annotations

import base64
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from jupyter_core.application import JupyterApp
from traitlets import Unicode

from . import __version__
from .config import ScaleboxConfig
from .local import ensure_local_server

#: The quick-start notebook, shipped in the package (notebooks/ at the top of the repository).
NOTEBOOK = resources.files("scalebox_kernel.notebooks") / "quickstart.ipynb"


class DemoApp(JupyterApp):
    classes = [ScaleboxConfig]
    name = "jupyter-scalebox-demo"
    version = __version__
    description = "Run notebooks/quickstart.ipynb on the Scalebox (Python) kernel and print what comes back."

    notebook = Unicode(str(NOTEBOOK), config=True, help="The notebook to run.")
    output_dir = Unicode("scalebox-demo-output", config=True, help="Where the executed notebook and plots go.")
    aliases = {**JupyterApp.aliases, "notebook": "DemoApp.notebook", "output-dir": "DemoApp.output_dir"}

    def start(self) -> None:
        import nbformat
        from nbclient import NotebookClient

        self._ensure_kernelspec()
        config = ScaleboxConfig.load(config=self.cli_config)
        if config.uses_cloud:
            print(f"Using the Scalebox server at {config.api_url or 'the Scalebox cloud'} (API key set).")
        else:
            info = ensure_local_server(config.data_dir)
            print(f"Using scalebox-local at {info.url} (pid {info.pid}).")
        nb = nbformat.read(self.notebook, as_version=4)
        out = Path(self.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        print(f"Running {self.notebook} on the 'scalebox-python' kernel…\n")
        client = NotebookClient(nb, kernel_name="scalebox-python", timeout=300, allow_errors=False)
        try:
            client.execute()
        finally:
            nbformat.write(nb, out / Path(self.notebook).name)
        for index, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                _show_cell(index, cell, out)
        print(f"\nDone. The executed notebook is {out / Path(self.notebook).name}.")

    def _ensure_kernelspec(self) -> None:
        try:
            KernelSpecManager().get_kernel_spec("scalebox-python")
        except NoSuchKernel:
            subprocess.run([sys.executable, "-m", "scalebox_kernel", "install", "--sys-prefix"], check=True)
            print(f"Installed the Scalebox kernelspecs into {sys.prefix}.")


def _show_cell(index: int, cell: Any, out: Path) -> None:
    print(f"\033[2mIn [{cell.get('execution_count') or ' '}]: " + cell.source.replace("\n", "\n         ") + "\033[0m")
    for n, output in enumerate(cell.get("outputs", [])):
        kind = output.get("output_type")
        if kind == "stream":
            print(output.get("text", ""), end="")
        elif kind == "error":
            print("\n".join(output.get("traceback", [])))
        elif kind in ("execute_result", "display_data"):
            data = output.get("data", {})
            if "image/png" in data:
                path = out / f"cell{index}-output{n}.png"
                path.write_bytes(base64.b64decode(data["image/png"]))
                print(f"[plot: {path}]")
            elif "text/plain" in data:
                print(data["text/plain"])
    print()
