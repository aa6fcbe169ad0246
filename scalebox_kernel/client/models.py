"""What the client hands back: sandboxes, contexts, cell executions and their results, files, processes."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from ..protocol import pb
from ..protocol.charts import chart_from_pb
from ..protocol.mime import FIELD_TO_MIME, bundle_to_fields, fields_to_bundle

# ------------------------------------------------------------------------------------------------ sandboxes


def parse_time(value: Any) -> datetime | None:
    """An ISO-8601 string (with `Z` or an offset; naive means UTC) as an aware datetime; None if absent or bad."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _as_int(value: Any, default: int | None = None) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


@dataclass
class SandboxInfo:
    """A sandbox as the control plane describes it (`raw` is the whole `data` object of the answer)."""

    sandbox_id: str
    template_id: str
    state: str  # "running" | "paused" | "terminated"
    started_at: datetime | None = None
    end_at: datetime | None = None
    timeout: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    cpu_count: int = 1
    memory_mb: int = 512
    isolation: dict[str, Any] | None = None
    #: Its object storage mounts: `{"uri", "mount_point"}` each (and, in get_info, whether it is `mounted`).
    object_storage: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_api(cls, data: dict[str, Any], top_level: dict[str, Any] | None = None) -> SandboxInfo:
        """From a get-info or list item; `metadata` may sit beside `data` (a quirk of the get-info answer)."""
        started = parse_time(data.get("started_at")) or parse_time(data.get("created_at"))
        timeout = _as_int(data.get("timeout"))
        end_at = parse_time(data.get("timeout_at")) or parse_time(data.get("end_at"))
        if end_at is None and started is not None and timeout is not None:
            end_at = started + timedelta(seconds=timeout)
        metadata = data.get("metadata")
        if not isinstance(metadata, dict) and top_level:
            metadata = top_level.get("metadata")
        isolation = data.get("isolation")
        storage = data.get("object_storage")
        if isinstance(storage, dict):
            storage = [storage]
        return cls(
            sandbox_id=str(data.get("sandbox_id") or data.get("id") or ""),
            template_id=str(data.get("template_id") or data.get("template") or ""),
            state=str(data.get("status") or data.get("state") or "unknown"),
            started_at=started,
            end_at=end_at,
            timeout=timeout,
            metadata={str(k): str(v) for k, v in (metadata or {}).items()},
            cpu_count=_as_int(data.get("cpu_count"), 1) or 1,
            memory_mb=_as_int(data.get("memory_mb"), 512) or 512,
            isolation=isolation if isinstance(isolation, dict) else None,
            object_storage=[dict(item) for item in storage or [] if isinstance(item, dict)],
            raw=data,
        )


@dataclass
class SandboxMetrics:
    """One sample of a sandbox's resource use (PROTOCOL.md 1.9): CPU in percent of its `cpu_count` CPUs, memory
    and disk in bytes, taken at `timestamp`."""

    cpu_count: int
    cpu_used_pct: float
    mem_used: int
    mem_total: int
    disk_used: int
    disk_total: int
    timestamp: datetime | None = None

    @classmethod
    def from_api(cls, item: dict[str, Any]) -> SandboxMetrics:
        return cls(
            cpu_count=_as_int(item.get("cpu_count"), 0) or 0,
            cpu_used_pct=_as_float(item.get("cpu_used_pct")),
            mem_used=_as_int(item.get("mem_used"), 0) or 0,
            mem_total=_as_int(item.get("mem_total"), 0) or 0,
            disk_used=_as_int(item.get("disk_used"), 0) or 0,
            disk_total=_as_int(item.get("disk_total"), 0) or 0,
            timestamp=parse_time(item.get("timestamp")),
        )

    @classmethod
    def list_from_api(cls, data: dict[str, Any]) -> list[SandboxMetrics]:
        """The samples of a metrics answer: `data.metrics` (what Python reads), else the one sample that is `data`
        itself (what JS reads)."""
        samples = data.get("metrics")
        if isinstance(samples, list):
            return [cls.from_api(item) for item in samples if isinstance(item, dict)]
        return [cls.from_api(data)] if "cpu_used_pct" in data else []


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


@dataclass
class ScaleboxRegion:
    """A region sandboxes can be created in (`Sandbox.get_regions()`); its `id` goes into `Locality.region`."""

    id: str
    name: str


@dataclass
class Locality:
    """Where `create` should place a sandbox (PROTOCOL.md 1.9): `region` (an id from `get_regions()`) wins over
    `auto_detect`; with `force`, a region that cannot be had fails the create (HTTP 409) instead of falling back."""

    region: str | None = None
    auto_detect: bool | None = None
    force: bool | None = None

    def to_api(self) -> dict[str, Any]:
        """The create body's `locality` object (only the fields that were set)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


#: Where a bucket is mounted when no mount point is given.
DEFAULT_MOUNT_POINT = "/mnt/oss"
#: The standard AWS variables `ObjectStorage` falls back to, in order.
AWS_ENV = {
    "access_key": ("AWS_ACCESS_KEY_ID",),
    "secret_key": ("AWS_SECRET_ACCESS_KEY",),
    "region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
    "endpoint": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
}
_CAMEL = {"mountPoint": "mount_point", "accessKey": "access_key", "secretKey": "secret_key"}


@dataclass
class ObjectStorage:
    """A prefix of an S3-compatible bucket, mounted read-write at `mount_point` in a new sandbox (PROTOCOL.md 1.9):
    `uri` is `s3://bucket/prefix/` (or `oss://`, `cos://`). What is not given comes from this process's standard
    AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION or AWS_DEFAULT_REGION, AWS_ENDPOINT_URL_S3
    or AWS_ENDPOINT_URL), so that no key has to be typed into a notebook. The keys are sent once, to create the
    sandbox; no answer of the server holds them."""

    uri: str
    mount_point: str = DEFAULT_MOUNT_POINT
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    region: str | None = None
    endpoint: str | None = None

    @classmethod
    def of(cls, value: ObjectStorage | Mapping[str, Any]) -> ObjectStorage:
        """From an ObjectStorage or a dict with the SDKs' names (snake_case, or the JS SDK's camelCase)."""
        if isinstance(value, ObjectStorage):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"object_storage must be an ObjectStorage or a dict, not {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        given = {_CAMEL.get(str(k), str(k)): v for k, v in value.items()}
        unknown = sorted(set(given) - known)
        if unknown:
            raise TypeError(f"object_storage has no field {unknown[0]!r}; it has {', '.join(sorted(known))}")
        if not given.get("uri"):
            raise TypeError("object_storage needs a uri, like s3://bucket/prefix/")
        return cls(**{k: v for k, v in given.items() if v is not None})

    def to_api(self, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The create body's entry, with the AWS variables filling what is missing; ValueError names what no
        argument or variable gave."""
        environ = os.environ if environ is None else environ
        body: dict[str, Any] = {"uri": self.uri, "mount_point": self.mount_point or DEFAULT_MOUNT_POINT}
        for name, variables in AWS_ENV.items():
            value = getattr(self, name) or next((environ[v] for v in variables if environ.get(v)), None)
            if value:
                body[name] = value
        for name in ("access_key", "secret_key"):
            if name not in body:
                variable = AWS_ENV[name][0]
                raise ValueError(f"no {name} for {self.uri}: set {variable} (or pass {name}=)")
        if "region" not in body and "endpoint" not in body:
            raise ValueError(f"no region or endpoint for {self.uri}: set AWS_REGION or AWS_ENDPOINT_URL")
        return body


@dataclass
class Context:
    """A code context: one kernel of one language inside the sandbox, keeping its state between cells."""

    id: str
    language: str
    cwd: str

    @classmethod
    def from_pb(cls, message: pb.Context) -> Context:
        return cls(id=message.id, language=message.language, cwd=message.cwd)


# ------------------------------------------------------------------------------------------------ execution


@dataclass
class OutputMessage:
    """One chunk of stdout or stderr, as it arrived (`timestamp` is the client's clock, in ns since the epoch)."""

    line: str
    timestamp: int = field(default_factory=time.time_ns)
    error: bool = False

    def __str__(self) -> str:
        return self.line


@dataclass
class ExecutionError:
    """An exception raised by the cell: its class name, its message and the whole traceback as one string."""

    name: str
    value: str
    traceback: str

    @classmethod
    def from_pb(cls, message: pb.Error) -> ExecutionError:
        return cls(name=message.name, value=message.value, traceback=message.traceback)


_RESULT_FIELDS = [*FIELD_TO_MIME, "data"]


@dataclass
class Result:
    """One output of a cell (`execute_result` when `is_main_result`, else `display_data`), in every format it has.

    `chart` is the data of a matplotlib figure the cell showed (next to its `png`), as a dict in the seed SDK's
    chart shape: `type` (`line`, `scatter`, `bar`, `pie`, `box_and_whisker`, `superchart`), `title`, `elements`
    and, by type, `x_label`/`y_label`/`x_unit`/`y_unit`, `x_ticks`/`x_tick_labels`/`x_scale` (and `y_…`), and
    `extra` (`{"truncated": "true", …}` when points were left out). See protocol/charts.py for every field.
    """

    text: str | None = None
    html: str | None = None
    markdown: str | None = None
    svg: str | None = None
    png: str | None = None
    jpeg: str | None = None
    pdf: str | None = None
    latex: str | None = None
    json: str | None = None
    javascript: str | None = None
    data: str | None = None
    chart: dict[str, Any] | None = None
    extra: dict[str, str] = field(default_factory=dict)
    execution_count: int | None = None
    is_main_result: bool = False

    @classmethod
    def from_pb(cls, message: pb.Result) -> Result:
        values: dict[str, Any] = {name: getattr(message, name) or None for name in _RESULT_FIELDS}
        chart = chart_from_pb(message.chart) if message.HasField("chart") and message.chart.ByteSize() else None
        return cls(
            **values,
            chart=chart,
            extra=dict(message.extra),
            execution_count=message.execution_count or None,
            is_main_result=message.is_main_result,
        )

    @classmethod
    def from_bundle(
        cls, bundle: dict[str, Any], *, execution_count: int | None = None, is_main_result: bool = False
    ) -> Result:
        """A Jupyter MIME bundle (a kernel's display_data or execute_result `data`) as a Result."""
        message = pb.Result(**bundle_to_fields(bundle, json_in_extra=False), is_main_result=is_main_result)
        result = cls.from_pb(message)
        result.execution_count = execution_count
        return result

    def formats(self) -> list[str]:
        """The non-empty formats, in the seed SDK's order, then the `extra` MIME types."""
        names = [name for name in [*_RESULT_FIELDS, "chart"] if getattr(self, name)]
        return names + list(self.extra)

    def to_bundle(self) -> dict[str, Any]:
        """The result as a Jupyter MIME bundle (`{"text/plain": ..., "image/png": ...}`)."""
        return fields_to_bundle({f.name: getattr(self, f.name) for f in fields(self)})

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        bundle = self.to_bundle()
        if include:
            bundle = {k: v for k, v in bundle.items() if k in include}
        if exclude:
            bundle = {k: v for k, v in bundle.items() if k not in exclude}
        return bundle

    def __repr__(self) -> str:
        shown = f"text={self.text!r}" if self.text is not None else ""
        return f"Result({shown}{', ' if shown else ''}formats={self.formats()!r}, is_main_result={self.is_main_result})"


@dataclass
class Logs:
    """Everything the cell wrote to stdout and stderr, chunk by chunk."""

    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)


@dataclass
class Execution:
    """The outcome of one `run_code`: its results, its output, and the error it raised if any."""

    results: list[Result] = field(default_factory=list)
    logs: Logs = field(default_factory=Logs)
    error: ExecutionError | None = None
    execution_count: int | None = None

    @property
    def text(self) -> str | None:
        """The text of the main result (the value of the cell's last expression)."""
        for result in self.results:
            if result.is_main_result:
                return result.text
        return None


# ------------------------------------------------------------------------------------------------ files


class FileType(StrEnum):
    FILE = "file"
    DIR = "dir"


def _timestamp(message: Timestamp) -> datetime | None:
    if not message.seconds and not message.nanos:
        return None
    return message.ToDatetime(tzinfo=UTC)


@dataclass
class EntryInfo:
    """A file or directory in the sandbox."""

    name: str
    type: FileType | None
    path: str
    size: int = 0
    mode: int = 0
    permissions: str = ""
    owner: str = ""
    group: str = ""
    modified_time: datetime | None = None
    symlink_target: str | None = None

    @classmethod
    def from_pb(cls, message: pb.EntryInfo) -> EntryInfo:
        kind = {pb.FILE_TYPE_FILE: FileType.FILE, pb.FILE_TYPE_DIRECTORY: FileType.DIR}.get(message.type)
        return cls(
            name=message.name,
            type=kind,
            path=message.path,
            size=message.size,
            mode=message.mode,
            permissions=message.permissions,
            owner=message.owner,
            group=message.group,
            modified_time=_timestamp(message.modified_time) if message.HasField("modified_time") else None,
            symlink_target=message.symlink_target if message.HasField("symlink_target") else None,
        )


_EVENT_NAMES = {
    pb.EVENT_TYPE_CREATE: "create",
    pb.EVENT_TYPE_WRITE: "write",
    pb.EVENT_TYPE_REMOVE: "remove",
    pb.EVENT_TYPE_RENAME: "rename",
    pb.EVENT_TYPE_CHMOD: "chmod",
}


@dataclass
class FilesystemEvent:
    """A change under a watched directory: `name` is relative to it, `type` is create/write/remove/rename/chmod."""

    name: str
    type: str

    @classmethod
    def from_pb(cls, message: pb.FilesystemEvent) -> FilesystemEvent:
        return cls(name=message.name, type=_EVENT_NAMES.get(message.type, "unknown"))


# ------------------------------------------------------------------------------------------------ processes


@dataclass
class CommandResult:
    """How a command ended: everything it wrote, its exit code, and the agent's error text if any."""

    stdout: str
    stderr: str
    exit_code: int
    error: str | None = None


@dataclass
class ProcessInfo:
    """A process the agent started and still tracks."""

    pid: int
    tag: str | None
    cmd: str
    args: list[str]
    envs: dict[str, str]
    cwd: str | None

    @classmethod
    def from_pb(cls, message: pb.ProcessInfo) -> ProcessInfo:
        config = message.config
        return cls(
            pid=message.pid,
            tag=message.tag if message.HasField("tag") else None,
            cmd=config.cmd,
            args=list(config.args),
            envs=dict(config.envs),
            cwd=config.cwd if config.HasField("cwd") else None,
        )
