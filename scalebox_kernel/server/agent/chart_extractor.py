"""The chart of a matplotlib figure: its type, title, axes and data, as the dict of protocol/charts.py.

This file runs inside a Python sandbox's kernel, never in scalebox-local: IOPUB_LAUNCHER (runtimes.py) carries its
source, and the formatter it registers for `matplotlib.figure.Figure` runs it on the first figure shown and calls
`chart_or_none` for each, which gives the MIME type `application/vnd.scalebox.chart+json` beside the PNG. So it
imports nothing but the standard library at its top; numpy and matplotlib are loaded when a figure exists.

One axes gives a line, scatter, bar, pie or box-and-whisker chart; a figure with several gives a superchart of
them. A figure it cannot read gives no chart and no message: the PNG never depends on it. A series keeps at most
MAX_SERIES_POINTS points (evenly spaced, the first and last among them), a figure MAX_FIGURE_POINTS elements, and
the chart's `extra` says when some were left out.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

MAX_SERIES_POINTS = 10_000
MAX_FIGURE_POINTS = 50_000

_UNIT = re.compile(r"\(([^()]+)\)|\[([^\[\]]+)\]")
_MATHDEFAULT = re.compile(r"^\$\\mathdefault\{(.*)\}\$$")


def chart_or_none(figure: Any) -> dict[str, Any] | None:
    """The figure's chart, or None for a figure without one or one this cannot read (silently)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return figure_to_chart(figure)
    except Exception:
        return None


class _Budget:
    """How many more points (or bars, wedges, boxes) the figure's chart may hold; whether some were left out."""

    def __init__(self) -> None:
        self.left = MAX_FIGURE_POINTS
        self.truncated = False

    def take(self, wanted: int, cap: int = MAX_SERIES_POINTS) -> int:
        granted = max(0, min(wanted, cap, self.left))
        if granted < wanted:
            self.truncated = True
        self.left -= granted
        return granted


def figure_to_chart(figure: Any) -> dict[str, Any] | None:
    """The chart of a figure: one axes' chart, a superchart of several, or None when no axes has one."""
    budget = _Budget()
    axes = [ax for ax in figure.get_axes() if _charted(ax)]
    charts = []
    for ax in axes:
        before = budget.truncated
        budget.truncated = False
        chart = axes_chart(ax, budget)
        if chart is not None:
            if budget.truncated:
                chart["extra"].update(_truncation_note())
            charts.append(chart)
        budget.truncated = budget.truncated or before
    if not charts:
        return None
    if len(axes) == 1:
        return charts[0]
    title = figure.get_suptitle() if hasattr(figure, "get_suptitle") else ""
    extra = _truncation_note() if budget.truncated else {}
    return {"type": "superchart", "title": title or None, "elements": charts, "extra": extra}


def _truncation_note() -> dict[str, str]:
    return {"truncated": "true", "max_series_points": str(MAX_SERIES_POINTS), "max_points": str(MAX_FIGURE_POINTS)}


def _charted(ax: Any) -> bool:
    """An axes of the figure's own data: visible, with data, and not a colorbar."""
    return bool(ax.get_visible() and ax.has_data() and getattr(ax, "_colorbar", None) is None)


def axes_chart(ax: Any, budget: _Budget) -> dict[str, Any] | None:
    """The chart of one axes, by what it holds; None when it is none of the known types."""
    from matplotlib.collections import PathCollection
    from matplotlib.container import BarContainer, ErrorbarContainer
    from matplotlib.patches import Wedge

    decoration: set[int] = set()  # error bars' caps and bar lines
    for container in ax.containers:
        if isinstance(container, ErrorbarContainer):
            _, caps, bar_lines = container.lines
            decoration.update(id(artist) for artist in (*caps, *bar_lines))
    lines = [line for line in ax.get_lines() if id(line) not in decoration and _in_data_coordinates(ax, line)]
    scatters = [c for c in ax.collections if isinstance(c, PathCollection) and c.get_visible()]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    wedges = [p for p in ax.patches if isinstance(p, Wedge) and p.get_visible()]

    if wedges and not (lines or scatters or bars):
        return _pie_chart(ax, wedges, budget)
    if not (scatters or bars or wedges):
        boxes = _box_chart(ax, lines, budget)
        if boxes is not None:
            return boxes
    if bars and not (lines or scatters or wedges):
        return _bar_chart(ax, bars, budget)
    if (lines or scatters) and not (bars or wedges):
        return _point_chart(ax, lines, scatters, budget)
    return None


def _in_data_coordinates(ax: Any, artist: Any) -> bool:
    """Drawn in the axes' data coordinates (not an axhline/axvline, whose one side is the axes' own)."""
    return bool(artist.get_visible() and artist.get_transform().contains_branch(ax.transData))


# ------------------------------------------------------------------------------------------------ common parts


def _text(value: Any) -> str | None:
    text = str(value) if value is not None else ""
    return text or None


def _title(ax: Any) -> str | None:
    return next((text for loc in ("center", "left", "right") if (text := ax.get_title(loc=loc))), None)


def _unit(label: str | None) -> str | None:
    """`°C` of `Temperature (°C)` or `Speed [m/s]`."""
    match = _UNIT.search(label or "")
    if match is None:
        return None
    return (match.group(1) or match.group(2)).strip() or None


def _axis_fields(ax: Any, kind: str, swap: bool = False) -> dict[str, Any]:
    """A chart's type, title, axis labels and units (the seed's Chart2D); `swap` when the categories are on the y
    axis, since the seed's x always describes the categories."""
    x_label, y_label = _text(ax.get_xlabel()), _text(ax.get_ylabel())
    if swap:
        x_label, y_label = y_label, x_label
    return {
        "type": kind,
        "title": _title(ax),
        "x_label": x_label,
        "y_label": y_label,
        "x_unit": _unit(x_label),
        "y_unit": _unit(y_label),
    }


def _series_label(artist: Any, fallback: str) -> str:
    label = artist.get_label()
    label = "" if label is None else str(label)
    return fallback if not label or label.startswith("_") else label


def _converter(axis: Any) -> Any:
    getter = getattr(axis, "get_converter", None)
    return getter() if getter is not None else getattr(axis, "converter", None)


def _kind(axis: Any) -> str:
    """`datetime`, `categorical` or `numeric`: how the axis turns data into numbers."""
    import matplotlib.dates as mdates

    converter = _converter(axis)
    if converter is None:
        return "numeric"
    module = type(converter).__module__
    if isinstance(converter, mdates.DateConverter) or module == "matplotlib.dates":
        return "datetime"
    if module == "matplotlib.category":
        return "categorical"
    return "numeric"


def _categories(axis: Any) -> dict[int, str]:
    """Position -> name of a categorical axis."""
    mapping = getattr(axis.get_units(), "_mapping", None) or {}
    return {int(position): str(name) for name, position in mapping.items()}


def _value_reader(axis: Any) -> Any:
    """A function from the axis's numbers (as matplotlib stores them) to the values the user gave: ISO dates,
    category names, or floats."""
    kind = _kind(axis)
    if kind == "datetime":
        import matplotlib.dates as mdates

        return lambda number: mdates.num2date(number).isoformat()
    if kind == "categorical":
        names = _categories(axis)

        def category(number: float) -> float | str:
            nearest = round(number)
            return names.get(nearest, number) if abs(number - nearest) < 1e-9 else number

        return category
    return float


def _ticks(axis: Any) -> tuple[list[Any], list[str]]:
    """The major ticks inside the view and their labels, as the figure shows them (no drawing needed)."""
    import numpy as np

    locations = np.asarray(axis.get_majorticklocs(), dtype=float)
    labels = list(axis.get_major_formatter().format_ticks(locations))
    low, high = sorted(float(v) for v in axis.get_view_interval())
    slack = (high - low) * 1e-9
    pairs = zip(locations.tolist(), labels, strict=False)
    kept = [(loc, label) for loc, label in pairs if math.isfinite(loc) and low - slack <= loc <= high + slack]
    if _kind(axis) == "datetime":
        import matplotlib.dates as mdates

        values: list[Any] = [mdates.num2date(loc).isoformat() for loc, _ in kept]
    else:
        values = [float(loc) for loc, _ in kept]
    return values, [_tick_text(label) for _, label in kept]


def _tick_text(label: Any) -> str:
    """A tick label as plain text: `10^{2}` for mathtext `$\\mathdefault{10^{2}}$`, an ASCII minus for U+2212."""
    text = str(label)
    match = _MATHDEFAULT.match(text)
    if match:
        text = match.group(1)
    return text.replace("\u2212", "-")


def _scale(axis: Any, tick_labels: list[str]) -> str:
    """The seed's ScaleType: `datetime`, `categorical`, or matplotlib's scale (`linear`, `log`, `symlog`, ...)."""
    from matplotlib.ticker import FixedLocator

    kind = _kind(axis)
    if kind != "numeric":
        return kind
    scale = str(axis.get_scale())
    named = [label for label in tick_labels if label]
    fixed = isinstance(axis.get_major_locator(), FixedLocator)
    if scale == "linear" and fixed and named and not any(_is_number(label) for label in named):
        return "categorical"  # set_xticks(positions, names) on plain numbers
    return scale


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class _Positions:
    """Names the category a bar or box stands at on one axis: its category, the label of a tick there, its date,
    or its position as a number."""

    def __init__(self, axis: Any) -> None:
        self.kind = _kind(axis)
        self.names = _categories(axis) if self.kind == "categorical" else {}
        values, labels = _ticks(axis) if self.kind != "datetime" else ([], [])
        self.ticks = [(float(value), label) for value, label in zip(values, labels, strict=True) if label]

    def label(self, center: float, half_width: float) -> str:
        if self.names:
            nearest = round(center)
            if nearest in self.names and abs(center - nearest) <= 0.5:
                return self.names[nearest]
        # A name on a tick (`set_xticks(positions, names)`) names the bars beside it, as grouped bars stand half a
        # bar off their tick; a number on a tick only names a bar right under it (a histogram's bins are not ticks).
        near = [
            (distance, label)
            for loc, label in self.ticks
            if (distance := abs(loc - center)) <= half_width * (1e-9 if _is_number(label) else 1 + 1e-9)
        ]
        if near:
            return min(near)[1]
        if self.kind == "datetime":
            import matplotlib.dates as mdates

            return str(mdates.num2date(center).isoformat())
        return format(center, ".6g")


def _sample(count: int, keep: int) -> Any:
    """Indices of `keep` of `count` items, evenly spread, the first and the last among them."""
    import numpy as np

    if keep >= count:
        return np.arange(count)
    if keep <= 1:
        return np.arange(keep)
    return np.unique(np.linspace(0, count - 1, keep).round().astype(int))


# ------------------------------------------------------------------------------------------------ point charts


def _point_chart(ax: Any, lines: list[Any], scatters: list[Any], budget: _Budget) -> dict[str, Any]:
    import numpy as np

    markers_only = all(str(line.get_linestyle()) in ("None", "", " ", "none") for line in lines)
    chart = _axis_fields(ax, "scatter" if markers_only else "line")
    for axis_name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
        ticks, labels = _ticks(axis)
        chart[f"{axis_name}_ticks"] = ticks
        chart[f"{axis_name}_tick_labels"] = labels
        chart[f"{axis_name}_scale"] = _scale(axis, labels)
    read_x, read_y = _value_reader(ax.xaxis), _value_reader(ax.yaxis)
    series = [(line, _line_xy(line), "Line") for line in lines]
    series += [(c, np.ma.filled(np.ma.asarray(c.get_offsets(), dtype=float), np.nan), "Series") for c in scatters]
    elements = []
    for index, (artist, xy, kind) in enumerate(series):
        xy = np.asarray(xy, dtype=float).reshape(-1, 2)
        xy = xy[np.isfinite(xy).all(axis=1)]
        share = budget.left // (len(series) - index)  # the axes' series share what is left alike
        kept = xy[_sample(len(xy), budget.take(len(xy), min(MAX_SERIES_POINTS, share)))]
        points = [[read_x(x), read_y(y)] for x, y in kept.tolist()]
        elements.append({"label": _series_label(artist, f"{kind} {index}"), "points": points})
    chart["elements"] = elements
    chart["extra"] = {}
    return chart


def _line_xy(line: Any) -> Any:
    """A line's points in the axes' numbers (categories and dates as matplotlib converted them)."""
    import numpy as np

    x: Any = np.ma.filled(np.ma.asarray(line.get_xdata(orig=False), dtype=float), np.nan)
    y: Any = np.ma.filled(np.ma.asarray(line.get_ydata(orig=False), dtype=float), np.nan)
    count = min(len(x), len(y))
    return np.column_stack([x[:count], y[:count]])


# ------------------------------------------------------------------------------------------------ bars and pies


def _bar_chart(ax: Any, containers: list[Any], budget: _Budget) -> dict[str, Any]:
    horizontal = all(getattr(c, "orientation", None) == "horizontal" for c in containers)
    positions = _Positions(ax.yaxis if horizontal else ax.xaxis)
    chart = _axis_fields(ax, "bar", swap=horizontal)
    elements = []
    for index, container in enumerate(containers):
        group = _series_label(container, f"Group {index}")
        patches = list(container.patches)
        values = getattr(container, "datavalues", None)
        if values is None:
            values = [p.get_width() if horizontal else p.get_height() for p in patches]
        for patch, value in list(zip(patches, values, strict=False))[: budget.take(len(patches), MAX_FIGURE_POINTS)]:
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            if not math.isfinite(number):
                continue
            if horizontal:
                center, half = patch.get_y() + patch.get_height() / 2, abs(patch.get_height()) / 2
            else:
                center, half = patch.get_x() + patch.get_width() / 2, abs(patch.get_width()) / 2
            label = positions.label(float(center), float(half))
            elements.append({"label": label, "group": group, "value": number})
    chart["elements"] = elements
    chart["extra"] = {}
    return chart


def _pie_chart(ax: Any, wedges: list[Any], budget: _Budget) -> dict[str, Any]:
    elements = []
    for wedge in wedges[: budget.take(len(wedges), MAX_FIGURE_POINTS)]:
        label = wedge.get_label()
        label = "" if label is None or str(label).startswith("_") else str(label)
        angle = round(abs(float(wedge.theta2) - float(wedge.theta1)), 9)
        if math.isfinite(angle) and math.isfinite(float(wedge.r)):
            elements.append({"label": label, "angle": angle, "radius": float(wedge.r)})
    return {"type": "pie", "title": _title(ax), "elements": elements, "extra": {}}


# ------------------------------------------------------------------------------------------------ box plots


def _box_chart(ax: Any, lines: list[Any], budget: _Budget) -> dict[str, Any] | None:
    """A box plot read back from its drawing (matplotlib keeps no statistics): each box a closed outline (a line,
    or a patch with `patch_artist=True`), its median a segment across it, its whiskers segments from its edges,
    its fliers marker-only lines at its centre. None unless every line of the axes is one of those."""
    import matplotlib
    import numpy as np
    from matplotlib.patches import PathPatch

    # showmeans=True draws each box's mean as one more marker at its centre; it is told from a lone flier by its
    # marker (the rcParams' defaults differ: '^' and 'o').
    mean_marker = matplotlib.rcParams["boxplot.meanprops.marker"]
    flier_marker = matplotlib.rcParams["boxplot.flierprops.marker"]
    outlines = []
    segments = []
    markers = []
    for line in lines:
        x = np.asarray(line.get_xdata(orig=False), dtype=float)
        y = np.asarray(line.get_ydata(orig=False), dtype=float)
        if str(line.get_linestyle()) in ("None", "", " ", "none"):
            if not (len(x) == 1 and line.get_marker() == mean_marker != flier_marker):
                markers.append((x, y))
        elif len(x) == 2 and len(y) == 2 and (x[0] == x[1] or y[0] == y[1]):
            segments.append((x, y))
        elif len(x) >= 5 and len(x) == len(y) and x[0] == x[-1] and y[0] == y[-1]:
            outlines.append((x, y))
        else:
            return None
    for patch in ax.patches:
        if isinstance(patch, PathPatch) and _in_data_coordinates(ax, patch):
            vertices = np.asarray(patch.get_path().vertices, dtype=float)
            outlines.append((vertices[:, 0], vertices[:, 1]))
    if not outlines or not segments:
        return None
    boxes = {(float(x.min()), float(x.max()), float(y.min()), float(y.max())) for x, y in outlines}
    vertical = _boxes_vertical(sorted(boxes), segments)
    stats = []
    for x0, x1, y0, y1 in sorted(boxes):
        box = (x0, x1, y0, y1) if vertical else (y0, y1, x0, x1)
        found = _box_stats(box, segments, markers, vertical)
        if found is not None:
            stats.append(found)
    if not stats:
        return None
    positions = _Positions(ax.xaxis if vertical else ax.yaxis)
    elements = []
    for center, half, values in stats[: budget.take(len(stats), MAX_FIGURE_POINTS)]:
        outliers = values.pop("outliers")
        values["outliers"] = outliers[: budget.take(len(outliers))]
        elements.append({"label": positions.label(center, half), **values})
    chart = _axis_fields(ax, "box_and_whisker", swap=not vertical)
    chart.update(elements=elements, extra={})
    return chart


def _boxes_vertical(boxes: list[tuple[float, float, float, float]], segments: list[Any]) -> bool:
    """Whether the boxes stand upright: more whiskers run up and down out of them than sideways."""
    votes = {True: 0, False: 0}
    for vertical in (True, False):
        for x0, x1, y0, y1 in boxes:
            p0, p1, v0, v1 = (x0, x1, y0, y1) if vertical else (y0, y1, x0, x1)
            for x, y in segments:
                pos, val = (x, y) if vertical else (y, x)
                touches = min(val) <= v1 and max(val) >= v0
                if pos[0] == pos[1] and p0 <= pos[0] <= p1 and touches and (min(val) < v0 or max(val) > v1):
                    votes[vertical] += 1
    return votes[True] >= votes[False]


def _box_stats(box: tuple[float, float, float, float], segments: list[Any], markers: list[Any], vertical: bool) -> Any:
    """(centre, half width, the seed's BoxAndWhiskerData fields) of one box; None without a median.

    The quartiles are where the whiskers leave the box (a notched box's outline may reach past them); a box
    without whiskers spans them."""
    p0, p1, v0, v1 = box
    slack = (p1 - p0) * 1e-6
    center = (p0 + p1) / 2
    whiskers = []
    across = []
    for x, y in segments:
        pos, val = (x, y) if vertical else (y, x)
        if pos[0] == pos[1] and _close(pos[0], center):
            whiskers.append((float(min(val)), float(max(val))))
        elif val[0] == val[1] and p0 - slack <= min(pos) and max(pos) <= p1 + slack:
            across.append((abs((max(pos) - min(pos)) - (p1 - p0)), float(val[0])))
    middle = (v0 + v1) / 2
    lower = [w for w in whiskers if (w[0] + w[1]) / 2 <= middle]
    upper = [w for w in whiskers if (w[0] + w[1]) / 2 > middle]
    low, q1 = min(lower) if lower else (v0, v0)
    q3, high = max(upper) if upper else (v1, v1)
    # The median spans the box between the quartiles (the caps lie beyond them); the first of the widest such
    # segment, as a mean drawn as a line (meanline=True) comes after it.
    medians = [found for found in across if q1 <= found[1] <= q3]
    if not medians:
        return None
    median = min(medians, key=lambda found: found[0])[1]
    outliers = []
    for x, y in markers:
        pos, val = (x, y) if vertical else (y, x)
        if len(pos) and all(_close(p, center) for p in pos.tolist()):
            outliers += [float(v) for v in val.tolist() if math.isfinite(v) and (v < low or v > high)]
    values = {"min": low, "first_quartile": q1, "median": median, "third_quartile": q3, "max": high}
    if not all(math.isfinite(value) for value in values.values()):
        return None
    return center, (p1 - p0) / 2, {**values, "outliers": outliers}


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
