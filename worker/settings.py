"""Worker configuration from the environment (the Lambda function and the container read the
same variables; the CLI's flags default to them). The S3/SQS endpoint is boto3's own
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL_SQS``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from botocore.config import Config

ENV = {
    "DOGBREEDS_MODEL": "model artifact URI (s3://bucket/models/<name>[/<version>], or a local folder)",
    "DOGBREEDS_QUEUE_URL": "SQS queue URL the poller reads",
    "DOGBREEDS_OUTPUT_BUCKET": "bucket for manifests (default: the bucket the photos came from)",
    "DOGBREEDS_OUTPUT_PREFIX": "key prefix for manifests (default: manifests)",
    "DOGBREEDS_BATCH_SIZE": "photos per inference micro-batch (default: 16)",
    "DOGBREEDS_DOWNLOAD_THREADS": "concurrent S3 downloads (default: 8)",
    "DOGBREEDS_TOP_K": "breeds kept per photo (default: 5)",
    "DOGBREEDS_DECODE_BUDGET_PIXELS": "pixels decoded at once by all download threads together (default: 64000000, "
                                      "the decode limit: one photo of the largest accepted size; a photo over the "
                                      "budget waits and is then decoded alone)",
    "DOGBREEDS_JSONL": "1 to write JSON Lines manifests (.jsonl) instead of JSON",
    "DOGBREEDS_RUNTIME": "model variant: auto (default: the fastest one the artifact carries whose recorded "
                         "agreement with fp32 passed, else tf), tf, openvino, or a runtimes key such as openvino-int8",
    "DOGBREEDS_LAMBDA_SAFETY_MS": "Lambda only: stop taking new work this many ms before the invocation's end; "
                                  "unfinished messages are retried (default: 10000)",
    "DOGBREEDS_PREFIX_PAGE_KEYS": "a prefix job listing more photos than this is split into continuation job "
                                  "messages of this many keys, sent back to its queue (default: 100)",
    "DOGBREEDS_MAX_PREFIX_KEYS": "a prefix job listing more photos than this gets the job error too_many_objects "
                                 "(default: 100000)",
    "DOGBREEDS_THREADS": "inference threads (default: the CPUs this process may use)",
    "DOGBREEDS_ALLOW_SAVEDMODEL": "1 to let auto serve the TensorFlow SavedModel (a program: its graph can read files "
                                  "and environment variables); default: only the data-only OpenVINO variants",
    "DOGBREEDS_TRUSTED_KEY": "the public key artifacts must be signed with: a PEM file, an inline PEM, or "
                             "kms://<key id, alias/name or ARN>; unset: serve unverified artifacts (with a warning)",
    "DOGBREEDS_MODEL_DIGEST": "sha256 of the manifest.json to serve (optional pin; any other manifest is refused)",
    "DOGBREEDS_CACHE": "local cache folder for model artifacts and features (default: ~/.cache/dogbreeds)",
    "DOGBREEDS_DOG_CHECK": "0 to turn the model's dog check off (default 1: photos scoring below the artifact's "
                           "dog threshold are answered no_dog)",
    "DOGBREEDS_MIN_SCORE": "photos whose best breed score is below this (0..1) are answered uncertain (default: none)",
    "DOGBREEDS_LOG_FORMAT": "auto (default: text on a terminal, JSON otherwise), json or text",
}

_OFF = ("0", "false", "no", "off")

#: boto3 retries with exponential backoff and jitter (throttling, 5xx, connection errors).
BOTO_CONFIG = Config(retries={"mode": "standard", "max_attempts": 8}, max_pool_connections=32)


@dataclass(frozen=True)
class WorkerEnvironment:
    model: str | None
    queue_url: str | None
    output_bucket: str | None
    output_prefix: str
    batch_size: int
    download_threads: int
    top_k: int
    jsonl: bool
    runtime: str = "auto"
    dog_check: bool = True
    min_score: float | None = None
    decode_budget_pixels: int | None = None
    lambda_safety_ms: int = 10_000  # worker.deadline.DEFAULT_SAFETY_MS
    prefix_page_keys: int = 100  # worker.continuations.DEFAULT_PAGE_KEYS
    max_prefix_keys: int = 100_000
    trusted_key: str | None = None
    model_digest: str | None = None

    @classmethod
    def from_env(cls, env=os.environ) -> "WorkerEnvironment":
        return cls(
            model=env.get("DOGBREEDS_MODEL"),
            queue_url=env.get("DOGBREEDS_QUEUE_URL"),
            output_bucket=env.get("DOGBREEDS_OUTPUT_BUCKET") or None,
            output_prefix=env.get("DOGBREEDS_OUTPUT_PREFIX", "manifests"),
            batch_size=int(env.get("DOGBREEDS_BATCH_SIZE", "16")),
            download_threads=int(env.get("DOGBREEDS_DOWNLOAD_THREADS", "8")),
            top_k=int(env.get("DOGBREEDS_TOP_K", "5")),
            jsonl=env.get("DOGBREEDS_JSONL", "0") in ("1", "true", "yes"),
            runtime=env.get("DOGBREEDS_RUNTIME") or "auto",
            dog_check=env.get("DOGBREEDS_DOG_CHECK", "1").strip().lower() not in _OFF,
            min_score=float(env["DOGBREEDS_MIN_SCORE"]) if env.get("DOGBREEDS_MIN_SCORE", "").strip() else None,
            decode_budget_pixels=int(env["DOGBREEDS_DECODE_BUDGET_PIXELS"]) if env.get("DOGBREEDS_DECODE_BUDGET_PIXELS")
            else None,
            lambda_safety_ms=int(env.get("DOGBREEDS_LAMBDA_SAFETY_MS") or 10_000),
            prefix_page_keys=int(env.get("DOGBREEDS_PREFIX_PAGE_KEYS") or 100),
            max_prefix_keys=int(env.get("DOGBREEDS_MAX_PREFIX_KEYS") or 100_000),
            trusted_key=env.get("DOGBREEDS_TRUSTED_KEY") or None,
            model_digest=env.get("DOGBREEDS_MODEL_DIGEST") or None,
        )


def client(service: str):
    """A boto3 client with the worker's retry policy; endpoint from boto3's own settings."""
    import boto3

    return boto3.client(service, config=BOTO_CONFIG)
