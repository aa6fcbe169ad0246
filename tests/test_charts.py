"""Chart results of matplotlib figures (issue 12): each figure a Python sandbox shows carries its chart beside its
PNG, as `Result.chart` in our client, as the proto `Chart` on the wire (both codecs, and what the official Python
SDK 1.0.10 parses), and as `application/vnd.scalebox.chart+json` in the Scalebox kernel's display_data."""

from __future__ import annotations

import base64
import json
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_support import EXECUTE, Box
from client_support import config_for
from conftest import LocalServer
from kernel_support import KernelRun, of_type, scalebox_kernels
from test_official_sdk import sdk_env, sdk_venv_python

from scalebox_kernel.client import Execution, Result, Sandbox
from scalebox_kernel.protocol import connect, pb
from scalebox_kernel.protocol.mime import CHART_MIME

SETUP = "%matplotlib inline\nimport json\nimport matplotlib.pyplot as plt\nimport numpy as np\n"

LINE = """
fig, ax = plt.subplots()
ax.plot([0, 1, 2, 3], [0, 1, 4, 9], label="squares")
ax.plot([0, 1, 2, 3], [0, 1, 8, 27], label="cubes")
ax.set_title("Powers"); ax.set_xlabel("x"); ax.set_ylabel("value (units)")
ax.set_xticks([0, 1, 2, 3]); ax.set_yticks([0, 10, 20])
plt.show()
"""

SCATTER = """
fig, ax = plt.subplots()
ax.scatter([1, 2, 3], [10, 100, 1000], label="a")
ax.scatter([1.5], [50], label="b")
ax.set_yscale("log"); ax.set_title("Growth")
plt.show()
"""

BARS = """
fig, ax = plt.subplots()
x = np.arange(3)
ax.bar(x - 0.2, [10, 20, 15], 0.4, label="2023")
ax.bar(x + 0.2, [12, 18, 25], 0.4, label="2024")
ax.set_xticks(x, ["Q1", "Q2", "Q3"])
ax.set_title("Sales"); ax.set_xlabel("Quarter"); ax.set_ylabel("Sales [k$]")
plt.show()
fig, ax = plt.subplots()
ax.barh(["apples", "pears"], [3, 5])
ax.set_xlabel("weight (kg)"); ax.set_ylabel("fruit")
plt.show()
"""

PIE = """
fig, ax = plt.subplots()
ax.pie([1, 2, 3], labels=["a", "b", "c"])
ax.set_title("Shares")
plt.show()
"""

BOXES = """
import matplotlib.cbook
data = [[1, 2, 3, 4, 5, 20], [2, 3, 4, 5, 6, 7, 8], [5, 6, 6, 7, -4, 9]]
stats = matplotlib.cbook.boxplot_stats(data, labels=["A", "B", "C"])
print(json.dumps([[s["label"], s["whislo"], s["q1"], s["med"], s["q3"], s["whishi"], list(s["fliers"])]
                  for s in stats], default=float))
fig, ax = plt.subplots()
ax.boxplot(data, tick_labels=["A", "B", "C"])
ax.set_title("Scores"); ax.set_xlabel("class"); ax.set_ylabel("score")
plt.show()
fig, ax = plt.subplots()
ax.boxplot(data, tick_labels=["A", "B", "C"], orientation="horizontal", patch_artist=True, notch=True)
ax.set_xlabel("score"); ax.set_ylabel("class")
plt.show()
"""

COMPOSITE = """
fig, (left, right) = plt.subplots(1, 2)
left.plot([1, 2, 3], [2, 4, 6], label="up"); left.set_title("Line")
right.pie([1, 3], labels=["x", "y"]); right.set_title("Pie")
fig.suptitle("Both")
plt.show()
"""

HUGE = """
fig, ax = plt.subplots()
x = np.arange(1_000_000, dtype=float)
ax.scatter(x, 2 * x)
plt.show()
"""

ODD = """
fig, ax = plt.subplots()
ax.imshow(np.arange(9).reshape(3, 3))
plt.show()
from matplotlib.figure import Figure
class Broken(Figure):  # drawn as any figure, but reading its axes fails
    broken = False
    def get_axes(self):
        if self.broken:
            raise RuntimeError("no axes for you")
        return super().get_axes()
fig = plt.figure(FigureClass=Broken)
fig.add_subplot().plot([1, 2], [3, 4])
fig.broken = True
plt.show()
"""


@pytest.fixture(scope="module")
def sandbox(local_server: LocalServer) -> Iterator[Sandbox]:
    sbx = Sandbox.create(config=config_for(local_server), metadata={"suite": "test_charts"})
    assert sbx.run_code(SETUP).error is None
    yield sbx
    sbx.kill()
    sbx.close()


def figures(execution: Execution) -> list[Result]:
    """The cell's figures (the results with a PNG), each checked to be a real PNG; the cell ran cleanly."""
    assert execution.error is None, execution.error
    assert not execution.logs.stderr, execution.logs.stderr
    shown = [r for r in execution.results if r.png]
    for result in shown:
        assert base64.b64decode(result.png or "").startswith(b"\x89PNG")
    return shown


def only_chart(execution: Execution) -> dict[str, Any]:
    shown = figures(execution)
    assert len(shown) == 1 and shown[0].chart is not None, execution.results
    return shown[0].chart


def test_line_chart(sandbox: Sandbox) -> None:
    result = figures(sandbox.run_code(LINE))[0]
    chart = result.chart
    assert chart is not None
    assert chart["type"] == "line" and chart["title"] == "Powers"
    assert (chart["x_label"], chart["y_label"]) == ("x", "value (units)")
    assert (chart["x_unit"], chart["y_unit"]) == (None, "units")
    assert (chart["x_scale"], chart["y_scale"]) == ("linear", "linear")
    assert chart["x_ticks"] == [0, 1, 2, 3] and chart["x_tick_labels"] == ["0", "1", "2", "3"]
    assert chart["y_ticks"] == [0, 10, 20] and chart["y_tick_labels"] == ["0", "10", "20"]
    assert chart["elements"] == [
        {"label": "squares", "points": [[0, 0], [1, 1], [2, 4], [3, 9]]},
        {"label": "cubes", "points": [[0, 0], [1, 1], [2, 8], [3, 27]]},
    ]
    assert chart["extra"] == {}
    # One display: the chart is a format of the figure's result, not an `extra` entry, and never json/data.
    assert result.formats() == ["text", "png", "chart"]
    assert CHART_MIME not in result.extra and not result.json and not result.data
    bundle = result.to_bundle()
    assert bundle[CHART_MIME] == chart and "image/png" in bundle


def test_scatter_chart_on_a_log_axis(sandbox: Sandbox) -> None:
    chart = only_chart(sandbox.run_code(SCATTER))
    assert chart["type"] == "scatter" and chart["title"] == "Growth"
    assert (chart["x_scale"], chart["y_scale"]) == ("linear", "log")
    assert chart["y_ticks"] == [10, 100, 1000]
    assert chart["y_tick_labels"] == ["10^{1}", "10^{2}", "10^{3}"]  # mathtext `$\mathdefault{10^{1}}$` as text
    assert chart["x_ticks"] and len(chart["x_ticks"]) == len(chart["x_tick_labels"])
    assert min(chart["x_ticks"]) >= 0.9 and max(chart["x_ticks"]) <= 3.1  # only the ticks inside the view
    assert chart["elements"] == [
        {"label": "a", "points": [[1, 10], [2, 100], [3, 1000]]},
        {"label": "b", "points": [[1.5, 50]]},
    ]


def test_bar_charts_grouped_and_horizontal(sandbox: Sandbox) -> None:
    grouped, horizontal = (r.chart for r in figures(sandbox.run_code(BARS)))
    assert grouped is not None and horizontal is not None
    assert grouped["type"] == "bar" and grouped["title"] == "Sales"
    assert (grouped["x_label"], grouped["y_label"], grouped["y_unit"]) == ("Quarter", "Sales [k$]", "k$")
    assert grouped["elements"] == [
        {"label": quarter, "group": year, "value": value}
        for year, values in (("2023", [10, 20, 15]), ("2024", [12, 18, 25]))
        for quarter, value in zip(["Q1", "Q2", "Q3"], values, strict=True)
    ]
    # Horizontal bars: the seed's x is the category axis, so the labels swap.
    assert horizontal["type"] == "bar" and horizontal["title"] is None
    assert (horizontal["x_label"], horizontal["y_label"], horizontal["y_unit"]) == ("fruit", "weight (kg)", "kg")
    assert horizontal["elements"] == [
        {"label": "apples", "group": "Group 0", "value": 3},
        {"label": "pears", "group": "Group 0", "value": 5},
    ]
    assert "x_ticks" not in grouped  # the seed's bar charts have no ticks


def test_pie_chart(sandbox: Sandbox) -> None:
    chart = only_chart(sandbox.run_code(PIE))
    assert chart == {
        "type": "pie",
        "title": "Shares",
        "elements": [
            {"label": "a", "angle": 60, "radius": 1},
            {"label": "b", "angle": 120, "radius": 1},
            {"label": "c", "angle": 180, "radius": 1},
        ],
        "extra": {},
    }


def test_box_and_whisker_charts_match_matplotlibs_statistics(sandbox: Sandbox) -> None:
    execution = sandbox.run_code(BOXES)
    upright, lying = (r.chart for r in figures(execution))
    expected = [
        {
            "label": label,
            "min": low,
            "first_quartile": q1,
            "median": median,
            "third_quartile": q3,
            "max": high,
            "outliers": fliers,
        }
        for label, low, q1, median, q3, high, fliers in json.loads("".join(execution.logs.stdout))
    ]
    assert any(box["outliers"] for box in expected) and len(expected) == 3
    assert upright is not None and lying is not None
    assert upright["type"] == "box_and_whisker" and upright["title"] == "Scores"
    assert (upright["x_label"], upright["y_label"]) == ("class", "score")
    assert upright["elements"] == expected
    # Lying down, with filled and notched boxes: the same statistics, the category axis still the seed's x.
    assert lying["type"] == "box_and_whisker"
    assert (lying["x_label"], lying["y_label"]) == ("class", "score")
    assert lying["elements"] == expected


def test_a_figure_with_two_axes_is_a_superchart(sandbox: Sandbox) -> None:
    chart = only_chart(sandbox.run_code(COMPOSITE))
    assert chart["type"] == "superchart" and chart["title"] == "Both"
    line, pie = chart["elements"]
    assert line["type"] == "line" and line["title"] == "Line"
    assert line["elements"] == [{"label": "up", "points": [[1, 2], [2, 4], [3, 6]]}]
    assert line["x_ticks"] and line["y_tick_labels"]
    assert pie["type"] == "pie" and pie["title"] == "Pie"
    assert [(e["label"], e["angle"]) for e in pie["elements"]] == [("x", 90), ("y", 270)]


def test_a_figure_as_the_cells_value_is_the_main_result_with_its_chart(sandbox: Sandbox) -> None:
    execution = sandbox.run_code("fig, ax = plt.subplots()\nax.plot([5, 6], label='v')\nplt.close(fig)\nfig")
    (main,) = figures(execution)
    assert main.is_main_result and main.execution_count == execution.execution_count
    assert main.chart is not None and main.chart["elements"] == [{"label": "v", "points": [[0, 5], [1, 6]]}]


def test_a_million_points_are_cut_to_ten_thousand_and_say_so(sandbox: Sandbox) -> None:
    chart = only_chart(sandbox.run_code(HUGE))
    (series,) = chart["elements"]
    points = series["points"]
    assert len(points) == 10_000
    assert points[0] == [0, 0] and points[-1] == [999_999, 1_999_998]  # evenly spread, both ends kept
    assert all(y == 2 * x for x, y in points)
    assert chart["extra"]["truncated"] == "true" and chart["extra"]["max_series_points"] == "10000"


def test_a_figure_without_a_chart_keeps_its_png_and_says_nothing(sandbox: Sandbox) -> None:
    shown = figures(sandbox.run_code(ODD))  # no stderr: a figure the extractor cannot read is silent
    assert len(shown) == 2
    assert [r.chart for r in shown] == [None, None]
    assert all(CHART_MIME not in r.extra and CHART_MIME not in r.to_bundle() for r in shown)


def test_the_formatter_is_registered_lazily_at_kernel_start(sandbox: Sandbox) -> None:
    context = sandbox.create_code_context()
    try:
        code = (
            "import sys\n"
            f"f = get_ipython().display_formatter.formatters.get({CHART_MIME!r})\n"
            "print(sorted(m for m in ('matplotlib', 'scalebox_kernel') if m in sys.modules))\n"
            "print(type(f).__name__)\n"
        )
        execution = sandbox.run_code(code, context=context)
        assert execution.error is None, execution.error
        assert "".join(execution.logs.stdout).splitlines() == ["[]", "_ChartFormatter"]
    finally:
        sandbox.destroy_context(context)


def test_the_wire_carries_the_proto_chart_in_both_codecs(local_server: LocalServer, http: httpx.Client) -> None:
    code = SETUP + "plt.plot([1, 2], [3, 4], label='l'); plt.xlabel('t (s)'); plt.show()"
    box = Box(local_server, http)
    try:
        reply = box.execute(code, connect.PROTO)
        (proto,) = [m.result for m in reply.messages if m.HasField("result") and m.result.png]
        assert proto.chart.type == "line" and not proto.json and not proto.data and CHART_MIME not in proto.extra
        element = proto.chart.elements[0]
        assert element.WhichOneof("element") == "point_data" and element.point_data.label == "l"
        assert [(p.x_num, p.y_num) for p in element.point_data.points] == [(1, 3), (2, 4)]
        assert proto.chart.extra["x_label"] == "t (s)" and proto.chart.extra["x_unit"] == "s"
        assert proto.chart.extra["x_scale"] == "linear" and json.loads(proto.chart.extra["x_ticks"])

        # The JSON codec (the JS SDK's): proto3 JSON names, which its `fromJson` and chart conversion read.
        frames = raw_json_frames(box, code)
        (result,) = [f["result"] for f in frames if "result" in f and f["result"].get("png")]
        assert "json" not in result and "data" not in result and CHART_MIME not in result.get("extra", {})
        chart = result["chart"]
        assert chart["type"] == "line" and chart["extra"]["x_label"] == "t (s)"
        assert chart["elements"][0]["pointData"]["points"] == [{"xNum": 1, "yNum": 3}, {"xNum": 2, "yNum": 4}]
    finally:
        box.kill()


def raw_json_frames(box: Box, code: str) -> list[dict[str, Any]]:
    """The data frames of one JSON-codec Execute, as the JSON objects that came (not decoded by us)."""
    headers = {"Connect-Protocol-Version": "1", "Content-Type": connect.JSON.stream_content_type}
    headers["X-Access-Token"] = box.token
    body = connect.envelope(connect.JSON.encode(pb.ExecuteRequest(code=code)))
    frames: list[dict[str, Any]] = []
    reader = connect.EnvelopeReader()
    with box.http.stream("POST", f"{box.base}/{EXECUTE}", content=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        for chunk in r.iter_raw():
            frames += [json.loads(p) for flags, p in reader.feed(chunk) if not flags & connect.FLAG_END_STREAM]
    return frames


SDK_SCRIPT = textwrap.dedent(
    """
    import json
    from scalebox.code_interpreter import Sandbox

    sbx = Sandbox.create(timeout=120)
    try:
        ex = sbx.run_code(
            "import matplotlib.pyplot as plt\\nplt.bar(['a', 'b'], [3, 5], label='n')\\nplt.title('Counts')\\n"
            "plt.ylabel('n (items)')\\nplt.show()"
        )
        shown = [r for r in ex.results if r.png]
        chart = shown[0].chart
        out = {
            "error": repr(ex.error) if ex.error else None,
            "formats": shown[0].formats(),
            "type": chart.type,
            "title": chart.title,
            "extra": dict(chart.extra),
            "bars": [[e.bar_data.label, e.bar_data.group, e.bar_data.value] for e in chart.elements],
            "json": shown[0].json_data or shown[0].data or None,
        }
    finally:
        sbx.kill()
    print("@@CHART@@" + json.dumps(out))
    """
)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_official_python_sdk_parses_a_chart(local_server: LocalServer, tmp_path: Path) -> None:
    try:
        python = sdk_venv_python()
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"could not build the official SDK's venv: {exc}")
    script = tmp_path / "chart_flow.py"
    script.write_text(SDK_SCRIPT)
    proc = subprocess.run(
        [str(python), str(script)], env=sdk_env(local_server), capture_output=True, text=True, timeout=240
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("@@CHART@@")]
    assert proc.returncode == 0 and lines, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    out = json.loads(lines[-1][len("@@CHART@@") :])
    assert out["error"] is None and out["json"] is None
    assert "png" in out["formats"] and "chart" in out["formats"]
    assert out["type"] == "bar" and out["title"] == "Counts"
    assert out["extra"]["y_label"] == "n (items)" and out["extra"]["y_unit"] == "items"
    assert out["bars"] == [["a", "n", "3"], ["b", "n", "5"]]


@pytest.fixture(scope="module")
def kernel(local_server: LocalServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelRun]:
    with scalebox_kernels(local_server, tmp_path_factory):
        run = KernelRun()
        yield run
        run.shutdown()


def test_the_kernels_figure_display_carries_the_chart_beside_the_png(kernel: KernelRun) -> None:
    reply, outputs = kernel.execute(SETUP + PIE, timeout=120)
    assert reply["content"]["status"] == "ok", reply["content"]
    (display,) = [d for d in of_type(outputs, "display_data") if "image/png" in d["data"]]
    assert base64.b64decode(display["data"]["image/png"]).startswith(b"\x89PNG")
    chart = display["data"][CHART_MIME]  # a JSON value in the bundle (a +json type), kept by a saved notebook
    assert chart["type"] == "pie" and chart["title"] == "Shares"
    assert [(e["label"], e["angle"]) for e in chart["elements"]] == [("a", 60), ("b", 120), ("c", 180)]
    assert "text/plain" in display["data"]  # the figure's repr is still there


def test_a_bundle_back_to_a_result_keeps_the_chart_and_refuses_what_is_not_one() -> None:
    """The magics' and kernel's way back (bundle -> Result -> bundle), and a kernel's chart MIME that is no chart."""
    chart = {
        "type": "bar",
        "title": "T",
        "x_label": "k",
        "y_label": None,
        "x_unit": None,
        "y_unit": None,
        "elements": [{"label": "a", "group": "g", "value": 2.5}],
        "extra": {"truncated": "true"},
    }
    result = Result.from_bundle({"image/png": "iVBOR", CHART_MIME: chart}, execution_count=3, is_main_result=True)
    assert result.chart == chart and result.execution_count == 3 and result.is_main_result
    assert result.to_bundle() == {"image/png": "iVBOR", CHART_MIME: chart}
    nested = {"type": "superchart", "title": None, "elements": [], "extra": {}}
    for _ in range(6):
        nested = {"type": "superchart", "title": None, "elements": [nested], "extra": {}}
    for odd in ([1, 2], {"type": "line", "elements": [{"points": [[{}, 1]]}]}, nested, "not json"):
        kept = Result.from_bundle({CHART_MIME: odd})
        assert kept.chart is None and CHART_MIME in kept.extra  # left as it came, never a broken chart
