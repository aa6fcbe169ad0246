"""`jupyter scalebox …`: one command family for every door (serve, install, …)."""

from __future__ import annotations

from jupyter_core.application import JupyterApp

from . import __version__


class ScaleboxApp(JupyterApp):
    name = "jupyter-scalebox"
    version = __version__
    description = "Run notebook cells inside Scalebox sandboxes (cloud or scalebox-local)."

    subcommands = {
        "serve": ("scalebox_kernel.server.app.ServeApp", "Start scalebox-local, the embedded sandbox server."),
        "install": ("scalebox_kernel.kernel.install.InstallApp", "Install the Scalebox kernelspecs."),
        "runtimes": (
            "scalebox_kernel.server.runtimes_cli.RuntimesApp",
            "Install or list the language runtimes of scalebox-local.",
        ),
        "list": ("scalebox_kernel.manage.ListApp", "List the sandboxes of the configured server."),
        "kill": ("scalebox_kernel.manage.KillApp", "Kill sandboxes by id."),
        "stop": ("scalebox_kernel.manage.StopApp", "Stop the scalebox-local running in the background."),
        "demo": ("scalebox_kernel.demo.DemoApp", "Run Python code in a sandbox and show what comes back."),
    }

    def start(self) -> None:
        if self.subapp is None:
            print(f"{self.description}\n\nSubcommands: {', '.join(sorted(self.subcommands))}")
            print("Run 'jupyter scalebox <subcommand> --help' for one of them.")
            self.exit(1)
        super().start()


main = ScaleboxApp.launch_instance
