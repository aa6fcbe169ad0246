"""Object storage (issue 14): a bucket prefix of a real S3 server (moto, on loopback) mounted into a sandbox with s3fs.

Cells read and write it, a big prefix lists, pause keeps it, kill and expiry unmount it, a restarted server mounts it
again, no other sandbox sees it, bad requests are a 400 that leaves nothing behind, and neither key shows up
anywhere but in the mount's own private file.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from client_support import config_for
from conftest import LocalServer
from IPython.core.interactiveshell import InteractiveShell
from magics_support import magics, ok, run
from s3_support import MotoServer, fuse_mounts, s3fs_processes, start_moto

from scalebox_kernel.client import ObjectStorage, Sandbox
from scalebox_kernel.server.isolation import capabilities
from scalebox_kernel.server.isolation.buckets import fuse_problem
from scalebox_kernel.session import Session

CAPS = capabilities()
PROBLEM = fuse_problem() or (None if CAPS.namespaces else "no namespaces: " + "; ".join(CAPS.problems))
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=f"object storage mounts are off here: {PROBLEM}")

#: Objects in the big prefix: "a few thousand".
MANY = 2000


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto without authentication, holding bucket `data`: `prefix/` with two files, `many/` with MANY."""
    server = start_moto(tmp_path_factory.mktemp("moto"), auth=False)
    client = server.s3()
    client.create_bucket(Bucket="data")
    client.put_object(Bucket="data", Key="prefix/hello.txt", Body=b"hello from the bucket\n")
    client.put_object(Bucket="data", Key="prefix/sub/deep.txt", Body=b"deep\n")
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: client.put_object(Bucket="data", Key=f"many/f{i:05d}", Body=b"x"), range(MANY)))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def strict_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto checking every signature: only its IAM user's keys are good; bucket `vault` holds one file."""
    server = start_moto(tmp_path_factory.mktemp("moto-strict"), auth=True)
    client = server.s3()
    client.create_bucket(Bucket="vault")
    client.put_object(Bucket="vault", Key="docs/secret-plan.txt", Body=b"the plan\n")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., LocalServer]) -> LocalServer:
    return server_factory()


@pytest.fixture(scope="module")
def http(server: LocalServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        client.timeout = httpx.Timeout(120)
        yield client


def storage(s3: MotoServer, uri: str, mount_point: str) -> ObjectStorage:
    return ObjectStorage(
        uri=uri,
        mount_point=mount_point,
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        endpoint=s3.url,
        region="us-east-1",
    )


@pytest.fixture(scope="module")
def mounted(server: LocalServer, s3: MotoServer) -> Iterator[Sandbox]:
    """A sandbox with two mounts: `prefix/` at /mnt/oss and `many/` below its own /workspace."""
    sandbox = Sandbox.create(
        config=config_for(server),
        timeout=900,
        object_storage=[storage(s3, "s3://data/prefix/", "/mnt/oss"), storage(s3, "s3://data/many", "/workspace/many")],
    )
    yield sandbox
    sandbox.kill()
    sandbox.close()


def host_mounts_of(sandbox_id: str) -> list[str]:
    return [m for m in fuse_mounts() if f"/{sandbox_id}/" in m]


def sandbox_dirs(server: LocalServer) -> set[str]:
    return set(os.listdir(server.data_dir / "sandboxes")) if (server.data_dir / "sandboxes").is_dir() else set()


# ---- reading, writing, listing ----------------------------------------------------------------------------------


def test_a_python_cell_and_a_bash_cell_read_what_is_in_the_bucket(mounted: Sandbox) -> None:
    execution = mounted.run_code("print(open('/mnt/oss/hello.txt').read(), end='')")
    assert execution.error is None, execution.error
    assert "".join(execution.logs.stdout) == "hello from the bucket\n"
    bash = mounted.run_code("cat /mnt/oss/sub/deep.txt; ls /mnt/oss", language="bash")
    assert bash.error is None, bash.error
    assert "".join(bash.logs.stdout).split() == ["deep", "hello.txt", "sub"]


def test_what_a_cell_writes_there_is_in_the_bucket_and_the_sandbox_owns_it(mounted: Sandbox, s3: MotoServer) -> None:
    code = (
        "import os\nos.makedirs('/mnt/oss/out', exist_ok=True)\n"
        "with open('/mnt/oss/out/result.csv', 'w') as f:\n    f.write('a,b\\n1,2\\n')\n"
        "st = os.stat('/mnt/oss/out/result.csv')\n"
        "print(os.getuid(), st.st_uid == os.getuid(), st.st_gid == os.getgid())"
    )
    execution = mounted.run_code(code)
    assert execution.error is None, execution.error
    uid, *owned = "".join(execution.logs.stdout).split()
    assert owned == ["True", "True"]
    assert int(uid) == mounted.get_info().isolation["uid"] != 0  # type: ignore[index]
    body = s3.s3().get_object(Bucket="data", Key="prefix/out/result.csv")["Body"].read()
    assert body == b"a,b\n1,2\n"


def test_the_files_api_reads_writes_and_lists_the_mount(mounted: Sandbox, s3: MotoServer) -> None:
    assert mounted.files.read("/mnt/oss/hello.txt") == "hello from the bucket\n"
    mounted.files.write("/mnt/oss/uploaded/notes.md", "# notes\n")  # staged on the sandbox's disk, then copied over
    assert s3.s3().get_object(Bucket="data", Key="prefix/uploaded/notes.md")["Body"].read() == b"# notes\n"
    assert "notes.md" in [entry.name for entry in mounted.files.list("/mnt/oss/uploaded")]
    assert not [e.name for e in mounted.files.list("/mnt/oss/uploaded") if e.name.endswith(".upload")]


def test_writing_a_big_file_to_the_bucket_counts_against_the_sandboxs_own_disk(
    server: LocalServer, http: httpx.Client, s3: MotoServer
) -> None:
    """s3fs keeps a file being written on the sandbox's disk image: a small disk stops the write (ENOSPC in that
    sandbox), where it would otherwise fill the host's /tmp."""
    body = {"disk_mb": 128, "object_storage": [s3.mount("s3://data/prefix/")]}
    created = http.post("/v1/sandboxes", json=body)
    assert created.status_code == 201, created.text
    with Sandbox.connect(created.json()["data"]["sandbox_id"], config=config_for(server)) as sandbox:
        execution = sandbox.run_code(
            "import errno\ntry:\n    with open('/mnt/oss/huge.bin', 'wb') as f:\n"
            "        for _ in range(200):\n            f.write(b'x' * (1 << 20))\n"
            "except OSError as exc:\n    print(errno.errorcode[exc.errno])",
            timeout=300,
        )
        assert execution.error is None, execution.error
        assert "".join(execution.logs.stdout).strip() in ("ENOSPC", "EIO"), execution.logs
        sandbox.kill()


def test_a_prefix_of_a_few_thousand_objects_lists(mounted: Sandbox) -> None:
    execution = mounted.run_code(
        "import os\nnames = sorted(os.listdir('/workspace/many'))\nprint(len(names), names[0], names[-1])", timeout=300
    )
    assert execution.error is None, execution.error
    assert "".join(execution.logs.stdout).split() == [str(MANY), "f00000", f"f{MANY - 1:05d}"]


def test_get_info_and_list_show_the_mounts_and_never_the_keys(
    mounted: Sandbox, server: LocalServer, http: httpx.Client, s3: MotoServer
) -> None:
    info = mounted.get_info()
    assert info.object_storage == [
        {"uri": "s3://data/prefix/", "mount_point": "/mnt/oss", "mounted": True},
        {"uri": "s3://data/many/", "mount_point": "/workspace/many", "mounted": True},
    ]
    listed = http.get("/v1/sandboxes").json()["data"]["sandboxes"]
    item = next(i for i in listed if i["sandbox_id"] == mounted.sandbox_id)
    assert item["object_storage"] == [
        {"uri": "s3://data/prefix/", "mount_point": "/mnt/oss"},
        {"uri": "s3://data/many/", "mount_point": "/workspace/many"},
    ]
    for text in (json.dumps(info.raw), http.get(f"/v1/sandboxes/{mounted.sandbox_id}").text, json.dumps(listed)):
        assert s3.access_key not in text and s3.secret_key not in text


def test_no_other_sandbox_sees_the_mount(mounted: Sandbox, server: LocalServer) -> None:
    with Sandbox.create(config=config_for(server)) as other:
        execution = other.run_code(
            "import os\nprint(os.path.exists('/mnt/oss'), any(' fuse' in l for l in open('/proc/self/mountinfo')))"
        )
        assert execution.error is None, execution.error
        assert "".join(execution.logs.stdout).split() == ["False", "False"]
        other.kill()


# ---- lifetime ---------------------------------------------------------------------------------------------------


def test_pause_and_resume_keep_the_mount_and_a_kill_takes_it_away(server: LocalServer, s3: MotoServer) -> None:
    sandbox = Sandbox.create(config=config_for(server), object_storage=storage(s3, "s3://data/prefix/", "/mnt/oss"))
    try:
        assert len(host_mounts_of(sandbox.sandbox_id)) == 1
        sandbox.pause()
        assert len(host_mounts_of(sandbox.sandbox_id)) == 1
        Sandbox.connect(sandbox.sandbox_id, config=config_for(server)).close()
        assert "".join(sandbox.run_code("print(open('/mnt/oss/hello.txt').read())").logs.stdout).startswith("hello")
    finally:
        sandbox.kill()
        sandbox.close()
    assert host_mounts_of(sandbox.sandbox_id) == []
    assert not [p for p in s3fs_processes() if sandbox.sandbox_id in p]
    assert sandbox.sandbox_id not in sandbox_dirs(server)
    assert s3.s3().get_object(Bucket="data", Key="prefix/hello.txt")["Body"].read()  # the bucket is untouched


def test_an_expired_sandbox_is_unmounted(server: LocalServer, s3: MotoServer) -> None:
    sandbox = Sandbox.create(
        config=config_for(server), timeout=3, object_storage=storage(s3, "s3://data/prefix/", "/data/in")
    )
    assert len(host_mounts_of(sandbox.sandbox_id)) == 1
    deadline = time.monotonic() + 60
    while host_mounts_of(sandbox.sandbox_id) and time.monotonic() < deadline:
        time.sleep(0.25)
    sandbox.close()
    assert host_mounts_of(sandbox.sandbox_id) == []
    assert not [p for p in s3fs_processes() if sandbox.sandbox_id in p]


def test_a_restarted_server_mounts_the_bucket_again(server_factory: Callable[..., LocalServer], s3: MotoServer) -> None:
    first = server_factory()
    sandbox = Sandbox.create(
        config=config_for(first), timeout=600, object_storage=storage(s3, "s3://data/prefix/", "/mnt/oss")
    )
    sandbox_id = sandbox.sandbox_id
    sandbox.close()
    first.process.send_signal(signal.SIGKILL)  # a crash: its s3fs is left behind, mounted, and is not the next one's
    first.process.wait(15)
    second = server_factory(data_dir=first.data_dir)
    again = Sandbox.connect(sandbox_id, config=config_for(second))
    try:
        execution = again.run_code("print(open('/mnt/oss/hello.txt').read(), end='')")
        assert execution.error is None, execution.error
        assert "".join(execution.logs.stdout) == "hello from the bucket\n"
        assert again.get_info().object_storage[0]["mounted"] is True
        assert len(host_mounts_of(sandbox_id)) == 1  # the crashed server's mount was replaced, not stacked
        assert len([p for p in s3fs_processes() if sandbox_id in p]) == 1
    finally:
        again.kill()
        again.close()
    assert host_mounts_of(sandbox_id) == []


# ---- the other doors --------------------------------------------------------------------------------------------


def test_session_run_mounts_with_keys_from_the_aws_variables(
    server: LocalServer, s3: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    result = Session.run(
        "print(open('/mnt/oss/hello.txt').read(), end='')",
        object_storage={"uri": "s3://data/prefix/", "mountPoint": "/mnt/oss"},
        config=config_for(server),
    )
    assert result.error is None, result.error
    assert result.stdout == "hello from the bucket\n"


def test_the_new_magic_mounts_a_bucket_with_keys_from_the_environment(
    server: LocalServer, s3: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        **server.env(),
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        "AWS_ENDPOINT_URL": s3.url,
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "scalebox_kernel")
    try:
        made = ok(ip, "%scalebox new bucketed --mount s3://data/prefix/ /mnt/oss").stdout
        assert "Session bucketed" in made
        read = ok(ip, "%%scalebox\nprint(open('/mnt/oss/sub/deep.txt').read(), end='')").stdout
        assert read == "deep\n"
        info = ok(ip, "%scalebox info").stdout
        assert "mounts: s3://data/prefix/ at /mnt/oss" in info
        failed, captured = run(ip, "%scalebox new broken --mount s3://data/x/ /etc/x")
        shown = captured.stdout + captured.stderr + str(failed.error_in_exec)
        assert not failed.success and "system directory /etc" in shown
        assert "broken" not in ok(ip, "%scalebox list").stdout
        for text in (made, read, info, shown):
            assert s3.access_key not in text and s3.secret_key not in text
    finally:
        ok(ip, "%scalebox close --all")
        magics().at_exit()
        ip.run_line_magic("unload_ext", "scalebox_kernel")


def test_a_mount_without_keys_anywhere_says_which_variable_to_set(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(Exception, match="AWS_ACCESS_KEY_ID") as caught:
        Sandbox.create(config=config_for(server), object_storage=ObjectStorage("s3://data/", region="us-east-1"))
    assert type(caught.value).__name__ == "InvalidArgument"


# ---- bad requests -----------------------------------------------------------------------------------------------


def _refused(http: httpx.Client, server: LocalServer, entry: Any, *needles: str) -> str:
    """Create with `entry` as object_storage: a 400 whose message holds `needles`, and nothing left behind."""
    before_dirs, before_mounts = sandbox_dirs(server), fuse_mounts()
    before_ids = server.sandbox_ids()
    response = http.post("/v1/sandboxes", json={"template": "base", "object_storage": entry})
    assert response.status_code == 400, response.text
    message = response.json()["message"]
    for needle in needles:
        assert needle in message, message
    assert server.sandbox_ids() == before_ids
    assert sandbox_dirs(server) == before_dirs
    assert fuse_mounts() == before_mounts
    return str(message)


def test_wrong_keys_a_missing_bucket_and_a_dead_endpoint_are_clear_400s_leaving_nothing(
    http: httpx.Client, server: LocalServer, strict_s3: MotoServer
) -> None:
    processes = len(s3fs_processes())
    message = _refused(http, server, strict_s3.mount("s3://vault/docs/", secret_key="not-the-secret"), "secret_key")
    assert "not-the-secret" not in message
    _refused(http, server, strict_s3.mount("s3://vault/docs/", access_key="AKIAUNKNOWN00000"), "access_key")
    _refused(http, server, strict_s3.mount("s3://no-such-bucket/x/"), "'no-such-bucket' does not exist")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, never listening: refused
        _refused(http, server, strict_s3.mount("s3://vault/docs/", endpoint=dead), "could not reach", dead)
    assert len(s3fs_processes()) == processes
    # The good keys mount it, and reading and writing are checked requests too.
    entry = strict_s3.mount("s3://vault/docs/")
    created = http.post("/v1/sandboxes", json={"template": "base", "object_storage": [entry]})
    assert created.status_code == 201, created.text
    sandbox_id = created.json()["data"]["sandbox_id"]
    try:
        with Sandbox.connect(sandbox_id, config=config_for(server)) as sandbox:
            execution = sandbox.run_code(
                "print(open('/mnt/oss/secret-plan.txt').read(), end='')\nopen('/mnt/oss/reply.txt', 'w').write('ok')"
            )
            assert execution.error is None, execution.error
            assert "".join(execution.logs.stdout) == "the plan\n"
        assert strict_s3.s3().get_object(Bucket="vault", Key="docs/reply.txt")["Body"].read() == b"ok"
    finally:
        http.delete(f"/v1/sandboxes/{sandbox_id}")


BAD = [
    ("relative", {"mount_point": "mnt/oss"}, "absolute path"),
    ("root", {"mount_point": "/"}, "would hide"),
    ("home", {"mount_point": "/home/user"}, "would hide"),
    ("workspace", {"mount_point": "/workspace/"}, "would hide"),
    ("tmp", {"mount_point": "/tmp"}, "would hide"),
    ("usr", {"mount_point": "/usr/local/data"}, "system directory /usr"),
    ("etc", {"mount_point": "/etc"}, "system directory /etc"),
    ("proc", {"mount_point": "/proc/1"}, "system directory /proc"),
    ("run", {"mount_point": "/run/scalebox/x"}, "system directory"),
    ("dotdot", {"mount_point": "/mnt/../etc"}, "plain path"),
    ("double slash", {"mount_point": "//etc"}, "plain path"),
    ("double slash deeper", {"mount_point": "//usr/lib"}, "plain path"),
    ("inner double slash", {"mount_point": "/mnt//x"}, "plain path"),
    ("scheme", {"uri": "http://data/x"}, "s3://bucket/prefix/"),
    ("bucket", {"uri": "s3://a"}, "not a bucket name"),
    ("prefix", {"uri": "s3://data/a/../b"}, "prefix"),
    ("no secret", {"secret_key": None}, "secret_key is required"),
    ("access key with colon", {"access_key": "AK:IA"}, "no ':' or spaces"),
    ("access key with space", {"access_key": "AK IA"}, "no ':' or spaces"),
    ("secret with space", {"secret_key": "se cret"}, "without spaces"),
    ("no place", {"region": None, "endpoint": None}, "needs a region or an endpoint"),
    ("endpoint with a password", {"endpoint": "http://user:pw@127.0.0.1:9"}, "only a scheme, a host and a port"),
    ("endpoint scheme", {"endpoint": "ftp://127.0.0.1"}, "endpoint must be"),
    ("endpoint with an option", {"endpoint": "http://127.0.0.1,no_check_certificate"}, "only a scheme, a host"),
    ("endpoint with a backslash", {"endpoint": "http://127.0.0.1\\x"}, "only a scheme, a host"),
    ("not a string", {"uri": 42}, "must be a string"),
]


@pytest.mark.parametrize(("change", "needle"), [(c, n) for _, c, n in BAD], ids=[i for i, _, _ in BAD])
def test_a_bad_mount_is_refused_before_the_sandbox_exists(
    http: httpx.Client, server: LocalServer, s3: MotoServer, change: dict[str, Any], needle: str
) -> None:
    entry: dict[str, Any] = {**s3.mount("s3://data/prefix/"), **change}
    entry = {k: v for k, v in entry.items() if v is not None}
    _refused(http, server, entry, needle)


def test_other_bad_shapes_are_refused(http: httpx.Client, server: LocalServer, s3: MotoServer) -> None:
    message = _refused(http, server, s3.mount("s3://AKIAOOPS:hunter2@data/"), "not a bucket name")
    assert "hunter2" not in message and "AKIAOOPS" not in message  # a key in the uri is never echoed
    _refused(http, server, "s3://data/", "object or a list")
    _refused(http, server, [s3.mount("s3://data/a/", "/mnt/a"), s3.mount("s3://data/b/", "/mnt/a/b")], "overlaps")
    _refused(http, server, [s3.mount("s3://data/a/", f"/mnt/m{i}") for i in range(9)], "at most 8")
    body = {"object_storage": [s3.mount("s3://data/prefix/")], "s3fs_executable_path": "/bin/sh"}
    response = http.post("/v1/sandboxes", json=body)
    assert response.status_code == 400 and "host's own s3fs" in response.json()["message"]


def test_a_link_the_sandbox_puts_over_its_mount_point_is_never_followed(
    server_factory: Callable[..., LocalServer], s3: MotoServer
) -> None:
    """The sandbox moves the directory holding its mount point away and leaves a link to the host's /etc (as seen
    from bwrap's set-up) in its place; the restarted server must neither follow it (no directory made in /etc)
    nor lose the sandbox: it runs without that bucket, and get_info says why."""
    first = server_factory()
    sandbox = Sandbox.create(
        config=config_for(first), timeout=600, object_storage=storage(s3, "s3://data/prefix/", "/workspace/a/b")
    )
    sandbox_id = sandbox.sandbox_id
    attack = (
        "import os\nassert os.listdir('/workspace/a/b')\nos.rename('/workspace/a', '/workspace/a2')\n"
        "os.symlink('../../oldroot/etc', '/workspace/a')\nprint(os.readlink('/workspace/a'))"
    )
    execution = sandbox.run_code(attack)
    assert execution.error is None, execution.error
    sandbox.close()
    first.stop()
    assert not Path("/etc/b").exists()
    second = server_factory(data_dir=first.data_dir)
    again = Sandbox.connect(sandbox_id, config=config_for(second))
    try:
        mount = again.get_info().object_storage[0]
        assert mount["mounted"] is False and "link is in the way" in mount["problem"], mount
        assert not Path("/etc/b").exists()
        check = again.run_code("import os\nprint(os.path.islink('/workspace/a'), os.path.exists('/etc/b'))")
        assert "".join(check.logs.stdout).split() == ["True", "False"]
        assert host_mounts_of(sandbox_id) == []
    finally:
        again.kill()
        again.close()


# ---- keys -------------------------------------------------------------------------------------------------------


def test_the_keys_are_nowhere_but_in_the_mounts_private_file(
    mounted: Sandbox, server: LocalServer, s3: MotoServer
) -> None:
    keys = [s3.access_key.encode(), s3.secret_key.encode()]
    # Every process's command line and environment on the host (s3fs's included).
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            for name in ("cmdline", "environ"):
                try:
                    data = (entry / name).read_bytes()
                except OSError:
                    continue
                assert not any(k in data for k in keys), f"a key is in /proc/{entry.name}/{name}"
    # The server's log and database, and the sandbox's whole directory on the host: all but the mounts themselves
    # (the bucket's objects) and their 0600 key files.
    private = server.data_dir / "sandboxes" / mounted.sandbox_id
    key_files = sorted((private / "buckets").glob("*.passwd"))
    assert len(key_files) == 2
    for path in key_files:
        assert path.stat().st_mode & 0o777 == 0o600 and path.stat().st_uid == 0
    files = [server.log, *server.data_dir.glob("*.db*")]
    for directory, dirs, names in os.walk(private):
        if Path(directory) == private / "buckets":
            dirs[:] = []  # the mount directories: the bucket's own objects
        files += [Path(directory, n) for n in names if not n.endswith(".passwd")]
    checked = 0
    for path in files:
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 64 << 20:
            checked += 1
            assert not any(k in path.read_bytes() for k in keys), f"a key is in {path}"
    assert checked > 5
    # Inside the sandbox: its files and every environment and command line its user can read. The probe is told
    # the keys reversed, so that it never holds them where it looks.
    probe = (
        "import glob, os\nkeys = [os.environ['K1'][::-1], os.environ['K2'][::-1]]\nfound = []\n"
        "paths = glob.glob('/proc/[0-9]*/environ') + glob.glob('/proc/[0-9]*/cmdline')\n"
        "for top in ('/home', '/workspace', '/tmp', '/etc', '/run', '/mnt'):\n"
        "    for d, dirs, files in os.walk(top):\n"
        "        dirs[:] = [x for x in dirs if os.path.join(d, x) != '/workspace/many']\n"
        "        paths += [os.path.join(d, f) for f in files]\n"
        "for path in paths:\n"
        "    try:\n        data = open(path, 'rb').read(1 << 22).decode(errors='replace')\n"
        "    except OSError:\n        continue\n"
        "    found += [path for k in keys if k in data]\n"
        "print(len(paths) > 20, found)"
    )
    result = mounted.commands.run(
        f"python3 -c {shlex.quote(probe)}", envs={"K1": s3.access_key[::-1], "K2": s3.secret_key[::-1]}, timeout=300
    )
    assert result.stdout.strip() == "True []", result.stdout + result.stderr


def test_a_server_that_cannot_mount_says_so_and_refuses_with_the_reason(
    server_factory: Callable[..., LocalServer], s3: MotoServer
) -> None:
    unconfined = server_factory(extra=["--no-isolation"])
    said = "object storage: off; object storage mounts need the sandbox's own namespaces"
    deadline = time.monotonic() + 10
    while said not in unconfined.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)  # the start-up lines come just after the runtime file
    assert said in unconfined.log_text()
    with unconfined.client() as http:
        response = http.post("/v1/sandboxes", json={"object_storage": [s3.mount("s3://data/prefix/")]})
        assert response.status_code == 400, response.text
        assert "object_storage cannot be mounted here" in response.json()["message"]
        assert http.get("/v1/sandboxes").json()["data"]["sandboxes"] == []
