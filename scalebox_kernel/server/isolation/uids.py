"""Sandbox uids, unique on the whole machine: every scalebox-local server (whatever its data dir) claims them in
one registry, so no two sandboxes ever share a uid (its files, keyring, per-uid process limit, signals).

The registry is a root-only directory with one file per claimed uid, naming the sandbox record (`isolation.json`
in the sandbox's private directory) that holds it; an entry is stale once that record is gone or names another
uid, so a server killed with -9, a reboot or a deleted data dir never leaks uids. Claims are made under a lock,
and a uid that any live process has, or that /etc/passwd knows, is never handed out.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REGISTRY = Path("/var/lib/scalebox-local/uids")
RECORD = "isolation.json"


class UidsExhausted(RuntimeError):
    """Every uid of the configured range is taken."""


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int


@contextlib.contextmanager
def _locked(registry: Path) -> Iterator[None]:
    registry.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(registry / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _recorded_uid(record: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return int(json.loads(record.read_text())["uid"])
    return None


def _holder(registry: Path, uid: int) -> Path | None:
    """The record that validly holds `uid` in the registry, if any."""
    try:
        owner = Path((registry / str(uid)).read_text().strip())
    except OSError:
        return None
    return owner if _recorded_uid(owner) == uid else None


def _uids_in_use() -> set[int]:
    """Every uid (real, effective, saved, filesystem) of a live process on this machine."""
    used: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError), open(f"/proc/{entry}/status") as handle:
            for line in handle:
                if line.startswith("Uid:"):
                    used.update(int(value) for value in line.split()[1:])
                    break
    return used


def _known_to_passwd(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def _write_record(record: Path, uid: int) -> None:
    record.parent.mkdir(parents=True, exist_ok=True)
    temp = record.with_suffix(".tmp")
    temp.write_text(json.dumps({"uid": uid}))
    os.replace(temp, record)


def claim(record: Path, *, base: int, count: int, registry: Path = REGISTRY) -> tuple[Identity, bool]:
    """The sandbox's identity: the uid its record names when that is still its own, else the lowest free uid of
    the range (recorded now). Returns it and whether it is new (the sandbox's files must then be chowned)."""
    record = Path(os.path.abspath(record))
    with _locked(registry):
        recorded = _recorded_uid(record)
        if recorded is not None and base <= recorded < base + count:
            holder = _holder(registry, recorded)
            if holder is None or holder == record:
                (registry / str(recorded)).write_text(str(record))
                return Identity(recorded, recorded), False
        in_use = _uids_in_use()
        for uid in range(base, base + count):
            if uid in in_use or _holder(registry, uid) is not None or _known_to_passwd(uid):
                continue
            _write_record(record, uid)
            (registry / str(uid)).write_text(str(record))
            return Identity(uid, uid), True
    raise UidsExhausted(
        f"no free sandbox uid left in {base}..{base + count - 1} on this machine; kill idle sandboxes or widen "
        "ServerSettings.sandbox_uid_base's range"
    )


def release(record: Path, registry: Path = REGISTRY) -> None:
    """Give the uid of a sandbox that is gone back to the machine."""
    record = Path(os.path.abspath(record))
    uid = _recorded_uid(record)
    if uid is None:
        return
    with _locked(registry):
        entry = registry / str(uid)
        with contextlib.suppress(OSError):
            if Path(entry.read_text().strip()) == record:
                entry.unlink()
