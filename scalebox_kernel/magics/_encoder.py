"""The sandbox half of `-o`: its source is sent to the sandbox, which runs it to write one value to a file in a
typed, safe format (`_formats.decode` reads it here, trusting none of it).

It runs on the sandbox's Python (any 3.8+), so it imports nothing of ours, and it takes numpy and pandas from
`sys.modules`: a value can only be an array or a DataFrame if its module is already imported.
"""

from __future__ import annotations

import io
import json
import sys
from typing import Any

MAGIC = b"scalebox-transfer/1 "
NO_SAFE_FORMAT = (
    "-o brings back what JSON holds, bytes, numpy arrays and scalars, and pandas DataFrames and Series; "
    "convert the value, or pass --unsafe-pickle to accept a pickle (unpickling runs code the sandbox chooses on "
    "your machine)"
)


def write_value(value: Any, path: str, allow_pickle: bool, arrow: bool) -> None:
    """Write `value` to `path` as the header line (`MAGIC` + JSON with its format) and the payload."""
    meta, body = encode(value, allow_pickle, arrow)
    with open(path, "wb") as out:
        out.write(MAGIC + json.dumps(meta).encode() + b"\n" + body)


def encode(value: Any, allow_pickle: bool, arrow: bool) -> tuple[dict[str, Any], bytes]:
    if allow_pickle:
        import pickle

        return {"format": "pickle"}, pickle.dumps(value, protocol=4)
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(value, (pd.DataFrame, pd.Series)):
        return encode_pandas(value, pd, arrow)
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, (np.ndarray, np.generic)):
        return encode_numpy(value, np)
    if isinstance(value, (bytes, bytearray)):
        return {"format": "bytes"}, bytes(value)
    try:
        text = json.dumps(value, default=plain)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"a value of type {type(value).__name__} has no safe format ({exc}): {NO_SAFE_FORMAT}"
        ) from None
    return {"format": "json"}, text.encode()


def plain(value: Any) -> Any:
    """numpy scalars inside a JSON value become Python numbers; anything else is not JSON."""
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.generic) and not value.dtype.hasobject:
        return value.item()
    raise TypeError(f"it holds a {type(value).__name__}, which is not JSON")


def encode_numpy(value: Any, np: Any) -> tuple[dict[str, Any], bytes]:
    array = np.asarray(value)
    if array.dtype.hasobject:
        raise TypeError(
            f"a numpy array of dtype {array.dtype} holds Python objects, which .npy carries only as a "
            f"pickle: {NO_SAFE_FORMAT}"
        )
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return {"format": "npy", "scalar": isinstance(value, np.generic)}, buffer.getvalue()


def label(value: Any) -> Any:
    """A column label or index name as JSON (tuples as lists), or a TypeError naming it."""
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, tuple):
        return [label(part) for part in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(
        f"the label {value!r} is a {type(value).__name__}; the JSON table format keeps labels that are "
        f"str, numbers, bool, None or tuples of them: rename it, or {NO_SAFE_FORMAT}"
    )


def encode_pandas(value: Any, pd: Any, arrow: bool) -> tuple[dict[str, Any], bytes]:
    """Arrow IPC when pyarrow is here and there, else pandas' JSON table; column labels (of any type, repeated or
    not) and the index's freq go in the header, the columns travel named c0, c1, ..."""
    kind = "Series" if isinstance(value, pd.Series) else "DataFrame"
    meta: dict[str, Any] = {"kind": kind, "rows": len(value), "freq": getattr(value.index, "freqstr", None)}
    if kind == "Series":
        meta["labels"] = [label(value.name)]
    else:
        meta["labels"] = [label(name) for name in value.columns]
        meta["columns"] = {
            "multi": isinstance(value.columns, pd.MultiIndex),
            "names": [label(name) for name in value.columns.names],
            "dtype": str(value.columns.dtype),
        }
    if arrow:
        try:
            import pyarrow as pa
        except ImportError:
            pass
        else:
            frame = value.to_frame() if kind == "Series" else value
            frame = frame.set_axis([f"c{position}" for position in range(frame.shape[1])], axis=1)
            table = pa.Table.from_pandas(frame)
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            return {"format": "arrow", **meta}, sink.getvalue().to_pybytes()
    return encode_table(value, kind, pd, meta)


def encode_table(value: Any, kind: str, pd: Any, meta: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """pandas' JSON table format, made exact where it is not: the index levels and the columns travel as columns
    c0, c1, ... with their dtypes in the header; float, datetime and timedelta values as the integers of their
    bits (JSON decimals round, and the reader refuses timedeltas)."""
    index = value.index
    meta = {"format": "pandas-table", **meta}
    parts = []
    if isinstance(index, pd.RangeIndex):
        meta["range"] = [int(index.start), int(index.stop), int(index.step)]
        meta["index"] = {"name": label(index.name)}
    else:
        meta["levels"] = [{"name": label(name)} for name in index.names]
        parts += [index.get_level_values(level) for level in range(index.nlevels)]
    parts += [value] if kind == "Series" else [value.iloc[:, position] for position in range(value.shape[1])]
    np = sys.modules["numpy"]  # pandas imports it
    specs, flat = [], {}
    for position, part in enumerate(parts):
        dtype = part.dtype
        bits = isinstance(dtype, np.dtype) and dtype.kind in "fmM" and dtype.isnative and dtype.itemsize in (2, 4, 8)
        specs.append({"dtype": str(dtype), "bits": bits})
        data = part.to_numpy().view(f"i{dtype.itemsize}") if bits else part.array
        flat[f"c{position}"] = pd.Series(data, copy=False)
    meta["specs"] = specs
    text = pd.DataFrame(flat).to_json(orient="table", index=False, date_format="iso", date_unit="ns")
    return meta, text.encode()
