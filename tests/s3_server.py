"""A real S3-compatible server for the tests: moto in server mode on a loopback port, started under `timeout` and
stopped by PID. Buckets are made and objects put with boto3, as a user's own tools would. bench/object_store.py
uses it too."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "hpcembed-test", "AWS_SECRET_ACCESS_KEY": "hpcembed-test",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self, log: Path):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = Path(log)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(["timeout", "1800", sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                          "-p", str(self.port)], stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise AssertionError(f"moto server did not start:\n{self.log.read_text()[-2000:]}")
                time.sleep(0.1)

    @property
    def env(self) -> dict[str, str]:
        """What a job needs to reach the server (the endpoint as the AWS tools read it)."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def client(self):
        """boto3, the AWS SDK for Python (moto's own dependency), for putting test objects in place."""
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def make_bucket(self, bucket: str) -> None:
        client = self.client()
        if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=bucket)

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def upload(self, local: Path, bucket: str, prefix: str) -> None:
        """Every file under `local` to s3://bucket/prefix/<its path within local>."""
        self.make_bucket(bucket)
        for path in sorted(local.rglob("*")):
            if path.is_file():
                self.put(bucket, f"{prefix}/{path.relative_to(local)}", path.read_bytes())

    def objects(self, bucket: str, prefix: str, starting: str = "") -> dict[str, bytes]:
        """Every object under s3://bucket/prefix/ whose name starts with `starting`, by its name within the prefix
        (not the empty "directory" objects that pyarrow leaves when it deletes a prefix's last object)."""
        client, found = self.client(), {}
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix.rstrip('/')}/{starting}")
        for page in pages:
            for item in page.get("Contents", []):
                if item["Key"].endswith("/"):
                    continue
                name = item["Key"][len(prefix.rstrip("/")) + 1:]
                found[name] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        return found

    def download(self, bucket: str, prefix: str, local: Path) -> Path:
        """An output prefix copied to a local directory, as `aws s3 sync` would, for the local assertions."""
        local.mkdir(parents=True, exist_ok=True)
        for name, data in self.objects(bucket, prefix).items():
            (local / name).write_bytes(data)
        return local

    def stop(self) -> None:
        """`timeout` and the server under it: its own session, so the group is exactly those two."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
