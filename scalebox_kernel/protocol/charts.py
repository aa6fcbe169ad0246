"""The `chart` result: the seed SDK's chart dict <-> the proto `Chart` message (PROTOCOL.md sections 3.3 and 5.4).

The dict is the shape the seed's Python `charts.py` (and E2B's code interpreter) reads, and what a Python sandbox's
kernel displays as `application/vnd.scalebox.chart+json` (server/agent/chart_extractor.py makes it):

    {"type": "line", "title": "Squares", "x_label": "x", "y_label": "y (m)", "x_unit": None, "y_unit": "m",
     "x_ticks": [1.0, 2.0], "x_tick_labels": ["1", "2"], "x_scale": "linear", "y_ticks": ..., "y_tick_labels": ...,
     "y_scale": "linear", "elements": [{"label": "squares", "points": [[1.0, 1.0], [2.0, 4.0]]}], "extra": {}}

On the wire the elements become the `ChartElement` oneof (bar values as text, since `BarData.value` is a string)
and the axis fields go into `Chart.extra` under their snake_case names, which the seed JS SDK reads
(`extra["x_label"]`, `extra["x_scale"]`, ...); ticks and tick labels go there as JSON text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from . import sandboxagent_pb2 as pb

CHART_TYPES = ("line", "scatter", "bar", "pie", "box_and_whisker", "superchart")
#: Axis fields of the charts with axes (the seed's Chart2D), kept in `Chart.extra` as they are.
AXIS_TEXT = ("x_label", "y_label", "x_unit", "y_unit")
#: What point charts (line, scatter) add: the scales as text, the ticks and their labels as JSON text.
SCALES = ("x_scale", "y_scale")
TICKS = ("x_ticks", "x_tick_labels", "y_ticks", "y_tick_labels")
BOX_STATS = ("min", "first_quartile", "median", "third_quartile", "max")
#: Deepest nesting of supercharts accepted (a figure's axes are one level below its superchart).
MAX_DEPTH = 4

_POINT_TYPES = ("line", "scatter")
_AXIS_TYPES = ("line", "scatter", "bar", "box_and_whisker")
_OWN_KEYS = frozenset(("type", "title", "elements", "extra", *AXIS_TEXT, *SCALES, *TICKS))


def chart_to_pb(chart: Mapping[str, Any], depth: int = 0) -> pb.Chart:
    """The proto message of a chart dict; ValueError (or TypeError) if it is not one."""
    if not isinstance(chart, Mapping) or depth > MAX_DEPTH:
        raise ValueError("a chart must be an object (superchart nesting at most 4 deep)")
    kind = str(chart.get("type") or "unknown").lower()
    message = pb.Chart(type=kind, title=str(chart.get("title") or ""))
    extra = chart.get("extra") or {}
    if not isinstance(extra, Mapping):
        raise ValueError("a chart's extra must be an object")
    message.extra.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    for key in AXIS_TEXT + SCALES:
        if chart.get(key) is not None:
            message.extra[key] = str(chart[key])
    for key in TICKS:
        if chart.get(key) is not None:
            message.extra[key] = json.dumps(list(chart[key]))
    for element in chart.get("elements") or ():
        message.elements.append(_element_to_pb(kind, element, depth))
    return message


def _element_to_pb(kind: str, element: Any, depth: int) -> pb.ChartElement:
    if kind == "superchart":
        return pb.ChartElement(nested_chart=chart_to_pb(element, depth + 1))
    if not isinstance(element, Mapping):
        raise ValueError(f"an element of a {kind} chart must be an object")
    label = str(element.get("label") or "")
    if kind == "bar":
        value = element.get("value")
        text = _number_text(value) if isinstance(value, int | float) else str(value if value is not None else "")
        return pb.ChartElement(bar_data=pb.BarData(label=label, group=str(element.get("group") or ""), value=text))
    if kind == "pie":
        pie = pb.PieData(label=label, angle=float(element["angle"]), radius=float(element.get("radius") or 0))
        return pb.ChartElement(pie_data=pie)
    if kind == "box_and_whisker":
        stats = {name: float(element[name]) for name in BOX_STATS}
        outliers = [float(value) for value in element.get("outliers") or ()]
        return pb.ChartElement(box_whisker_data=pb.BoxAndWhiskerData(label=label, outliers=outliers, **stats))
    points = [_point_to_pb(point) for point in element.get("points") or ()]
    return pb.ChartElement(point_data=pb.PointData(label=label, points=points))


def _point_to_pb(point: Any) -> pb.Point:
    x, y = point
    message = pb.Point()
    for axis, value in (("x", x), ("y", y)):
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"a point's coordinate must be a number or a string, not {type(value).__name__}")
        if isinstance(value, str):
            setattr(message, f"{axis}_str", value)
        else:
            setattr(message, f"{axis}_num", float(value))
    return message


def chart_from_pb(message: pb.Chart) -> dict[str, Any]:
    """The chart dict of a proto message: the keys its type has in the seed SDK, plus `extra` for the rest."""
    kind = message.type.lower() or "unknown"
    extra = dict(message.extra)
    chart: dict[str, Any] = {"type": kind, "title": message.title or None}
    if kind in _AXIS_TYPES or kind not in CHART_TYPES:
        chart.update({key: extra.get(key) or None for key in AXIS_TEXT})
    if kind in _POINT_TYPES:
        chart.update({key: extra.get(key) or "linear" for key in SCALES})
        chart.update({key: _json_list(extra.get(key)) for key in TICKS})
    chart["elements"] = [_element_from_pb(element) for element in message.elements]
    chart["extra"] = {key: value for key, value in extra.items() if key not in _OWN_KEYS}
    return chart


def _element_from_pb(element: pb.ChartElement) -> dict[str, Any]:
    which = element.WhichOneof("element")
    if which == "nested_chart":
        return chart_from_pb(element.nested_chart)
    if which == "bar_data":
        bar = element.bar_data
        return {"label": bar.label, "group": bar.group, "value": _number_or_text(bar.value)}
    if which == "pie_data":
        return {"label": element.pie_data.label, "angle": element.pie_data.angle, "radius": element.pie_data.radius}
    if which == "box_whisker_data":
        box = element.box_whisker_data
        return {"label": box.label, **{name: getattr(box, name) for name in BOX_STATS}, "outliers": list(box.outliers)}
    if which == "point_data":
        points = [[_coordinate(point, "x"), _coordinate(point, "y")] for point in element.point_data.points]
        return {"label": element.point_data.label, "points": points}
    return {}


def _coordinate(point: pb.Point, axis: str) -> float | str | None:
    which = point.WhichOneof(f"{axis}_value")
    return getattr(point, which) if which else None


def _number_text(value: float) -> str:
    """A bar's value as `BarData.value` text: `3` for 3.0, `2.5`, `1e-07` (what `float()` reads back)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _number_or_text(text: str) -> float | str:
    try:
        value = float(text)
    except ValueError:
        return text
    return value if math.isfinite(value) else text


def _json_list(text: str | None) -> list[Any]:
    if not text:
        return []
    try:
        value = json.loads(text)
    except ValueError:
        return []
    return value if isinstance(value, list) else []
