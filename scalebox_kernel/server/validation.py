"""Checks at the server's edge, shared by REST and Connect: JSON depth, environment names, RPC request fields.

A request that fails one of them is refused with a message naming the field, before anything acts on it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from google.protobuf.message import Message

#: Deepest nesting of arrays and objects accepted in any JSON body (no request of the protocol needs more than 4).
MAX_JSON_DEPTH = 32
#: Environment names that can cross a sandbox's jail, which exports them by name through a shell.
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: The jail carries environment values in variables of this prefix, so a sandbox cannot have its own.
RESERVED_ENV_PREFIX = "__SCALEBOX_ENV_"
#: Linux refuses an environment string (`NAME=value`) longer than this (MAX_ARG_STRLEN): no command would start.
MAX_ENV_BYTES = 128 * 1024 - 1
#: Longest path and longest name in a path that Linux takes, in bytes.
PATH_MAX = 4096
NAME_MAX = 255
#: uint32 fields that the kernel holds in 16 bits (a terminal's size).
_UINT16_FIELDS = {"sandboxagent.PTY.Size": ("cols", "rows")}
#: Map fields of RPC requests whose keys are environment variable names.
_ENV_MAPS = {"envs", "env_vars"}

#: A JSON string; one left open runs to the end of the body (so that no quote is scanned from twice).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_ONE_KIND = bytes.maketrans(b"{}", b"[]")


class InvalidJson(ValueError):
    """A body that is not JSON, or is nested deeper than MAX_JSON_DEPTH."""


def json_depth_exceeds(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the brackets of `raw` (outside strings) nest deeper than `limit`, without parsing it.

    Each pass removes every innermost `[]`, so after `limit` passes only subtrees deeper than `limit` are left
    (or brackets that do not pair up, which the parser then rejects). All of it runs in C, at any body size."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    brackets = _JSON_STRING.sub(b"", raw).translate(_ONE_KIND, _NOT_BRACKET)
    for _ in range(limit):
        shorter = brackets.replace(b"[]", b"")
        if len(shorter) == len(brackets):
            break
        brackets = shorter
    return bool(brackets) and brackets.count(b"[") == brackets.count(b"]")


def load_json(raw: bytes, limit: int = MAX_JSON_DEPTH) -> Any:
    """`json.loads`, refusing bodies nested deeper than `limit` before parsing them (InvalidJson)."""
    if json_depth_exceeds(raw, limit):
        raise InvalidJson(f"request body nests arrays and objects deeper than {limit} levels")
    try:
        value = json.loads(raw)
    except RecursionError:  # only for brackets that do not pair up (and so escaped the count)
        raise InvalidJson(f"request body nests arrays and objects deeper than {limit} levels") from None
    except ValueError as exc:
        raise InvalidJson(f"request body is not valid JSON: {exc}") from None
    try:  # `"\ud800"` is valid JSON, but no text: it could be neither stored nor passed on
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise InvalidJson("request body has a string that is not valid Unicode (a lone surrogate)") from None
    return value


def range_problem(field: str, value: int | None, low: int, high: int, unit: str) -> str | None:
    """Why an integer field is out of its range, or None (also for a field not given)."""
    if value is None or low <= value <= high:
        return None
    shown = str(value) if len(str(value)) <= 40 else f"{str(value)[:20]}... ({len(str(value))} digits)"
    return f"{field} must be from {low} to {high} {unit} on this server, not {shown}"


def name_problem(field: str, value: str, chars: int) -> str | None:
    """Why a string cannot be a name: too long, or not printable (NUL bytes and control characters)."""
    if len(value) > chars or not value.isprintable():
        return f"{field} must be a name of at most {chars} printable characters"
    return None


def map_problem(field: str, value: Mapping[str, str], items: int, key_chars: int, value_chars: int) -> str | None:
    """Why a map of strings is too big (entries, key or value lengths) or holds NUL bytes, or None."""
    if len(value) > items:
        return f"{field} may have at most {items} entries, not {len(value)}"
    for key, item in value.items():
        if not key or len(key) > key_chars:
            return f"{field} keys must have 1 to {key_chars} characters, not {len(key)}"
        if len(item) > value_chars:
            return f"{field}.{key[:64]} may have at most {value_chars} characters, not {len(item)}"
        if "\x00" in key or "\x00" in item:
            return f"{field}.{key[:64]} must not contain NUL bytes"
    return None


def env_problem(field: str, envs: Mapping[str, str]) -> str | None:
    """Why `envs` cannot become a process's environment (a bad name, a NUL byte, too long), or None."""
    for name, value in envs.items():
        if not ENV_NAME.fullmatch(name):
            shown = json.dumps(name[:64])
            return (
                f"{field}: {shown} is not a valid environment variable name (a letter or _, then letters, digits or _)"
            )
        if name.startswith(RESERVED_ENV_PREFIX):
            return f"{field}: names starting with {RESERVED_ENV_PREFIX} are reserved for scalebox-local"
        if "\x00" in value:
            return f"{field}.{name} must not contain NUL bytes"
        if len(name) + 1 + len(value.encode("utf-8", "surrogatepass")) > MAX_ENV_BYTES:
            return f"{field}.{name} is longer than Linux allows ({MAX_ENV_BYTES} bytes with its name)"
    return None


def path_problem(path: str) -> str | None:
    """Why no file can have this path (a NUL byte, longer than Linux allows), or None."""
    if "\x00" in path:
        return "path must not contain NUL bytes"
    encoded = path.encode("utf-8", "surrogatepass")
    if len(encoded) > PATH_MAX:
        return f"path is longer than {PATH_MAX} bytes"
    if any(len(name) > NAME_MAX for name in encoded.split(b"/")):
        return f"a name in the path is longer than {NAME_MAX} bytes"
    return None


def request_problem(message: Message, prefix: str = "") -> str | None:
    """Why an RPC request cannot be acted on, naming the field: a NUL byte in any string (paths, commands,
    arguments, code, languages), a bad environment name, a number out of its range; None if it is fine."""
    for name in _UINT16_FIELDS.get(message.DESCRIPTOR.full_name, ()):
        value = getattr(message, name)
        if value > 0xFFFF:
            return f"{prefix}{name} must be at most 65535, not {value}"
    for field, value in message.ListFields():
        path = prefix + field.name
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            if field.name in _ENV_MAPS:
                problem = env_problem(path, value)
                if problem:
                    return problem
            for key, item in value.items():
                problem = _value_problem(f"{path}[{json.dumps(str(key))[:40]}]", key) or _value_problem(
                    f"{path}.{key}", item
                )
                if problem:
                    return problem
        elif field.is_repeated:
            for index, item in enumerate(value):
                problem = _value_problem(f"{path}[{index}]", item)
                if problem:
                    return problem
        else:
            problem = _value_problem(path, value)
            if problem:
                return problem
    return None


def _value_problem(path: str, value: Any) -> str | None:
    if isinstance(value, str):
        return f"{path} must not contain NUL bytes" if "\x00" in value else None
    if isinstance(value, Message):
        return request_problem(value, path + ".")
    return None
