"""`-i` / `-o`: moving values between the local namespace and a sandbox context.

In (`-i`): pickle for Python (base64 inside run_code, in chunks; the sandbox runs the user's code anyway), JSON
for other languages. Out (`-o`): the sandbox writes the value to a file with a random name under /tmp, in a typed
safe format (`_encoder`); it is downloaded through the files API, deleted, and read by `_formats.decode`, which
runs nothing the sandbox sent. Pickle comes back only with `--unsafe-pickle`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import pickle
import secrets
import shlex
from functools import cache
from pathlib import Path
from typing import Any

from ..client import FileType
from ..errors import NotFound, SandboxNotFound, ScaleboxError
from ..session import SandboxSession
from ._encoder import MAGIC
from ._formats import TransferError, arrow_here, decode

__all__ = ["TransferError", "receive", "send"]

CHUNK = 4 * 1024 * 1024  # characters of base64 per run_code (well below the server's request limit)
OUT_DIR = "/tmp"


def _mb(size: int) -> str:
    return f"{size / 1024 / 1024:.1f} MB"


def _check_size(name: str, size: int, limit_mb: float, direction: str) -> None:
    if size > limit_mb * 1024 * 1024:
        raise TransferError(
            f"{name} is {_mb(size)} serialised, more than the {limit_mb:g} MB allowed {direction}; "
            "write it to a file and use %scalebox upload/download, or raise ScaleboxMagics.max_transfer_mb."
        )


def _json_of(value: Any) -> str:
    try:
        import pandas as pd

        if isinstance(value, pd.DataFrame):
            return str(value.to_json(orient="records", date_format="iso"))
        if isinstance(value, pd.Series):
            return str(value.to_json(date_format="iso"))
    except ImportError:
        pass
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise TransferError(f"Cannot send a {type(value).__name__} to this language as JSON: {exc}") from None


def _assign_json(language: str, name: str, text: str) -> str:
    literal = json.dumps(text)  # a JSON string literal is also a valid JS, TS and R string literal
    if language in ("nodejs", "typescript"):
        return f"var {name} = JSON.parse({literal});"
    if language == "r":
        return f"{name} <- jsonlite::fromJSON({literal})"
    if language == "bash":
        value = json.loads(text)
        if isinstance(value, dict | list):
            raise TransferError("Bash variables hold text: send a string or a number.")
        return f"{name}={shlex.quote(str(value))}"
    raise TransferError(f"-i/-o are not available for {language}.")


@cache
def _encoder_source() -> str:
    return (Path(__file__).parent / "_encoder.py").read_text(encoding="utf-8")


def _header(fmt: str) -> str:
    return MAGIC.decode() + json.dumps({"format": fmt}) + "\n"


def _write_out(language: str, name: str, path: str, *, allow_pickle: bool) -> str:
    """Code that makes the sandbox write `name` to `path` (see `_encoder` for Python)."""
    if language == "python":
        return (
            "__scalebox_ns = {}\n"
            "try:\n"
            f"    exec({_encoder_source()!r}, __scalebox_ns)\n"
            f"    __scalebox_ns['write_value']({name}, {path!r}, {allow_pickle!r}, {arrow_here()!r})\n"
            "finally:\n"
            "    del __scalebox_ns\n"
        )
    if language in ("nodejs", "typescript"):  # tslab's Node.js, Deno's TypeScript
        write = (
            f"Deno.writeTextFileSync({path!r}, text)"
            if language == "typescript"
            else (f"require('fs').writeFileSync({path!r}, text)")
        )
        return (
            f"(() => {{ const json = JSON.stringify({name}); "
            f"if (json === undefined) {{ throw new TypeError('{name} has no JSON form'); }} "
            f"const text = {json.dumps(_header('json'))} + json; {write}; }})();"
        )
    if language == "r":
        return (
            f"local({{ text <- enc2utf8(paste0({json.dumps(_header('json'))}, jsonlite::toJSON({name}, "
            f'auto_unbox = TRUE, digits = NA, dataframe = "rows"))); writeBin(charToRaw(text), {json.dumps(path)}); '
            "invisible(NULL) })"
        )
    if language == "bash":
        form = _header("text").replace("\n", "\\n") + "%s"  # one line: printf's format makes the newline
        return f'printf {shlex.quote(form)} "${{{name}}}" > {shlex.quote(path)}'
    raise TransferError(f"-i/-o are not available for {language}.")


async def _run(session: SandboxSession, code: str, language: str, what: str) -> str:
    execution = await session.run_code(code, language=language)
    if execution.error is not None:
        raise TransferError(f"{what} failed in the sandbox: {execution.error.name}: {execution.error.value}")
    return "".join(execution.logs.stdout)


async def send(
    session: SandboxSession, name: str, value: Any, language: str, *, limit_mb: float, use_pickle: bool
) -> None:
    """Set `name` in the sandbox context of `language` to `value`."""
    what = f"Sending {name}"
    if language == "python" and use_pickle:
        try:
            data = pickle.dumps(value, protocol=4)
        except Exception as exc:
            raise TransferError(f"Cannot pickle {name} ({type(value).__name__}): {exc}") from None
        _check_size(name, len(data), limit_mb, "into the sandbox")
        encoded = base64.b64encode(data).decode()
        if len(encoded) <= CHUNK:
            loader = repr(encoded)
        else:
            await _run(session, "__scalebox_in = []", language, what)
            for start in range(0, len(encoded), CHUNK):
                await _run(session, f"__scalebox_in.append({encoded[start : start + CHUNK]!r})", language, what)
            loader = '"".join(__scalebox_in)'
        code = (
            "import base64 as __scalebox_b64, pickle as __scalebox_pickle\n"
            f"{name} = __scalebox_pickle.loads(__scalebox_b64.b64decode({loader}))\n"
            "del __scalebox_b64, __scalebox_pickle\n"
        )
        if loader != repr(encoded):
            code += "del __scalebox_in\n"
        await _run(session, code, language, what)
        return
    text = _json_of(value)
    _check_size(name, len(text.encode()), limit_mb, "into the sandbox")
    if language == "python":
        await _run(
            session, f"import json as __scalebox_json\n{name} = __scalebox_json.loads({text!r})\n", language, what
        )
        return
    await _run(session, _assign_json(language, name, text), language, what)


async def receive(session: SandboxSession, name: str, language: str, *, limit_mb: float, allow_pickle: bool) -> Any:
    """The value of `name` in the sandbox context of `language`, moved out of band and read by a safe format
    (a pickle only with `allow_pickle`, for Python)."""
    allow_pickle = allow_pickle and language == "python"
    path = f"{OUT_DIR}/.scalebox-out-{secrets.token_hex(16)}"
    try:
        await _run(session, _write_out(language, name, path, allow_pickle=allow_pickle), language, f"Fetching {name}")
        data = await _fetch(session, name, path, limit_mb)
    finally:
        with contextlib.suppress(ScaleboxError):
            await session.sandbox.files.remove(path)
    return decode(data, name, allow_pickle=allow_pickle)


async def _fetch(session: SandboxSession, name: str, path: str, limit_mb: float) -> bytes:
    """The file's bytes, refused by its size before it is downloaded."""
    try:
        entry = await session.sandbox.files.get_info(path)
    except SandboxNotFound:
        raise
    except NotFound:
        entry = None
    if entry is None or entry.type != FileType.FILE:
        raise TransferError(f"The sandbox wrote no value for {name}; nothing came back.")
    _check_size(name, entry.size, limit_mb, "out of the sandbox")
    data = (await session.download([path]))[path]
    _check_size(name, len(data), limit_mb, "out of the sandbox")  # the file may have grown since
    return data
