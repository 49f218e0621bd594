"""The local stand-in for the AWS stack of infra/template.yaml, on any S3/SQS endpoint (moto's
server locally): the bucket, its ``incoming/`` -> SQS notification for photos, the queue and
its dead-letter queue. Used by ``make demo``, the integration tests and the benchmarks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class LocalStack:
    bucket: str
    queue_url: str
    dlq_url: str


def create_stack(s3, sqs, bucket: str = "dogbreeds", queue: str = "dogbreeds-photos", *, incoming: str = "incoming/",
                 max_receive_count: int = 5, visibility_timeout: int = 300, suffixes=PHOTO_SUFFIXES) -> LocalStack:
    """Bucket with an ObjectCreated notification on ``incoming/`` (one rule per photo suffix,
    as S3 allows one suffix per rule; ``suffixes=None``: every key under the prefix) -> queue,
    redriving to ``<queue>-dlq``."""
    s3.create_bucket(Bucket=bucket)
    dlq_url = sqs.create_queue(QueueName=f"{queue}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue_url = sqs.create_queue(QueueName=queue, Attributes={
        "VisibilityTimeout": str(visibility_timeout),
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)}),
    })["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    prefix_rule = {"Name": "prefix", "Value": incoming}
    filters = [[prefix_rule]] if suffixes is None else [[prefix_rule, {"Name": "suffix", "Value": suffix}]
                                                        for suffix in suffixes]
    rules = [{"QueueArn": queue_arn, "Events": ["s3:ObjectCreated:*"], "Filter": {"Key": {"FilterRules": f}}}
             for f in filters]
    s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={"QueueConfigurations": rules})
    return LocalStack(bucket, queue_url, dlq_url)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """moto's server mode as a child process on 127.0.0.1:<free port> (a context manager)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "MotoServer":
        moto_server = Path(sys.executable).with_name("moto_server")
        command = [str(moto_server)] if moto_server.exists() else [sys.executable, "-m", "moto.server"]
        self.process = subprocess.Popen([*command, "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                return self
            except OSError as error:
                if self.process.poll() is not None:
                    raise RuntimeError("moto_server exited at start") from error
                time.sleep(0.2)
        raise RuntimeError(f"moto_server did not answer on {self.endpoint}")

    def __exit__(self, *exc) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def environment(self) -> dict[str, str]:
        """Variables that point boto3 (and the worker) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "local"),
                "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "local"),
                "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
