"""A real S3 server for the object storage tests: moto's server mode on 127.0.0.1 at a free port.

moto's in-process mock patches boto3 only; s3fs (aiobotocore) and DuckDB talk HTTP, so the tests
start `python -m moto.server` as a process of its own, wait until it answers, and stop it by PID.
`s3_server` (a module fixture) is that server; `s3` (a test fixture) points the AWS_* variables at
it, gives the test a fresh bucket and a local cache of its own (ALOL_LOCAL_CACHE), and forgets the
opened filesystems afterwards (stages.fs.reset).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from stages import fs

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "alol-test-key", "AWS_SECRET_ACCESS_KEY": "alol-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def moto_server(log: Path, startup_seconds: float = 60.0, unauthenticated_actions: int | None = None) -> Iterator[str]:
    """Start moto's S3 server; yields its endpoint URL; stops it (SIGTERM, then SIGKILL) by PID.

    `unauthenticated_actions`: moto checks IAM permissions after that many requests (its
    INITIAL_NO_AUTH_ACTION_COUNT), so that the first requests can set up users and policies."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    if unauthenticated_actions is not None:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(unauthenticated_actions)
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )
    try:
        deadline = time.monotonic() + startup_seconds
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"moto.server exited with {server.returncode}: {log.read_text(errors='replace')[-2000:]}")
            try:
                urllib.request.urlopen(endpoint + "/", timeout=2).close()
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto.server did not answer on {endpoint} within {startup_seconds} s") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        os.kill(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(server.pid, signal.SIGKILL)
            server.wait()


@dataclass(frozen=True)
class S3Bucket:
    """A bucket on the test server: its name, `url` (s3://<name>), the endpoint and the environment to reach it."""

    name: str
    endpoint: str
    local_cache: Path

    @property
    def url(self) -> str:
        return f"s3://{self.name}"

    def environment(self) -> dict[str, str]:
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint, fs.LOCAL_CACHE_VARIABLE: str(self.local_cache)}

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix` of the bucket (relative to the bucket)."""
        under = prefix.strip("/")
        return sorted(f"{under}/{key}" if under else key for key in fs.listing(f"{self.url}/{under}".rstrip("/")))


def read_only_user(endpoint: str, bucket: str) -> dict[str, str]:
    """On a server started with unauthenticated_actions=5 (moto_server's readiness request, then these
    four): create `bucket` and a user that may only read; returns that user's AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY."""
    import boto3

    settings = {"endpoint_url": endpoint, "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
                "aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
    boto3.client("s3", **settings).create_bucket(Bucket=bucket)
    iam = boto3.client("iam", **settings)
    iam.create_user(UserName="reader")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}]}
    iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory) -> Iterator[str]:
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_server, tmp_path, monkeypatch) -> Iterator[S3Bucket]:
    """A fresh bucket on the module's server, the AWS_* variables pointing at it, a local cache of its own."""
    bucket = S3Bucket(f"alol-{uuid.uuid4().hex[:12]}", s3_server, tmp_path / "local-cache")
    for name, value in bucket.environment().items():
        monkeypatch.setenv(name, value)
    fs.configure({})
    fs.reset()
    store, _ = fs.filesystem(bucket.url)
    store.mkdir(bucket.name)
    yield bucket
    fs.reset()
