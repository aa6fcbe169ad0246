"""`%%scalebox -o` against a real scalebox-local: values come back in safe formats only (JSON, .npy, pandas'
JSON table), pickles only with --unsafe-pickle, and a sandbox that forges what it returns gets a TransferError,
never its code run here."""

from __future__ import annotations

import io
import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import LocalServer
from IPython.core.interactiveshell import InteractiveShell
from magics_support import magics, ok, run

MAGIC = b"scalebox-transfer/1 "

# Built the same way here and in the sandbox, to compare what came back with what was meant.
FRAME = """\
import numpy as np, pandas as pd
frame = pd.DataFrame(
    {
        "count": np.array([3, 1, 2], dtype="int32"),
        "share": [0.1, 1 / 3, np.nan],
        "small": np.array([1.5, 2.25, -0.0], dtype="float32"),
        "flag": [True, False, True],
        "label": pd.array(["a", "b", None], dtype="str"),
        "when": pd.to_datetime(["2024-01-01 00:00:00", "2024-02-29 12:34:56.789012", None], format="ISO8601"),
        "zoned": pd.date_range("2024-03-31", periods=3, freq="h", tz="Europe/Paris"),
        "kind": pd.Categorical(["x", "y", "x"]),
        "took": pd.to_timedelta([1.5, None, 3], unit="s"),
        "maybe": pd.array([1, None, 3], dtype="Int64"),
        7: ["int", "label", "too"],
    },
    index=pd.Index(["r1", "r2", "r3"], name="row"),
)
multi = frame[["count", "share"]].set_axis(pd.MultiIndex.from_tuples([("a", 1), ("b", 2), ("b", 3)], names=["k", "n"]))
series = pd.Series([2.5, -1.0], index=pd.date_range("2024-01-01", periods=2, name="day"), name="temperature")
arrays = [
    np.arange(24, dtype="int16").reshape(2, 3, 4),
    np.linspace(0, 1, 7),
    np.array([[True, False]]),
    np.array(["ab", "c"]),
    np.zeros((0, 3), dtype="uint8"),
    np.asfortranarray(np.eye(3, dtype="complex64")),
    np.array(["2024-01-01", "NaT"], dtype="M8[s]"),
    np.array([(1, 2.5)], dtype=[("id", "i4"), ("x", "f8")]),
]
"""
ARRAY_NAMES = [f"a{i}" for i in range(8)]

# An earlier cell of a hostile sandbox: whatever -o writes under /tmp, or prints, or pickles or dumps as JSON
# from the transfer code, becomes the bytes in EVIL[0].
RIG = """\
import builtins, io, json, pickle, sys
EVIL = [b""]
_open, _dumps, _json_dumps = builtins.open, pickle.dumps, json.dumps

def _rigged_open(file, mode="r", *args, **kwargs):
    if isinstance(file, str) and file.startswith("/tmp/") and "w" in mode:
        with _open(file, "wb") as out:
            out.write(EVIL[0])
        return io.BytesIO()
    return _open(file, mode, *args, **kwargs)

def _rigged_json_dumps(*args, **kwargs):  # only for the transfer code: the kernel itself speaks JSON
    if "write_value" in sys._getframe(1).f_globals:
        return EVIL[0].decode("latin-1")
    return _json_dumps(*args, **kwargs)

builtins.open = _rigged_open
builtins.print = lambda *args, **kwargs: sys.stdout.write(EVIL[0].decode("latin-1"))
pickle.dumps = lambda *args, **kwargs: EVIL[0]
json.dumps = _rigged_json_dumps
"""


class Exploit:
    """Unpickling this creates the marker file: proof that the sandbox's code ran here."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('sandbox code ran here')",))


@pytest.fixture(scope="module")
def shell(local_server: LocalServer) -> Iterator[InteractiveShell]:
    saved = dict(os.environ)
    os.environ.update(local_server.env())
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "scalebox_kernel")
    try:
        yield ip
    finally:
        magics().at_exit()
        ip.run_line_magic("unload_ext", "scalebox_kernel")
        os.environ.clear()
        os.environ.update(saved)


def refused(ip: InteractiveShell, code: str) -> str:
    """Run a cell whose -o must fail with TransferError; its message."""
    result, captured = run(ip, code)
    assert type(result.error_in_exec).__name__ == "TransferError", (code, result.error_in_exec, captured.stdout)
    return captured.stdout


# ---------------------------------------------------------------------------------------------- round trips


def test_values_round_trip_by_safe_formats(shell: InteractiveShell) -> None:
    names = ["frame", "multi", "series", *ARRAY_NAMES]
    ok(shell, f"%%scalebox -o {' '.join(names)}\n{FRAME}\nfor i, a in enumerate(arrays): globals()[f'a{{i}}'] = a")
    meant: dict[str, Any] = {}
    exec(FRAME, meant)
    ns = shell.user_ns
    pd.testing.assert_frame_equal(ns["frame"], meant["frame"], check_exact=True)
    pd.testing.assert_frame_equal(ns["multi"], meant["multi"], check_exact=True)
    pd.testing.assert_series_equal(ns["series"], meant["series"], check_exact=True)
    assert ns["frame"]["share"].iloc[1] == 1 / 3  # floats travel as their bits, not as rounded decimals
    for name, array in zip(ARRAY_NAMES, meant["arrays"], strict=True):
        back = ns[name]
        assert type(back) is np.ndarray and back.dtype == array.dtype and back.shape == array.shape, name
        np.testing.assert_array_equal(back, array)
    assert ns["a5"].flags.f_contiguous
    cell = (
        "number, text, nested = 42, 'héllo', {'a': [1, 2.5, None, True], 'b': {'c': 'd'}}\n"
        "scalar, raw, pair, keyed = np.float32(0.25), b'\\x00\\xff', (1, 2), {1: 'one'}"
    )
    ok(shell, f"%%scalebox -o number text nested scalar raw pair keyed\n{cell}")
    assert (ns["number"], ns["text"]) == (42, "héllo")
    assert ns["nested"] == {"a": [1, 2.5, None, True], "b": {"c": "d"}}
    assert type(ns["scalar"]) is np.float32 and ns["scalar"] == 0.25
    assert ns["raw"] == b"\x00\xff"
    assert (ns["pair"], ns["keyed"]) == ([1, 2], {"1": "one"})  # what JSON cannot keep: tuples, non-str keys


def test_unsafe_values_need_the_flag(shell: InteractiveShell) -> None:
    define = "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n"
    ok(shell, define)  # the class exists on both sides, as pickle needs
    text = refused(shell, f"%%scalebox -o point\n{define}point = Point(1, 2)")
    assert "no safe format" in text and "--unsafe-pickle" in text and "point" not in shell.user_ns
    text = refused(shell, "%%scalebox -o objects\nimport numpy as np\nobjects = np.array([{}, []], dtype=object)")
    assert "dtype object" in text and "--unsafe-pickle" in text
    ok(shell, "%%scalebox -o point objects --unsafe-pickle\npoint.x += 10")
    point = shell.user_ns["point"]
    assert type(point).__name__ == "Point" and (point.x, point.y) == (11, 2)
    assert shell.user_ns["objects"].dtype == object
    result, captured = run(shell, "%%scalebox --unsafe-pickle\n1")
    assert not result.success and "--unsafe-pickle applies to -o" in captured.stderr


def test_other_languages_come_back_as_json(shell: InteractiveShell) -> None:
    ok(shell, "%%scalebox --language r -o rv\nrv <- list(n = 3, xs = c(1.5, 2), df = data.frame(a = 1:2, b = 'x'))")
    assert shell.user_ns["rv"] == {"n": 3, "xs": [1.5, 2], "df": [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]}
    ok(shell, "%%scalebox --language nodejs -o jv\nconst jv = {n: 1, list: [true, null, 'é']};")
    assert shell.user_ns["jv"] == {"n": 1, "list": [True, None, "é"]}
    ok(shell, "%%scalebox --language typescript -o tv\nconst tv: number[] = [1, 2, 3];")
    assert shell.user_ns["tv"] == [1, 2, 3]
    ok(shell, '%%scalebox --language bash -o bv\nbv="two words"')
    assert shell.user_ns["bv"] == "two words"
    text = refused(shell, "%%scalebox --language nodejs -o fn\nconst fn = () => 1;")
    assert "no JSON form" in text


# ---------------------------------------------------------------------------------------------- a hostile sandbox


def framed(meta: Any, body: bytes) -> bytes:
    """A reply with a well-formed header line."""
    return MAGIC + json.dumps(meta).encode() + b"\n" + body


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def forged(marker: Path) -> dict[str, bytes]:
    """Replies a hostile sandbox can give instead of its value, each one carrying or claiming code to run here."""
    exploit = pickle.dumps(Exploit(marker), protocol=4)
    ints = npy(np.arange(1000))
    table = pd.DataFrame({"c0": [1]}).to_json(orient="table", index=False)
    tz_file = table.replace('"type":"integer"', '"type":"datetime","tz":"dateutil\\/\\/etc\\/passwd"')
    table_meta = {"format": "pandas-table", "kind": "DataFrame", "labels": ["x"], "rows": 1, "range": [0, 1, 1]}
    table_meta |= {"index": {"name": None}, "columns": {"multi": False, "names": [None]}}
    tz_dtype = "datetime64[ns, dateutil//etc/passwd]"
    return {
        "a bare pickle": exploit,
        "a pickle under a pickle header": framed({"format": "pickle"}, exploit),
        "a pickle claiming to be JSON": framed({"format": "json"}, exploit),
        "a pickle claiming to be .npy": framed({"format": "npy"}, exploit),
        "a pickle claiming to be a table": framed({"format": "pandas-table", "kind": "DataFrame"}, exploit),
        "a pickle claiming to be Arrow": framed({"format": "arrow", "kind": "DataFrame"}, exploit),
        "a .npy of object dtype": framed({"format": "npy"}, npy(np.array([Exploit(marker)], dtype=object))),
        "a truncated .npy": framed({"format": "npy"}, ints[:-8]),
        "a .npy with bytes after it": framed({"format": "npy"}, ints + b"\x80\x04"),
        "a scalar that is an array": framed({"format": "npy", "scalar": True}, ints),
        "an unknown format": framed({"format": "pickle5"}, exploit),
        "a header in another case": MAGIC.upper() + b'{"format": "pickle"}\n' + exploit,
        "a header that is not an object": framed(["pickle"], exploit),
        "a header without its newline": MAGIC + b'{"format": "json"}',
        "truncated JSON": framed({"format": "json"}, b'{"a": [1, 2'),
        "JSON nested past any stack": framed({"format": "json"}, b"[" * 100_000),
        "text that is not UTF-8": framed({"format": "text"}, b"\xff\xfe"),
        "a table naming a tz file": framed(table_meta | {"specs": [{"dtype": "int64"}]}, tz_file.encode()),
        "a table dtype naming a tz file": framed(table_meta | {"specs": [{"dtype": tz_dtype}]}, table.encode()),
        "a table with other columns": framed(table_meta | {"specs": []}, table.encode()),
        "garbage": os.urandom(256),
        "nothing": b"",
    }


def test_forged_replies_are_errors_and_never_run_code(shell: InteractiveShell, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ok(shell, f"%%scalebox --session hostile\n{RIG}")
    try:
        for case, payload in forged(marker).items():
            shell.user_ns.pop("y", None)
            shell.user_ns["payload"] = payload
            result, captured = run(shell, "%%scalebox --session hostile -i payload -o y\nEVIL[0] = payload\ny = 1")
            assert type(result.error_in_exec).__name__ == "TransferError", (case, result.error_in_exec)
            assert not marker.exists(), case
            assert "y" not in shell.user_ns, case
            if case == "a pickle under a pickle header":
                assert "--unsafe-pickle" in captured.stdout, case
        # Too large is refused by its size before it is read.
        magics().max_transfer_mb = 0.01
        try:
            big = f"EVIL[0] = {MAGIC!r} + b'{{\"format\": \"bytes\"}}\\n' + b'x' * 100_000\ny = 1"
            text = refused(shell, f"%%scalebox --session hostile -o y\n{big}")
            assert "y is 0.1 MB" in text and "0.01 MB" in text
        finally:
            magics().max_transfer_mb = 50.0
        # The attack is real: with the flag, the same reply runs the sandbox's code here.
        shell.user_ns["payload"] = forged(marker)["a pickle under a pickle header"]
        ok(shell, "%%scalebox --session hostile -i payload -o y --unsafe-pickle\nEVIL[0] = payload\ny = 1")
        assert marker.read_text() == "sandbox code ran here"
    finally:
        ok(shell, "%scalebox close hostile")


def test_arrow_frames_round_trip_exactly() -> None:
    """With pyarrow here and in the sandbox, frames travel as Arrow IPC (checked here on both halves, as the
    sandbox runtime has no pyarrow)."""
    pytest.importorskip("pyarrow", minversion="14.0.1")
    from scalebox_kernel.magics._encoder import encode
    from scalebox_kernel.magics._formats import decode

    meant: dict[str, Any] = {}
    exec(FRAME, meant)
    for name in ("frame", "multi", "series"):
        meta, body = encode(meant[name], False, True)
        assert meta["format"] == "arrow"
        back = decode(MAGIC + json.dumps(meta).encode() + b"\n" + body, name)
        if name == "series":
            pd.testing.assert_series_equal(back, meant[name], check_exact=True)
        else:
            pd.testing.assert_frame_equal(back, meant[name], check_exact=True)
