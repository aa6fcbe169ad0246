"""The Filesystem service, /upload and /download on scalebox-local, and that none of them can leave the sandbox."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_support import CODEC_IDS, CODECS, Box, wait_for
from conftest import LocalServer
from google.protobuf.message import Message

from scalebox_kernel.protocol import connect, pb

FS = "sandboxagent.Filesystem/"
SECRET = "host-secret-7f3a9c"


@pytest.fixture(scope="module")
def box(local_server: LocalServer, http: httpx.Client) -> Iterator[Box]:
    sandbox = Box(local_server, http)
    yield sandbox
    sandbox.kill()


def upload(box: Box, path: str, data: bytes, *, token: str | None = None) -> httpx.Response:
    """What the Python SDK sends: multipart `path` first, then `file` named by the full path."""
    return box.http.post(
        f"{box.base}/upload",
        data={"path": path},
        files={"file": (path, data)},
        headers={"X-Access-Token": token or box.token},
    )


def download(box: Box, path: str) -> httpx.Response:
    return box.http.get(f"{box.base}/download/{path.lstrip('/')}", headers={"X-Access-Token": box.token})


def stat(box: Box, path: str, codec: connect.Codec = connect.PROTO) -> tuple[int, Any]:
    status, body = box.unary(FS + "Stat", pb.StatRequest(path=path), pb.StatResponse, codec)
    return status, body.entry if status == 200 else body


@pytest.mark.parametrize("codec", CODECS, ids=CODEC_IDS)
def test_stat_fills_every_field(box: Box, codec: connect.Codec) -> None:
    assert upload(box, "/workspace/stat.txt", b"12345").status_code == 200
    status, entry = stat(box, "/workspace/stat.txt", codec)
    assert status == 200
    assert (entry.name, entry.type, entry.path, entry.size) == ("stat.txt", pb.FILE_TYPE_FILE, "/workspace/stat.txt", 5)
    assert entry.mode == 0o644 and entry.permissions == "rw-r--r--"
    assert entry.owner and entry.group and abs(entry.modified_time.seconds - time.time()) < 60
    assert not entry.HasField("symlink_target")
    status, entry = stat(box, "/home/user", codec)
    assert entry.type == pb.FILE_TYPE_DIRECTORY and entry.permissions == "rwxr-xr-x" and entry.name == "user"

    status, body = stat(box, "/workspace/missing.txt", codec)
    assert status == 404 and body["code"] == "not_found"
    # Python's files.exists() looks for the first substring, JS's for the second.
    assert "no such file or directory" in body["message"] and "not found" in body["message"]


def test_relative_paths_resolve_against_home(box: Box) -> None:
    r = upload(box, "notes/rel.txt", b"relative")
    assert r.status_code == 200 and r.json() == {"path": "/home/user/notes/rel.txt", "name": "rel.txt", "type": "file"}
    assert stat(box, "/home/user/notes/rel.txt")[1].size == 8
    assert stat(box, "notes/../notes/rel.txt")[1].path == "/home/user/notes/rel.txt"
    # The SDKs strip the leading slash on download, so a relative name is found where an upload put it.
    assert download(box, "notes/rel.txt").content == b"relative"


@pytest.mark.parametrize("codec", CODECS, ids=CODEC_IDS)
def test_make_dir_creates_parents_and_reports_existing(box: Box, codec: connect.Codec) -> None:
    path = f"/workspace/made-{codec.name}/a/b"
    made = box.ok(FS + "MakeDir", pb.MakeDirRequest(path=path), pb.MakeDirResponse, codec)
    assert made.entry.path == path and made.entry.type == pb.FILE_TYPE_DIRECTORY
    status, body = box.unary(FS + "MakeDir", pb.MakeDirRequest(path=path), pb.MakeDirResponse, codec)
    assert status == 409 and body["code"] == "already_exists" and "directory already exists" in body["message"]


@pytest.mark.parametrize("codec", CODECS, ids=CODEC_IDS)
def test_move_list_and_remove(box: Box, codec: connect.Codec) -> None:
    top = f"/workspace/tree-{codec.name}"
    for name in ("a.txt", "sub/b.txt", "sub/deeper/c.txt"):
        assert upload(box, f"{top}/{name}", name.encode()).status_code == 200

    moved = box.ok(FS + "Move", pb.MoveRequest(source=f"{top}/a.txt", destination=f"{top}/new/z.txt"), pb.MoveResponse)
    assert moved.entry.path == f"{top}/new/z.txt" and moved.entry.size == len(b"a.txt")
    assert stat(box, f"{top}/a.txt")[0] == 404
    status, body = box.unary(FS + "Move", pb.MoveRequest(source=f"{top}/gone", destination=f"{top}/x"), pb.MoveResponse)
    assert status == 404 and "no such file or directory" in body["message"]

    listed = box.ok(FS + "ListDir", pb.ListDirRequest(path=top, depth=1), pb.ListDirResponse, codec)
    directory = pb.FILE_TYPE_DIRECTORY
    assert [(e.name, e.type) for e in listed.entries] == [("new", directory), ("sub", directory)]
    deep = box.ok(FS + "ListDir", pb.ListDirRequest(path=top, depth=3), pb.ListDirResponse, codec)
    assert {e.path for e in deep.entries} == {
        f"{top}/{p}" for p in ("new", "new/z.txt", "sub", "sub/b.txt", "sub/deeper", "sub/deeper/c.txt")
    }
    status, body = box.unary(FS + "ListDir", pb.ListDirRequest(path=f"{top}/new/z.txt"), pb.ListDirResponse, codec)
    assert status == 400 and "not a directory" in body["message"]

    box.ok(FS + "Remove", pb.RemoveRequest(path=f"{top}/new/z.txt"), pb.RemoveResponse, codec)
    box.ok(FS + "Remove", pb.RemoveRequest(path=f"{top}/sub"), pb.RemoveResponse, codec)  # recursive
    left = box.ok(FS + "ListDir", pb.ListDirRequest(path=top), pb.ListDirResponse, codec)
    assert [e.name for e in left.entries] == ["new"]
    status, body = box.unary(FS + "Remove", pb.RemoveRequest(path=f"{top}/sub"), pb.RemoveResponse, codec)
    assert status == 404 and body["code"] == "not_found"
    status, body = box.unary(FS + "Remove", pb.RemoveRequest(path="/"), pb.RemoveResponse, codec)
    assert status == 403 and stat(box, "/home/user")[0] == 200


def test_upload_and_download_round_trip_binary(box: Box) -> None:
    data = bytes(range(256)) * 4000  # ~1 MB, every byte value
    r = upload(box, "/tmp/deep/new/dirs/blob.bin", data)
    assert r.status_code == 200 and r.json()["path"] == "/tmp/deep/new/dirs/blob.bin"
    got = download(box, "/tmp/deep/new/dirs/blob.bin")
    assert got.status_code == 200 and got.content == data
    assert got.headers["content-type"] == "application/octet-stream"
    # Overwriting replaces the file whole.
    assert upload(box, "/tmp/deep/new/dirs/blob.bin", b"short").status_code == 200
    assert download(box, "/tmp/deep/new/dirs/blob.bin").content == b"short"


def test_upload_part_order_and_query_path(box: Box) -> None:
    # JS sends `file` before `path`; the signed-URL form puts the path in the query.
    boundary = "sbx-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="/tmp/js.txt"\r\n'
        "Content-Type: application/octet-stream\r\n\r\nfrom js\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="path"\r\n\r\n/tmp/js.txt\r\n--{boundary}--\r\n'
    ).encode()
    headers = {"X-Access-Token": box.token, "Content-Type": f"multipart/form-data; boundary={boundary}"}
    assert box.http.post(f"{box.base}/upload", content=body, headers=headers).status_code == 200
    assert download(box, "/tmp/js.txt").content == b"from js"

    r = box.http.post(
        f"{box.base}/upload",
        params={"path": "/tmp/query.txt"},
        files={"file": ("ignored-name", b"by query")},
        headers={"X-Access-Token": box.token},
    )
    assert r.status_code == 200 and download(box, "/tmp/query.txt").content == b"by query"


def test_bad_uploads_and_downloads_are_clear(box: Box) -> None:
    headers = {"X-Access-Token": box.token}
    r = box.http.post(f"{box.base}/upload", content=b"plain", headers={**headers, "Content-Type": "text/plain"})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["message"]
    r = box.http.post(f"{box.base}/upload", data={"path": "/tmp/nofile"}, files={"other": ("x", b"x")}, headers=headers)
    assert r.status_code == 400 and "'file'" in r.json()["message"]
    assert upload(box, "/home/user", b"x").status_code == 400  # a directory
    r = download(box, "/tmp/never-written.txt")
    assert r.status_code == 404 and "no such file or directory" in r.json()["message"]
    r = download(box, "/home/user")
    assert r.status_code == 400 and "directory" in r.json()["message"]
    assert stat(box, "/tmp/nofile")[0] == 404  # nothing half-written stayed behind


def test_upload_limit(server_factory: Callable[..., LocalServer]) -> None:
    server = server_factory(extra=["--ServerSettings.max_upload_bytes=1000"])
    with server.client() as http:
        sandbox = Box(server, http)
        assert upload(sandbox, "/tmp/small.bin", b"x" * 1000).status_code == 200
        r = upload(sandbox, "/tmp/big.bin", b"x" * 5000)
        assert r.status_code == 413 and "1000 bytes" in r.json()["message"]
        assert stat(sandbox, "/tmp/big.bin")[0] == 404
        assert download(sandbox, "/tmp/small.bin").content == b"x" * 1000
        listed = sandbox.ok(FS + "ListDir", pb.ListDirRequest(path="/tmp"), pb.ListDirResponse)
        assert [e.name for e in listed.entries] == ["small.bin"]  # the rejected upload left nothing behind
        sandbox.kill()
    server.stop()


def test_polled_watcher_reports_changes(box: Box) -> None:
    box.ok(FS + "MakeDir", pb.MakeDirRequest(path="/workspace/watched"), pb.MakeDirResponse)
    created = box.ok(FS + "CreateWatcher", pb.CreateWatcherRequest(path="/workspace/watched"), pb.CreateWatcherResponse)
    events_request = pb.GetWatcherEventsRequest(watcher_id=created.watcher_id)
    time.sleep(0.3)
    upload(box, "/workspace/watched/new.txt", b"1")

    def events() -> list[tuple[str, int]]:
        got = box.ok(FS + "GetWatcherEvents", events_request, pb.GetWatcherEventsResponse)
        return [(e.name, e.type) for e in got.events]

    assert ("new.txt", pb.EVENT_TYPE_CREATE) in wait_for(events, timeout=5)
    box.ok(FS + "Remove", pb.RemoveRequest(path="/workspace/watched/new.txt"), pb.RemoveResponse)
    assert ("new.txt", pb.EVENT_TYPE_REMOVE) in wait_for(events, timeout=5)

    box.ok(FS + "RemoveWatcher", pb.RemoveWatcherRequest(watcher_id=created.watcher_id), pb.RemoveWatcherResponse)
    status, body = box.unary(FS + "GetWatcherEvents", events_request, pb.GetWatcherEventsResponse)
    assert status == 404 and body["code"] == "not_found"
    status, body = box.unary(FS + "CreateWatcher", pb.CreateWatcherRequest(path="/nope"), pb.CreateWatcherResponse)
    assert status == 404


@pytest.mark.parametrize("codec", CODECS, ids=CODEC_IDS)
def test_watch_dir_stream(box: Box, codec: connect.Codec) -> None:
    directory = f"/workspace/stream-{codec.name}"
    box.ok(FS + "MakeDir", pb.MakeDirRequest(path=directory + "/sub"), pb.MakeDirResponse)
    request = pb.WatchDirRequest(path=directory, recursive=True)
    headers = {"Keepalive-Ping-Interval": "1"}
    with box.open(FS + "WatchDir", request, pb.WatchDirResponse, codec, **headers) as frames:
        assert frames.next().message.HasField("start")
        writer = threading.Timer(1.5, upload, (box, f"{directory}/sub/file.txt", b"x"))
        writer.start()
        seen: list[str] = []
        for frame in frames:
            seen.append(frame.message.WhichOneof("event"))
            if frame.message.HasField("filesystem"):
                assert frame.message.filesystem.name == "sub/file.txt"
                assert frame.message.filesystem.type == pb.EVENT_TYPE_CREATE
                break
        writer.join()
    assert "keepalive" in seen and seen[-1] == "filesystem"


# ---------------------------------------------------------------------------- escapes


@pytest.fixture(scope="module")
def planted(box: Box, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A host file outside the sandbox, and symlinks to it (and to /) planted by a command inside."""
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.txt").write_text(SECRET)
    reply = box.run(f"ln -s {outside} escape_dir && ln -s {outside}/secret.txt escape_file && ln -s / root_link")
    assert [m.event.end.exit_code for m in reply.messages if m.event.HasField("end")] == [0]
    return outside


ESCAPES = ["/home/user/escape_dir/secret.txt", "escape_file", "escape_dir", "root_link/etc/passwd"]


def _calls(path: str) -> list[tuple[str, Message, type[Message]]]:
    """One request per Filesystem RPC that takes a path, each aimed at (or below) `path`."""
    return [
        ("Stat", pb.StatRequest(path=path), pb.StatResponse),
        ("ListDir", pb.ListDirRequest(path=path), pb.ListDirResponse),
        ("MakeDir", pb.MakeDirRequest(path=path + "/new"), pb.MakeDirResponse),
        ("Move", pb.MoveRequest(source="/tmp/src.txt", destination=path + "/moved"), pb.MoveResponse),
        ("Move", pb.MoveRequest(source=path + "/x", destination="/tmp/dst.txt"), pb.MoveResponse),
        ("Remove", pb.RemoveRequest(path=path + "/x"), pb.RemoveResponse),
        ("CreateWatcher", pb.CreateWatcherRequest(path=path), pb.CreateWatcherResponse),
    ]


def _no_leak(text: str, outside: Path) -> None:
    """Neither the host file's content nor the host's own /etc/passwd shows (the links' own text, which the
    sandbox wrote, may)."""
    assert SECRET not in text and "daemon:x:1:1" not in text


@pytest.mark.parametrize("path", ESCAPES)
def test_no_file_api_follows_a_symlink_out_of_the_sandbox(box: Box, planted: Path, path: str) -> None:
    """Links are resolved inside the sandbox, as its own processes resolve them: a link to a host path means that
    path in the sandbox (which does not exist there), and `/` is the sandbox's own root."""
    upload(box, "/tmp/src.txt", b"source")
    for method, request, response_type in _calls(path):
        status, body = box.unary(FS + method, request, response_type)
        assert status < 500, (method, body)
        _no_leak(str(body), planted)
    r = download(box, path)
    assert r.status_code in (200, 400, 404)
    _no_leak(r.text, planted)
    r = upload(box, path + "/planted.txt", b"planted")
    assert r.status_code < 500
    _no_leak(r.text, planted)
    for cwd in (path, "/home/user/escape_dir"):  # commands and contexts cannot start on the host either
        status, body = box.unary(
            "sandboxagent.ContextService/CreateContext", pb.CreateContextRequest(cwd=cwd), pb.Context
        )
        assert status < 500
        _no_leak(str(body), planted)
    assert sorted(p.name for p in planted.iterdir()) == ["secret.txt"]  # nothing was written outside
    assert (planted / "secret.txt").read_text() == SECRET


@pytest.mark.parametrize("climb", ["../../..", "/../../..", "/home/user/../../../../.."])
def test_dot_dot_stops_at_the_sandbox_root(box: Box, planted: Path, climb: str, local_server: LocalServer) -> None:
    status, entry = stat(box, f"{climb}/etc/passwd")
    assert status == 200 and entry.path == "/etc/passwd"  # the sandbox's own /etc/passwd
    r = box.http.get(  # in the URL path, the client itself would fold the dots away
        f"{box.base}/download/x", params={"path": f"{climb}/etc/passwd"}, headers={"X-Access-Token": box.token}
    )
    assert r.status_code == 200 and "sandbox user" in r.text and "daemon:x:1:1" not in r.text
    # Writing "above" the root lands inside the sandbox, never in the host directory of that name.
    target = f"{climb}{planted}/climb.txt"
    r = upload(box, target, b"climbed")
    assert r.status_code == 200 and r.json()["path"] == f"{planted}/climb.txt"
    assert not (planted / "climb.txt").exists()
    inside = local_server.data_dir / "sandboxes" / box.id / "root" / str(planted).lstrip("/") / "climb.txt"
    assert inside.read_bytes() == b"climbed"
    box.ok(FS + "Remove", pb.RemoveRequest(path=f"{planted}/climb.txt"), pb.RemoveResponse)


def test_final_symlinks_resolve_inside_and_are_replaced_or_removed_themselves(box: Box, planted: Path) -> None:
    assert download(box, "/home/user/escape_file").status_code == 404  # its target does not exist in the sandbox
    status, entry = stat(box, "/home/user/escape_file")
    assert status == 200 and entry.symlink_target == f"{planted}/secret.txt"  # the link's own text
    # Listing the home shows the links without following them.
    listed = box.ok(FS + "ListDir", pb.ListDirRequest(path="/home/user", depth=2), pb.ListDirResponse)
    links = {e.name: e for e in listed.entries if e.HasField("symlink_target")}
    assert {"escape_dir", "escape_file", "root_link"} <= set(links)
    assert not any(e.path.startswith("/home/user/root_link/") for e in listed.entries)
    # An upload gives the name a new file: the link is replaced, never written through.
    assert upload(box, "/home/user/escape_file", b"overwrite").status_code == 200
    assert download(box, "/home/user/escape_file").content == b"overwrite"
    assert (planted / "secret.txt").read_text() == SECRET
    box.ok(FS + "Remove", pb.RemoveRequest(path="/home/user/root_link"), pb.RemoveResponse)  # the link only
    assert stat(box, "/home/user/root_link")[0] == 404 and stat(box, "/etc/passwd")[0] == 200


@pytest.mark.parametrize("codec", CODECS, ids=CODEC_IDS)
def test_nul_bytes_and_empty_paths_are_invalid(box: Box, codec: connect.Codec) -> None:
    for path in ("/tmp/a\x00b", ""):
        for method, request, response_type in (
            ("Stat", pb.StatRequest(path=path), pb.StatResponse),
            ("ListDir", pb.ListDirRequest(path=path), pb.ListDirResponse),
            ("MakeDir", pb.MakeDirRequest(path=path), pb.MakeDirResponse),
            ("Remove", pb.RemoveRequest(path=path), pb.RemoveResponse),
            ("Move", pb.MoveRequest(source=path, destination="/tmp/x"), pb.MoveResponse),
        ):
            status, body = box.unary(FS + method, request, response_type, codec)
            assert status == 400 and body["code"] == "invalid_argument", (method, body)
    assert download(box, "/tmp/a%00b").status_code == 400
    r = box.http.post(
        f"{box.base}/upload",
        params={"path": "/tmp/a\x00b"},
        files={"file": ("f", b"x")},
        headers={"X-Access-Token": box.token},
    )
    assert r.status_code == 400 and "NUL" in r.json()["message"]
    # And the server keeps serving.
    assert stat(box, "/home/user", codec)[0] == 200


DEEP_TREE = (
    "python3 -c \"import os; os.chdir(os.path.expanduser('~')); "  # ~: the sandbox's home, confined or not
    "[(os.mkdir('d'), os.chdir('d')) for _ in range(1100)]; open('leaf.txt', 'w').write('x')\""
)


@pytest.mark.parametrize("isolation", ["isolated", "none"])
def test_trees_of_any_depth_are_removed_with_their_sandbox(
    server_factory: Callable[..., LocalServer], isolation: str
) -> None:
    """A 1,100-level tree (deeper than Python's recursion limit) goes with Remove, and with its sandbox."""
    server = server_factory(extra=["--no-isolation"] if isolation == "none" else [])
    with server.client() as http:
        http.timeout = httpx.Timeout(60)
        sandbox = Box(server, http)
        end = [m.event.end for m in sandbox.run(DEEP_TREE).messages if m.event.HasField("end")]
        assert end and end[0].exit_code == 0
        sandbox.ok(FS + "Remove", pb.RemoveRequest(path="/home/user/d"), pb.RemoveResponse)
        assert stat(sandbox, "/home/user/d")[0] == 404
        end = [m.event.end for m in sandbox.run(DEEP_TREE).messages if m.event.HasField("end")]
        assert end and end[0].exit_code == 0
        r = http.delete(f"/v1/sandboxes/{sandbox.id}")
        assert r.status_code == 200, r.text
        assert not (server.data_dir / "sandboxes" / sandbox.id).exists()
        assert http.get(f"/v1/sandboxes/{sandbox.id}").status_code == 404
    server.stop()
