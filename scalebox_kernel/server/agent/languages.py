"""R, Node.js (tslab's jslab), TypeScript (Deno), Java (jjava) and Bash: their kernels, and what each one's output
needs so that users see what Python shows (measured facts in RUNTIMES.md section 2):

- R (IRkernel) sends every value as display_data: the last one, when nothing follows it and it is a value (it has
  text/plain and no image), becomes the main result. Errors are named `Error`.
- tslab prints the last value with console.log and reports errors with console.error, then replies `error`
  without an error message, and answers `abort` for 200 ms after an error. A hook run at start tells tslab's own
  calls from the user's (by the caller's frame) and sends them as marked displays, which become the main result
  and a named error with its stack.
- Deno dies on SIGINT and wedges on a message interrupt (so interrupt restarts it), colours text without
  NO_COLOR, sends some output after idle, and answers a syntax error with "Execution failed" only (the message
  is recovered with `deno fmt`, which parses without running anything).
- jjava needs message-mode interrupt and names runtime errors `RuntimeException`: the real class is used.
- bash_kernel merges stderr into stdout (bash runs on a pty) and reports a failed command with an empty name.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from collections.abc import Mapping
from typing import Any

from .runtimes import CellOutput, LaunchContext, Message, Runtime

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: Metadata key of the displays the tslab hook makes of the cell's value, errors and compile diagnostics.
SCALEBOX_KEY = "scalebox"


def _error(name: str, value: str, traceback: list[str]) -> Message:
    return ("error", {"ename": name, "evalue": value, "traceback": traceback})


def _result(data: dict[str, Any], count: Any) -> Message:
    return ("execute_result", {"data": data, "metadata": {}, "execution_count": count})


# ---------------------------------------------------------------------------------------------------------- R


class ROutput(CellOutput):
    """Holds IRkernel's value displays back until the next message says whether one is the cell's value."""

    def __init__(self) -> None:
        self.held: dict[str, Any] | None = None

    def message(self, msg_type: str, content: dict[str, Any]) -> list[Message]:
        out: list[Message] = []
        if self.held is not None:
            out.append(("display_data", self.held))
            self.held = None
        data = content.get("data", {})
        if msg_type == "display_data" and "text/plain" in data and not any(m.startswith("image/") for m in data):
            self.held = content
            return out
        if msg_type == "error":
            value = str(content.get("evalue", "")).strip()
            for prefix in ("Error in eval(expr, envir, enclos): ", "Error: "):
                value = value.removeprefix(prefix)
            content = {**content, "ename": "Error", "evalue": value}
        out.append((msg_type, content))
        return out

    def reply(self, content: dict[str, Any]) -> list[Message]:
        out = super().reply(content)
        if self.held is not None:
            out.insert(0, _result(self.held.get("data", {}), content.get("execution_count")))
            self.held = None
        return out


class RRuntime(Runtime):
    name = "r"

    def chdir_code(self, path: str) -> str:
        return f"invisible(setwd({json.dumps(path)}))"

    display_name = "R"

    def env_code(self, env_vars: Mapping[str, str]) -> tuple[str, str]:
        names = ", ".join(json.dumps(k) for k in env_vars)
        values = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in env_vars.items())
        setup = (
            f"invisible(local({{options(.scalebox_saved_env = Sys.getenv(c({names}), unset = NA, names = TRUE)); "
            f"Sys.setenv({values})}}))"
        )
        restore = (
            "invisible(local({old <- getOption('.scalebox_saved_env'); for (k in names(old)) "
            "if (is.na(old[[k]])) Sys.unsetenv(k) else do.call(Sys.setenv, stats::setNames(list(old[[k]]), k)); "
            "options(.scalebox_saved_env = NULL)}))"
        )
        return setup, restore

    def cell_output(self, code: str = "") -> CellOutput:
        return ROutput()


# ---------------------------------------------------------------------------------------------------- Node.js

# Run once in every jslab kernel. tslab's executor prints the last value with console.log and errors (thrown
# values and compile diagnostics) with console.error, through node's global console; the hook wraps that console's
# formatters, tells tslab's calls from the user's by the first caller outside node's internals, and sends them as
# text displays instead (what any frontend shows), marked in their metadata (`SCALEBOX_KEY`) for the Execute path.
TSLAB_HOOK = """\
(() => {
  const util = require("util");
  const cache = require.cache || {};  // tslab's own jupyter module (loaded, not importable by name) sends displays
  const key = Object.keys(cache).find((k) => k.endsWith("/tslab/dist/jupyter.js"));
  const jupyter = key && cache[key].exports;
  if (!jupyter) return;
  const symbols = Object.getOwnPropertySymbols(console);
  const find = (name) => symbols.find((s) => s.description === name);
  const [kOut, kErr, kWrite] = ["kFormatForStdout", "kFormatForStderr", "kWriteToConsole"].map(find);
  if (!kOut || !kErr || !kWrite) return;
  const SKIP = "\\u0000scalebox-skip\\u0000";
  const send = (kind, payload, text) => {
    if (!jupyter.lastWriteDisplayData) return undefined;
    const metadata = { "@KEY@": JSON.stringify({ kind: kind, payload: payload }) };
    jupyter.lastWriteDisplayData({ data: { "text/plain": text }, metadata: metadata, transient: {} }, false);
    return SKIP;
  };
  const fromTslab = () => {
    const frames = (new Error().stack || "").split("\\n").slice(3);
    const caller = frames.find((f) => !f.includes("node:internal/"));
    return caller !== undefined && caller.includes("/tslab/dist/executor.js");
  };
  const formatOut = console[kOut];
  const formatErr = console[kErr];
  const write = console[kWrite];
  console[kWrite] = function (stream, text) {
    if (text !== SKIP) return write.call(this, stream, text);
  };
  console[kOut] = function (args) {
    if (args.length === 1 && fromTslab()) {
      const text = util.inspect(args[0]);
      return send("result", { "text/plain": text }, text);
    }
    return formatOut.call(this, args);
  };
  console[kErr] = function (args) {
    if (fromTslab() && args.length === 5 && args[0] === "%s%d:%d - %s") {
      const [, file, line, column, message] = args;
      const where = String(file).trim() || "cell";
      const diagnostic = { file: String(file).trim(), line, column, message: String(message) };
      return send("diagnostic", diagnostic, where + ":" + line + ":" + column + " - " + String(message));
    }
    if (fromTslab() && args.length === 1) {
      const e = args[0];
      const isError = e !== null && typeof e === "object" && typeof e.stack === "string";
      const error = isError
        ? { name: String(e.name || "Error"), value: String(e.message || ""), stack: e.stack }
        : { name: "Uncaught", value: util.inspect(e), stack: "Uncaught " + util.inspect(e) };
      return send("error", error, error.stack);
    }
    return formatErr.call(this, args);
  };
})();
""".replace("@KEY@", SCALEBOX_KEY)


def _marked(content: dict[str, Any]) -> dict[str, Any] | None:
    """What the tslab hook put in a display's metadata (its kind and payload), if it made that display."""
    marked = (content.get("metadata") or {}).get(SCALEBOX_KEY)
    if not isinstance(marked, str):
        return None
    try:
        value = json.loads(marked)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _trim_js_stack(stack: str) -> list[str]:
    """A JS stack without the frames of tslab and node:vm that run every cell."""
    lines = []
    for line in stack.splitlines():
        if "/tslab/dist/" in line or "node:vm" in line or "sigintHandlersWrap" in line:
            break
        lines.append(line.replace("evalmachine.<anonymous>", "<cell>"))
    return lines


class TslabOutput(CellOutput):
    """Turns the hook's marked displays into the main result and errors; synthesises an error when tslab replied
    `error` with nothing but stderr text."""

    def __init__(self) -> None:
        self.result: dict[str, Any] | None = None
        self.diagnostics: list[dict[str, Any]] = []
        self.errored = False
        self.stderr_tail = ""

    def message(self, msg_type: str, content: dict[str, Any]) -> list[Message]:
        marked = _marked(content) if msg_type == "display_data" else None
        kind, payload = (marked.get("kind"), marked.get("payload")) if marked else (None, None)
        if kind == "result" and isinstance(payload, dict):
            self.result = payload
            return []
        if kind == "error" and isinstance(payload, dict):
            self.errored = True
            name, value = str(payload.get("name", "Error")), str(payload.get("value", ""))
            return [_error(name, value, _trim_js_stack(str(payload.get("stack", ""))))]
        if kind == "diagnostic" and isinstance(payload, dict):
            self.diagnostics.append(payload)
            return []
        if msg_type == "error":
            self.errored = True
        if msg_type == "stream" and content.get("name") == "stderr":
            self.stderr_tail = (self.stderr_tail + content.get("text", ""))[-2000:]
        return [(msg_type, content)]

    def reply(self, content: dict[str, Any]) -> list[Message]:
        out = super().reply(content)
        if self.diagnostics:
            lines = [f"{d['file'] or 'cell'}:{d['line']}:{d['column']} - {d['message']}" for d in self.diagnostics]
            out.insert(0, _error("CompileError", self.diagnostics[0]["message"], lines))
            self.errored = True
        if self.result is not None:
            out.insert(0, _result(self.result, content.get("execution_count")))
        if content.get("status") == "error" and not self.errored:
            tail = [line for line in self.stderr_tail.splitlines() if line.strip()]
            out.append(_error("Error", tail[-1] if tail else "the cell failed", tail[-20:]))
        return out


class NodeRuntime(Runtime):
    name = "nodejs"

    def chdir_code(self, path: str) -> str:
        return f"process.chdir({json.dumps(path)});"

    display_name = "Node.js"
    settle_after_error = 0.25  # tslab answers `abort` for 200 ms after an error
    ipc_transport = False  # tslab builds `ipc://ip:port` URLs

    def startup_code(self) -> str:
        return TSLAB_HOOK

    def env_code(self, env_vars: Mapping[str, str]) -> tuple[str, str]:
        values = json.dumps(dict(env_vars))
        setup = (
            f"(() => {{ const n = {values}; globalThis.__scalebox_saved_env = Object.fromEntries("
            "Object.keys(n).map((k) => [k, process.env[k]])); Object.assign(process.env, n); })();"
        )
        restore = (
            "(() => { const s = globalThis.__scalebox_saved_env || {}; for (const [k, v] of Object.entries(s)) "
            "{ if (v === undefined) delete process.env[k]; else process.env[k] = v; } "
            "delete globalThis.__scalebox_saved_env; })();"
        )
        return setup, restore

    def cell_output(self, code: str = "") -> CellOutput:
        return TslabOutput()


# ------------------------------------------------------------------------------------------------ TypeScript


class DenoOutput(CellOutput):
    """Recovers the message of a syntax error, which Deno answers with "Execution failed" only."""

    def __init__(self, deno: str, code: str) -> None:
        self.deno, self.code = deno, code
        self.errored = False

    def message(self, msg_type: str, content: dict[str, Any]) -> list[Message]:
        if msg_type == "error":
            self.errored = True
        return [(msg_type, content)]

    def reply(self, content: dict[str, Any]) -> list[Message]:
        out = super().reply(content)
        if content.get("status") != "error" or self.errored:
            return out
        lines = self._syntax_error()
        if lines:
            out.append(_error("SyntaxError", lines[0].removeprefix("error: SyntaxError: "), lines))
        else:
            out.append(_error(content.get("ename") or "Error", content.get("evalue") or "the cell failed", []))
        return out

    def _syntax_error(self) -> list[str]:
        """`deno fmt` parses the cell (without running it) and says where it is malformed."""
        try:
            done = subprocess.run(
                [self.deno, "fmt", "--ext=ts", "-"],
                input=self.code,
                capture_output=True,
                text=True,
                timeout=10,
                env={"NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                cwd="/",
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return []
        if done.returncode == 0:
            return []
        text = _ANSI.sub("", done.stderr).split("Stack backtrace:")[0]
        return [line.replace("file:///_stdin.ts", "cell").rstrip() for line in text.strip().splitlines()]


class DenoRuntime(Runtime):
    name = "typescript"

    def chdir_code(self, path: str) -> str:
        return f"Deno.chdir({json.dumps(path)});"

    display_name = "TypeScript"
    interrupt_restarts = True  # SIGINT kills deno's kernel and a message-mode interrupt wedges it
    ipc_transport = False  # "invalid host" for an IPC path
    flush_barrier = True  # about one cell in ten gets its result after idle

    def kernel_env(self, context: LaunchContext, env: Mapping[str, str]) -> dict[str, str]:
        return {"NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1", "DENO_NO_PROMPT": "1"}

    def env_code(self, env_vars: Mapping[str, str]) -> tuple[str, str]:
        values = json.dumps(dict(env_vars))
        setup = (
            f"{{ const n = {values}; (globalThis as any).__scalebox_saved_env = Object.fromEntries("
            "Object.keys(n).map((k) => [k, Deno.env.get(k)])); for (const [k, v] of Object.entries(n)) "
            "Deno.env.set(k, v); }"
        )
        restore = (
            "{ const s = (globalThis as any).__scalebox_saved_env || {}; for (const [k, v] of Object.entries(s)) "
            "{ if (v === undefined) Deno.env.delete(k); else Deno.env.set(k, v as string); } "
            "delete (globalThis as any).__scalebox_saved_env; }"
        )
        return setup, restore

    def cell_output(self, code: str = "") -> CellOutput:
        spec = self.store.spec(self.name) or {"argv": ["deno"]}
        return DenoOutput(str(spec["argv"][0]), code)


# ------------------------------------------------------------------------------------------------------ Java

_JAVA_RUNTIME_ERROR = re.compile(r"^(?P<cls>[\w.$]+), (?P<message>.*)$", re.DOTALL)


class JavaOutput(CellOutput):
    """Names runtime errors by their class and compile errors by the compiler's message; drops the display id
    that `display(...)` returns as the cell's value."""

    def __init__(self) -> None:
        self.display_ids: set[str] = set()

    def message(self, msg_type: str, content: dict[str, Any]) -> list[Message]:
        if msg_type == "display_data":
            self.display_ids.add(str(content.get("transient", {}).get("display_id", "")))
        if msg_type == "execute_result" and content.get("data", {}).get("text/plain") in self.display_ids:
            return []
        if msg_type != "error":
            return [(msg_type, content)]
        name, value = content.get("ename", ""), content.get("evalue", "")
        match = _JAVA_RUNTIME_ERROR.match(value)
        if name == "RuntimeException" and match:
            name, value = match["cls"].rsplit(".", 1)[-1], match["message"]
        elif name == "CompilationException":
            plain = [_ANSI.sub("", line).strip() for line in content.get("traceback", [])]
            messages = [line for line in plain if line and not line.startswith("|")]
            value = "; ".join(messages) or value
        return [("error", {**content, "ename": name, "evalue": value})]


class JavaRuntime(Runtime):
    name = "java"
    ipc_transport = False  # JeroMQ has no IPC transport
    display_name = "Java"

    def kernel_env(self, context: LaunchContext, env: Mapping[str, str]) -> dict[str, str]:
        # The JVM takes user.home from the passwd entry, not $HOME: point it (and ~/.m2) into the sandbox.
        # (jjava splits these options on spaces, so the path goes in as it is.)
        options = env.get("JJAVA_JVM_OPTS", "")
        return {"JJAVA_JVM_OPTS": f"{options} -Duser.home={context.home}".strip()}

    def cell_output(self, code: str = "") -> CellOutput:
        return JavaOutput()


# ------------------------------------------------------------------------------------------------------ Bash


class BashOutput(CellOutput):
    """A failed command becomes a `CommandError` naming its exit status and its last line of output (in the value;
    the traceback does not repeat output the cell already showed)."""

    def __init__(self) -> None:
        self.tail = ""

    def message(self, msg_type: str, content: dict[str, Any]) -> list[Message]:
        if msg_type == "stream":
            self.tail = (self.tail + content.get("text", ""))[-2000:]
        if msg_type == "error" and not content.get("ename"):
            status = str(content.get("evalue", "")).strip() or "?"
            lines = [line for line in self.tail.splitlines() if line.strip()]
            value = f"exit status {status}" + (f": {lines[-1]}" if lines else "")
            traceback = [f"CommandError: the last command exited with status {status}"]
            content = {**content, "ename": "CommandError", "evalue": value, "traceback": traceback}
        return [(msg_type, content)]


class BashRuntime(Runtime):
    name = "bash"

    def chdir_code(self, path: str) -> str:
        return f"cd {shlex.quote(path)}"

    display_name = "Bash"
    ipykernel_based = True

    def env_code(self, env_vars: Mapping[str, str]) -> tuple[str, str]:
        names = [k for k in env_vars if _ENV_NAME.match(k)]
        setup = "; ".join(
            f'__scalebox_old_{k}="${{{k}+set:${k}}}"; export {k}={shlex.quote(env_vars[k])}' for k in names
        )
        restore = "; ".join(
            f'if [ -n "$__scalebox_old_{k}" ]; then export {k}="${{__scalebox_old_{k}#set:}}"; else unset {k}; fi; '
            f"unset __scalebox_old_{k}"
            for k in names
        )
        return setup or ":", restore or ":"

    def cell_output(self, code: str = "") -> CellOutput:
        return BashOutput()
