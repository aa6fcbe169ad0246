"""`-i` / `-o`: moving values between the local namespace and a sandbox context.

Python <-> Python uses pickle (base64 inside run_code, in chunks); other languages get JSON (tables as records).
Unpickling runs code, so values coming back (`-o`) from a sandbox are trusted like the code that made them;
set `ScaleboxMagics.pickle_outputs = False` to accept JSON only.
"""

from __future__ import annotations

import base64
import json
import pickle
import shlex
from typing import Any

from ..errors import ScaleboxError
from ..session import SandboxSession

CHUNK = 4 * 1024 * 1024  # characters of base64 per run_code (well below the server's request limit)


class TransferError(ScaleboxError):
    """A value could not be moved between the shell and the sandbox (too large, not serialisable, ...)."""


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


def _print_json(language: str, name: str) -> str:
    if language in ("nodejs", "typescript"):
        return f"console.log(JSON.stringify({name}))"
    if language == "r":
        return f'cat(jsonlite::toJSON({name}, auto_unbox = TRUE, digits = NA, dataframe = "rows"))'
    if language == "bash":
        return f'printf "%s" "${{{name}}}" | python3 -c "import json,sys; print(json.dumps(sys.stdin.read()))"'
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


_PY_DUMP = """\
def __scalebox_dump(value, use_pickle):
    import base64, json, pickle
    if not use_pickle:
        return "j" + json.dumps(value)
    return "p" + base64.b64encode(pickle.dumps(value, protocol=4)).decode()
__scalebox_out = __scalebox_dump({name}, {use_pickle})
del __scalebox_dump
print(len(__scalebox_out))
"""


async def receive(session: SandboxSession, name: str, language: str, *, limit_mb: float, use_pickle: bool) -> Any:
    """The value of `name` in the sandbox context of `language`."""
    what = f"Fetching {name}"
    if language != "python":
        text = (await _run(session, _print_json(language, name), language, what)).strip()
        _check_size(name, len(text.encode()), limit_mb, "out of the sandbox")
        try:
            return json.loads(text)
        except ValueError:
            raise TransferError(f"{name} did not come back as JSON: {text[:200]!r}") from None
    size = int((await _run(session, _PY_DUMP.format(name=name, use_pickle=use_pickle), language, what)).strip())
    try:
        payload = size * 3 // 4 if use_pickle else size
        _check_size(name, payload, limit_mb, "out of the sandbox")
        parts = []
        for start in range(0, size, CHUNK):
            code = f"print(__scalebox_out[{start}:{start + CHUNK}], end='')"
            parts.append(await _run(session, code, language, what))
    finally:
        await _run(session, "del __scalebox_out", language, what)
    encoded = "".join(parts)
    if encoded.startswith("j"):
        return json.loads(encoded[1:])
    try:
        return pickle.loads(base64.b64decode(encoded[1:]))
    except Exception as exc:
        raise TransferError(f"Cannot unpickle {name} here: {type(exc).__name__}: {exc}") from None
