"""The one mapping between Jupyter MIME bundles and the protocol's `Result` fields (PROTOCOL.md section 5.4).

scalebox-local uses it to turn kernel output into `Result` messages; the kernel and the magics use it to turn
results back into bundles. `application/json` never goes into `Result.json` for proto-codec clients, because
the official Python SDK 1.0.10 crashes on a non-empty `json` or `data` (section 5.5): it travels in `extra`.
A figure's chart (CHART_MIME, a chart dict of charts.py) becomes the `chart` message, never an `extra` entry.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from . import sandboxagent_pb2 as pb
from .charts import chart_from_pb, chart_to_pb

# Result field -> MIME type, in the order the seed SDK lists formats.
FIELD_TO_MIME: dict[str, str] = {
    "text": "text/plain",
    "html": "text/html",
    "markdown": "text/markdown",
    "svg": "image/svg+xml",
    "png": "image/png",
    "jpeg": "image/jpeg",
    "pdf": "application/pdf",
    "latex": "text/latex",
    "json": "application/json",
    "javascript": "application/javascript",
}
MIME_TO_FIELD: dict[str, str] = {mime: field for field, mime in FIELD_TO_MIME.items()}

#: The field that carries structured data (a DataFrame's records, say); no Jupyter MIME type of its own.
DATA_MIME = "application/vnd.scalebox.data+json"
#: The `chart` field: the chart dict a Python sandbox's kernel shows beside each matplotlib figure's PNG.
CHART_MIME = "application/vnd.scalebox.chart+json"


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(part, str) for part in value):
        return "".join(value)  # nbformat's multi-line strings
    return json.dumps(value)


def bundle_to_fields(bundle: Mapping[str, Any], *, json_in_extra: bool) -> dict[str, Any]:
    """A Jupyter MIME bundle as `Result` keyword arguments (`extra` holds every type without a field)."""
    fields: dict[str, Any] = {}
    extra: dict[str, str] = {}
    for mime, value in bundle.items():
        field = MIME_TO_FIELD.get(mime)
        if field == "json" and json_in_extra:
            extra[mime] = _as_text(value)
        elif mime == CHART_MIME and (chart := _chart_message(value)) is not None:
            fields["chart"] = chart
        elif mime == DATA_MIME:
            if json_in_extra:
                extra[mime] = _as_text(value)
            else:
                fields["data"] = _as_text(value)
        elif field:
            fields[field] = _as_text(value)
        else:
            extra[mime] = _as_text(value)
    if extra:
        fields["extra"] = extra
    return fields


def fields_to_bundle(fields: Mapping[str, Any]) -> dict[str, Any]:
    """`Result` fields (a message, a dataclass as dict, ...) back into a Jupyter MIME bundle."""
    bundle: dict[str, Any] = {}
    for field, mime in FIELD_TO_MIME.items():
        value = fields.get(field)
        if not value:
            continue
        bundle[mime] = _json_or_text(value) if mime == "application/json" else value
    if fields.get("data"):
        bundle[DATA_MIME] = _json_or_text(fields["data"])
    chart = fields.get("chart")
    if isinstance(chart, pb.Chart):
        chart = chart_from_pb(chart) if chart.ByteSize() else None
    if chart:
        bundle[CHART_MIME] = chart
    for mime, value in (fields.get("extra") or {}).items():
        if "/" not in mime:
            continue  # not a MIME type; the seed SDK puts nothing else there, but be safe
        is_json = mime == "application/json" or mime.endswith("+json")
        bundle.setdefault(mime, _json_or_text(value) if is_json else value)
    return bundle


def _json_or_text(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _chart_message(value: Any) -> pb.Chart | None:
    """The `chart` message of a chart MIME value (a dict, or its JSON text); None if it is not a chart, and it
    then stays in `extra` as it came."""
    try:
        chart = json.loads(value) if isinstance(value, str) else value
        return chart_to_pb(chart)
    except (TypeError, ValueError, KeyError, RecursionError):
        return None
