"""Reading a value that `-o` brought out of a sandbox: a typed header, then a payload in one safe format.

The sandbox controls every byte, so this reads only with parsers that cannot run code (json, numpy's .npy reader
without pickle, pandas' JSON table reader, Arrow IPC), checks each payload against its header, and raises
TransferError for anything else. Pickle is read only when the caller passes `allow_pickle` (`--unsafe-pickle`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import io
import json
import pickle
import re
from collections.abc import Callable
from typing import Any

from ..errors import ScaleboxError
from ._encoder import MAGIC

HEADER_MAX = 1024 * 1024  # bytes of header JSON (labels and dtypes of a wide DataFrame)
UNSAFE = "unpickling runs whatever code the sandbox chose, on this machine"
#: Arrow IPC readers before 14.0.1 unpickle `PyExtensionType` columns (CVE-2023-47248).
ARROW_MIN = (14, 0, 1)


class TransferError(ScaleboxError):
    """A value could not be moved between the shell and the sandbox (too large, not serialisable, malformed)."""


def arrow_here() -> bool:
    """Whether a pyarrow that reads IPC without unpickling is installed here (found without importing it)."""
    if importlib.util.find_spec("pyarrow") is None:
        return False
    try:
        version = importlib.metadata.version("pyarrow")
    except importlib.metadata.PackageNotFoundError:
        return False
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:3])
    return parts >= ARROW_MIN


def decode(data: bytes, name: str, *, allow_pickle: bool = False) -> Any:
    """The value in `data` (header line + payload), read only in the format its header declares."""
    if not data.startswith(MAGIC):
        raise _malformed(name, f"it does not start with the transfer header (it starts {data[:32]!r})")
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + HEADER_MAX)
    if end < 0:
        raise _malformed(name, "its header line does not end")
    try:
        meta = json.loads(data[len(MAGIC) : end])
    except (ValueError, RecursionError):
        raise _malformed(name, "its header is not JSON") from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    reader = READERS.get(fmt) if isinstance(fmt, str) else None
    if reader is None:
        raise _malformed(name, f"its header names no known format ({str(fmt)[:40]!r})")
    if fmt == "pickle" and not allow_pickle:
        raise TransferError(
            f"The sandbox sent {name} as a pickle, which -o refuses: {UNSAFE}. If you trust everything that ran in "
            "this sandbox, run the cell again with --unsafe-pickle; otherwise return JSON, arrays or DataFrames."
        )
    body = data[end + 1 :]
    try:
        return reader(body, meta)
    except TransferError as exc:
        raise _malformed(name, f"its {fmt} payload {exc}") from None
    except Exception as exc:  # any failure of a parser on hostile bytes is a malformed payload, nothing more
        raise _malformed(name, f"its {fmt} payload does not parse ({type(exc).__name__}: {str(exc)[:200]})") from None


def _malformed(name: str, why: str) -> TransferError:
    return TransferError(f"{name} came back from the sandbox malformed: {why}. Nothing of it was used.")


def _json(body: bytes, meta: dict[str, Any]) -> Any:
    return json.loads(body.decode("utf-8"))


def _text(body: bytes, meta: dict[str, Any]) -> str:
    return body.decode("utf-8")


def _bytes(body: bytes, meta: dict[str, Any]) -> bytes:
    return body


def _pickle(body: bytes, meta: dict[str, Any]) -> Any:
    return pickle.loads(body)  # only reached with allow_pickle (--unsafe-pickle)


def _npy(body: bytes, meta: dict[str, Any]) -> Any:
    _need("numpy")
    from numpy.lib import format as npy

    buffer = io.BytesIO(body)
    version = npy.read_magic(buffer)
    if version in ((1, 0), (2, 0)):  # check the size before numpy allocates what the header claims
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, _, dtype = read_header(buffer)
        if dtype.hasobject:
            raise TransferError(f"has dtype {dtype}, which holds Python objects (only pickle carries those)")
        expected = dtype.itemsize
        for size in shape:
            expected *= size
        if len(body) - buffer.tell() != expected:
            raise TransferError(f"holds {len(body) - buffer.tell()} bytes of data, not the {expected} its header says")
        buffer.seek(0)
    try:
        array = npy.read_array(buffer, allow_pickle=False)
    except ValueError as exc:
        raise TransferError(f"is refused: {exc}") from None
    if buffer.tell() != len(body):
        raise TransferError("has bytes after the array")
    if meta.get("scalar") is True:
        if array.ndim != 0:
            raise TransferError("claims a scalar but holds an array")
        return array[()]
    return array


def _arrow(body: bytes, meta: dict[str, Any]) -> Any:
    if not arrow_here():
        raise TransferError("needs pyarrow >= 14.0.1 here; install it, or have the sandbox send the JSON table")
    import pyarrow as pa

    table = pa.ipc.open_stream(pa.py_buffer(body)).read_all()
    table.validate(full=True)  # Arrow's advice for IPC from an untrusted source
    _no_tz_files(table.schema.to_string(show_schema_metadata=True, truncate_metadata=False))
    frame = table.to_pandas()
    if len(frame) != meta.get("rows"):
        raise TransferError("has another number of rows than its header says")
    return _labelled(frame, meta)


def _labelled(frame: Any, meta: dict[str, Any]) -> Any:
    """The DataFrame or Series the header describes, from a frame with columns c0, c1, ... and the right index."""
    pd = _need("pandas")
    labels = [_label(label) for label in _list(meta, "labels")]
    if list(frame.columns) != [f"c{position}" for position in range(len(labels))]:
        raise TransferError("has other columns than its header says")
    freq = meta.get("freq")
    if isinstance(freq, str) and isinstance(frame.index, pd.DatetimeIndex | pd.TimedeltaIndex):
        frame.index = type(frame.index)(frame.index, freq=freq)  # checked against the values
    if _kind(meta) == "Series":
        if len(labels) != 1:
            raise TransferError("claims a Series but holds several columns")
        return frame.iloc[:, 0].rename(labels[0])
    frame.columns = _columns(pd, labels, meta)
    return frame


def _kind(meta: dict[str, Any]) -> str:
    kind = meta.get("kind")
    if kind not in ("DataFrame", "Series"):
        raise TransferError(f"names no known kind ({str(kind)[:40]!r})")
    return str(kind)


def _no_tz_files(text: str) -> None:
    """Refuse `dateutil/PATH` time zones anywhere in a schema: pandas would open PATH here as a tz file."""
    if "dateutil" in text.lower():
        raise TransferError("names a dateutil time zone (read from a file), which is refused")


def _label(value: Any) -> Any:
    """A label from the header: JSON lists stand for tuples (labels must be hashable)."""
    if isinstance(value, list):
        return tuple(_label(part) for part in value)
    if isinstance(value, dict):
        raise TransferError("has a label that is a JSON object")
    return value


def _table(body: bytes, meta: dict[str, Any]) -> Any:
    """pandas' JSON table with the header's labels and dtypes put back (see `_encoder.encode_table`)."""
    pd = _need("pandas")
    text = body.decode("utf-8")
    if re.search(r"(?i)dateutil|\\u", text):  # it may name a tz file, perhaps in escapes: look at the schema
        table = json.loads(text)
        schema = table.get("schema") if isinstance(table, dict) else None
        _no_tz_files(json.dumps(schema))
    flat = pd.read_json(io.StringIO(text), orient="table", precise_float=True)
    specs = _list(meta, "specs")
    if list(flat.columns) != [f"c{position}" for position in range(len(specs))]:
        raise TransferError("has other columns than its header says")
    rows = meta.get("rows")
    if not isinstance(rows, int) or (specs and len(flat) != rows):
        raise TransferError("has another number of rows than its header says")
    parts = [_restore(flat[f"c{position}"], spec) for position, spec in enumerate(specs)]
    if "range" in meta:
        bounds = meta["range"]
        if not (isinstance(bounds, list) and len(bounds) == 3 and all(type(b) is int for b in bounds)):
            raise TransferError("has a malformed range index")
        index = pd.RangeIndex(*bounds, name=_label(_dict(meta, "index").get("name")))
        if len(index) != rows:
            raise TransferError("has a range index of another length than its rows")
    else:
        levels = _list(meta, "levels")
        if not levels or len(levels) > len(parts):
            raise TransferError("has a malformed index")
        arrays, parts = parts[: len(levels)], parts[len(levels) :]
        index = pd.Index(arrays[0]) if len(arrays) == 1 else pd.MultiIndex.from_arrays(arrays)
        index = index.set_names([_label(level.get("name") if isinstance(level, dict) else None) for level in levels])
    frame = pd.concat(parts, axis=1, ignore_index=True) if parts else pd.DataFrame(index=range(rows))
    frame.index = index
    frame.columns = [f"c{position}" for position in range(len(parts))]
    return _labelled(frame, meta)


def _restore(column: Any, spec: Any) -> Any:
    """A column with its sandbox dtype again: from the integers of its bits, or cast back to its exact width."""
    np = _need("numpy")
    pd = _need("pandas")
    if not isinstance(spec, dict) or not isinstance(spec.get("dtype"), str):
        raise TransferError("has a malformed column spec")
    _no_tz_files(spec["dtype"])
    target = pd.api.types.pandas_dtype(spec["dtype"])
    if spec.get("bits") is True:
        ints = column.to_numpy()
        if not (isinstance(target, np.dtype) and target.kind in "fmM" and target.isnative and ints.dtype.kind == "i"):
            raise TransferError(f"has a bits column that cannot be {spec['dtype']}")
        return pd.Series(ints.astype(f"i{target.itemsize}").view(target))
    exact = isinstance(target, np.dtype) and target.kind in "biuMO"
    if (exact or isinstance(target, pd.DatetimeTZDtype)) and column.dtype != target:
        return column.astype(target)
    return column


def _columns(pd: Any, labels: list[Any], meta: dict[str, Any]) -> Any:
    info = _dict(meta, "columns")
    names = [_label(name) for name in info.get("names") or [None]]
    if info.get("multi") is True:
        return pd.MultiIndex.from_tuples(labels, names=names)
    dtype = info.get("dtype")
    if isinstance(dtype, str):
        _no_tz_files(dtype)
    return pd.Index(labels, dtype=pd.api.types.pandas_dtype(dtype) if isinstance(dtype, str) else None, name=names[0])


def _list(meta: dict[str, Any], key: str) -> list[Any]:
    value = meta.get(key)
    if not isinstance(value, list):
        raise TransferError(f"has no {key} list in its header")
    return value


def _dict(meta: dict[str, Any], key: str) -> dict[str, Any]:
    value = meta.get(key)
    if not isinstance(value, dict):
        raise TransferError(f"has no {key} object in its header")
    return value


def _need(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TransferError(f"needs {module}, which is not installed here") from None


READERS: dict[str, Callable[[bytes, dict[str, Any]], Any]] = {
    "json": _json,
    "text": _text,
    "bytes": _bytes,
    "npy": _npy,
    "pandas-table": _table,
    "arrow": _arrow,
    "pickle": _pickle,
}
