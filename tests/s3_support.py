"""A real S3-compatible server for the object storage tests: moto's server mode, on loopback, in its own process.

`start_moto(auth=False)` accepts any keys (what the mount tests need). `start_moto(auth=True)` checks SigV4
signatures against the access keys made in it (the credential tests); moto 5.2 miscomputes the signature of a
request whose query holds a '/' (any listing by prefix, from boto3 too), so that server only answers the checks a
mount makes at its start, reads and writes, not listings.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import httpx
from botocore.config import Config

REGION = "us-east-1"
_ALLOW_ALL = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})


@dataclass
class MotoServer:
    url: str
    process: subprocess.Popen[bytes]
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    log: Path

    def s3(self, access_key: str | None = None, secret_key: str | None = None) -> Any:
        """A boto3 S3 client of this server (with its keys unless others are given)."""
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(max_pool_connections=32),
        )

    def mount(self, uri: str, mount_point: str = "/mnt/oss", **changes: str) -> dict[str, str]:
        """An `object_storage` entry for a bucket of this server."""
        entry = {
            "uri": uri,
            "mount_point": mount_point,
            "endpoint": self.url,
            "region": REGION,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
        }
        entry.update(changes)
        return entry

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_moto(log_dir: Path, *, auth: bool) -> MotoServer:
    """moto's server on a free loopback port; with `auth`, an IAM user's fresh keys are the only valid ones."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    if auth:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"  # the three IAM calls below; then every request is checked
    log = log_dir / f"moto-{port}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/moto-api/", timeout=2).status_code < 500:
                break
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"moto did not start: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)
    access_key, secret_key = "AKIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
    if auth:
        iam = boto3.client(
            "iam", endpoint_url=url, region_name=REGION, aws_access_key_id="bootstrap", aws_secret_access_key="x"
        )
        iam.create_user(UserName="tester")
        iam.put_user_policy(UserName="tester", PolicyName="all", PolicyDocument=_ALLOW_ALL)
        key = iam.create_access_key(UserName="tester")["AccessKey"]
        access_key, secret_key = key["AccessKeyId"], key["SecretAccessKey"]
    return MotoServer(url=url, process=process, access_key=access_key, secret_key=secret_key, log=log)


def s3fs_processes() -> list[str]:
    """Command lines of the s3fs processes running on this machine."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if argv and os.path.basename(argv[0]) == b"s3fs":
                    found.append(b" ".join(argv).decode(errors="replace"))
    return found


def fuse_mounts() -> list[str]:
    """Mount points of the FUSE file systems in the host's mount table."""
    with open("/proc/self/mountinfo") as handle:
        return [line.split()[4] for line in handle if " - fuse" in line]
