"""How each language installs packages into its sandbox only (the language names themselves: `language_names`)."""

from __future__ import annotations

import json
import shlex
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..client.callbacks import call_back
from ..errors import CommandExitError, InvalidArgument, ScaleboxError

if TYPE_CHECKING:
    from ..client import Execution
    from ._progress import Tracker


# Run once in a Python context: where this sandbox's own packages go (below the sandbox's home, which is the
# kernel's home), made importable. Wrapped in a function so the user's namespace stays clean.
PYTHON_PROBE = """\
def __scalebox_packages():
    import importlib, json, os, sys
    target = os.path.expanduser("~/.local/lib/scalebox/python%d.%d" % sys.version_info[:2])
    os.makedirs(target, exist_ok=True)
    if target not in sys.path:
        sys.path.insert(0, target)
    importlib.invalidate_caches()
    marker = os.path.expanduser("~/.scalebox/session.json")
    print(json.dumps({"python": sys.executable, "target": target, "home": os.path.exists(marker)}))
__scalebox_packages()
del __scalebox_packages
"""

R_PROBE = """\
local({
  lib <- path.expand("~/.local/lib/scalebox/R")
  dir.create(lib, recursive = TRUE, showWarnings = FALSE)
  .libPaths(c(lib, .libPaths()))
  cat(sprintf('{"target": "%s", "home": %s}\\n', lib, tolower(file.exists(path.expand("~/.scalebox/session.json")))))
})
"""


#: node: `list` prints node_modules' top-level packages as JSON; `diff BEFORE` prints `installed: name@version …`
#: for each that is new or changed since BEFORE (npm's summary, `added 3 packages`, names none).
NPM_INVENTORY = """\
const fs = require("fs"), path = require("path");
const have = {};
const top = fs.existsSync("node_modules") ? fs.readdirSync("node_modules") : [];
for (const entry of top) {
  const names = entry.startsWith("@") ? fs.readdirSync(path.join("node_modules", entry)).map((n) => entry + "/" + n)
    : [entry];
  for (const name of names) {
    try {
      have[name] = JSON.parse(fs.readFileSync(path.join("node_modules", name, "package.json"))).version;
    } catch (e) {}
  }
}
if (process.argv[1] === "list") {
  console.log(JSON.stringify(have));
} else {
  const before = JSON.parse(process.argv[2] || "{}");
  const changed = Object.keys(have).filter((n) => before[n] !== have[n]).sort().map((n) => n + "@" + have[n]);
  console.log(changed.length ? "installed: " + changed.join(" ") : "up to date: nothing new installed");
}
"""

#: How each installer's line saying what it installed begins.
SUMMARY_PREFIXES = ("Successfully installed", "added ", "installed:", "up to date")


def install_command(language: str, packages: list[str], probe: dict[str, object]) -> str:
    """The shell command that installs `packages` for `language` into the sandbox (never system-wide)."""
    quoted = " ".join(shlex.quote(p) for p in packages)
    if language == "python":
        target = shlex.quote(str(probe["target"]))
        return (  # not --quiet: pip's own lines (Collecting, Downloading, Installing, Successfully) are the progress
            f"{shlex.quote(str(probe['python']))} -m pip install --progress-bar off --disable-pip-version-check "
            f"--no-warn-script-location --upgrade --target {target} {quoted}"
        )
    if language in ("nodejs", "typescript"):
        # npm installs into the working directory's node_modules, which Node and Deno resolve from the cwd. Its own
        # summary ("added 3 packages") names none, so what node_modules holds is compared before and after.
        return (
            f'inventory={shlex.quote(NPM_INVENTORY)}; before=$(node -e "$inventory" list) && '
            f'npm install --no-audit --no-fund --no-progress {quoted} && node -e "$inventory" diff "$before"'
        )
    if language == "r":
        # install.packages only warns when a package cannot be had: what is there afterwards is the answer.
        names = ", ".join(json.dumps(p) for p in packages)
        lib = json.dumps(str(probe["target"]))
        script = (
            f"pkgs <- c({names}); lib <- {lib}; "
            'install.packages(pkgs, lib = lib, repos = "https://cloud.r-project.org"); '
            "have <- rownames(installed.packages(lib.loc = lib)); missing <- setdiff(pkgs, have); "
            'if (length(missing)) { message("not installed: ", paste(missing, collapse = ", ")); quit(status = 1) }; '
            'cat("installed:", paste(pkgs, collapse = " "), "\\n")'
        )
        return f"Rscript -e {shlex.quote(script)}"
    raise InvalidArgument(
        f"Cannot install packages for {language!r}: sessions install packages for python (pip), "
        "nodejs and typescript (npm) and r (install.packages)."
    )


def parse_probe(execution: Execution) -> dict[str, Any]:
    """What a probe printed: where packages go, and whether the kernel's home is the sandbox's."""
    if execution.error is not None:
        raise ScaleboxError(f"Could not prepare the package directory: {execution.error.name}: {execution.error.value}")
    try:
        probe: dict[str, Any] = json.loads("".join(execution.logs.stdout).strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise ScaleboxError("Could not prepare the package directory: the sandbox gave no answer") from None
    if not probe.get("home"):
        raise ScaleboxError(
            "Cannot install packages into this sandbox only: its kernel's home directory is not the sandbox's "
            "/home/user."
        )
    return probe


async def run_install(
    run: Callable[[str, Callable[[Any], Awaitable[None]]], Awaitable[Any]],
    command: str,
    wanted: list[str],
    on_output: Callable[[str], Any] | None,
    tracker: Tracker,
) -> str:
    """Run the install command, reporting progress as its output comes (30%, +5 per output chunk up to 90%, as
    the seed SDK does), each report's message naming the installer's latest line. Returns the installer's own
    summary of what it installed (pip's `Successfully installed …`, npm's `added …`, R's `installed: …`)."""
    percent = 30.0
    summary = ""

    async def output(message: Any) -> None:
        nonlocal percent, summary
        text = str(message)
        await call_back(on_output, text)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        for line in lines:
            if line.startswith(SUMMARY_PREFIXES):
                summary = line[:300]
        percent = min(90.0, percent + 5)
        step = f": {lines[-1][:120]}" if lines else ""
        await tracker.update(percent, f"Installing {', '.join(wanted)}{step}", {"output": text[:100]})

    await tracker.update(percent)
    try:
        await run(command, output)
    except CommandExitError as exc:
        detail = (exc.stderr or exc.stdout).strip()[-2000:]
        raise ScaleboxError(f"Installing {' '.join(wanted)} failed (exit code {exc.exit_code}):\n{detail}") from None
    return summary
