"""Worker configuration: one typed, validated settings object for every entry point.

:class:`WorkerSettings` names each setting once: its type and bounds, its default, its help and
its environment variable (``DOGBREEDS_`` + the field name in capitals). The Lambda function
builds it with :meth:`WorkerSettings.from_env` when it is invoked (never at import); the CLI's
options are made from the same fields (:mod:`worker.cli_options`), with click reading the same
variables (``envvar=``) and validating them with the same rules, so a bad value is one clear
error that names its variable, and ``--help`` never reads the environment.

The S3/SQS endpoint is boto3's own ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL_SQS``)."""

from __future__ import annotations

import os
from typing import Literal, Mapping

from botocore.config import Config
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError, field_validator

PREFIX = "DOGBREEDS_"
#: the pre-``--manifest-format`` variable (1: JSON Lines), still honoured when the new one is unset
LEGACY_JSONL_ENV = "DOGBREEDS_JSONL"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")

#: boto3 retries with exponential backoff and jitter (throttling, 5xx, connection errors).
BOTO_CONFIG = Config(retries={"mode": "standard", "max_attempts": 8}, max_pool_connections=32)


class SettingsError(ValueError):
    """A setting's value is not valid: one line naming the variable (or flag), its value and why."""


def env_name(field: str) -> str:
    """The environment variable of a :class:`WorkerSettings` field."""
    return PREFIX + field.upper()


def manifest_format_of(value) -> str:
    """``json`` / ``jsonl``, also from the legacy ``DOGBREEDS_JSONL`` booleans (1 -> jsonl)."""
    text = str(value).strip().lower()
    if text in _TRUE:
        return "jsonl"
    if text in _FALSE:
        return "json"
    return text


class WorkerSettings(BaseModel):
    """Everything the worker is told from outside, validated (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = Field(None, description="Model artifact URI (s3://bucket/models/<name>[/<version>], a local "
                                                "registry <root>/<name>, or a local artifact folder).")
    queue_url: str | None = Field(None, description="SQS queue URL the poller reads.")
    output_bucket: str | None = Field(None, description="Bucket for manifests (default: the bucket the photos "
                                                        "came from).")
    output_prefix: str = Field("manifests", description="Key prefix for manifests.")
    batch_size: PositiveInt = Field(16, description="Photos per inference micro-batch.")
    download_threads: PositiveInt = Field(8, description="Concurrent photo downloads.")
    top_k: PositiveInt = Field(5, description="Breeds kept per photo.")
    manifest_format: Literal["json", "jsonl"] = Field(
        "json", description="Manifest files: json (one JSON document) or jsonl (JSON Lines, one item per line). "
                            f"The older {LEGACY_JSONL_ENV}=1 still means jsonl.")
    runtime: str = Field("auto", description="Model variant: auto (the fastest data-only variant whose recorded "
                                             "agreement with fp32 passed; the TensorFlow SavedModel only with "
                                             "DOGBREEDS_ALLOW_SAVEDMODEL=1), tf, openvino, or a key of the "
                                             "artifact's runtimes such as openvino-int8.")
    dog_check: bool = Field(True, description="Apply the model's dog check (a photo whose dog score is below the "
                                              "artifact's threshold is answered no_dog, its breed fields null, its "
                                              "top-k kept as a hint); off gives every photo a breed.")
    min_score: float | None = Field(None, ge=0.0, le=1.0,
                                    description="Photos whose best breed score (a calibrated probability, 0..1) is "
                                                "below this are answered uncertain, with their top-k, for human "
                                                "review; pick it from the model card's risk-coverage table.")
    decode_budget_pixels: PositiveInt | None = Field(
        None, description="Pixels decoded at once by all download threads together (default: the decode limit, "
                          "room for one photo of the largest accepted size; a photo over the budget waits and is "
                          "then decoded alone).")
    lambda_safety_ms: NonNegativeInt = Field(10_000, description="Lambda only: stop taking new work this many ms "
                                                                 "before the invocation's end; unfinished messages "
                                                                 "are retried.")
    prefix_page_keys: PositiveInt = Field(100, description="A prefix job listing more photos than this is split into "
                                                           "continuation job messages of this many keys, sent back "
                                                           "to its queue.")
    max_prefix_keys: PositiveInt = Field(100_000, description="A prefix job listing more photos than this gets the "
                                                              "job error too_many_objects.")
    trusted_key: str | None = Field(None, description="Serve only artifacts signed with this key: a PEM public key "
                                                      "file (dogbreeds-train keygen writes one), an inline PEM, or "
                                                      "kms://<key id, alias/name or ARN> (its public key is fetched "
                                                      "with kms:GetPublicKey). Unsigned, re-signed or modified "
                                                      "artifacts are refused. Unset: the artifact is served "
                                                      "unverified, with a warning.")
    model_digest: str | None = Field(None, description="Serve only the artifact whose manifest.json has this sha256 "
                                                       "(a pin).")

    _manifest_format = field_validator("manifest_format", mode="before")(manifest_format_of)

    @property
    def jsonl(self) -> bool:
        return self.manifest_format == "jsonl"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "WorkerSettings":
        """The settings in ``env`` (default: ``os.environ``, read now). An empty variable counts
        as unset. Raises :class:`SettingsError` naming the first bad variable."""
        env = os.environ if env is None else env
        values = {field: env[env_name(field)] for field in cls.model_fields if env.get(env_name(field), "").strip()}
        if "manifest_format" not in values and env.get(LEGACY_JSONL_ENV, "").strip():
            values["manifest_format"] = env[LEGACY_JSONL_ENV]
        try:
            return cls(**values)
        except ValidationError as error:
            first = error.errors()[0]
            field = str(first["loc"][0])
            variable = env_name(field) if env.get(env_name(field), "").strip() else LEGACY_JSONL_ENV
            raise SettingsError(f"{variable}={values[field]!r} is not valid: {first['msg']}") from None

    @classmethod
    def check(cls, field: str, value):
        """``value`` of one field, validated as :meth:`from_env` does (the CLI's option type);
        raises :class:`SettingsError` with the reason (not naming where the value came from)."""
        try:
            return getattr(cls(**{field: value}), field)
        except ValidationError as error:
            raise SettingsError(error.errors()[0]["msg"]) from None


#: kept for callers written before the rename
WorkerEnvironment = WorkerSettings


def env_int(variable: str, default: int | None, *, minimum: int | None = None,
            env: Mapping[str, str] | None = None) -> int | None:
    """An integer setting read outside :class:`WorkerSettings` (e.g. by the runtimes when a model
    loads): unset or empty gives ``default``; a bad value is a :class:`SettingsError` naming it."""
    raw = (os.environ if env is None else env).get(variable, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{variable}={raw!r} is not valid: not an integer") from None
    if minimum is not None and value < minimum:
        raise SettingsError(f"{variable}={raw!r} is not valid: must be >= {minimum}")
    return value


#: every DOGBREEDS_* variable the worker reads, with what it means
ENV = {
    **{env_name(name): field.description for name, field in WorkerSettings.model_fields.items()},
    LEGACY_JSONL_ENV: "1 to write JSON Lines manifests (.jsonl); the older spelling of DOGBREEDS_MANIFEST_FORMAT=jsonl",
    "DOGBREEDS_THREADS": "inference threads (default: the CPUs this process may use)",
    "DOGBREEDS_TF_MICRO_BATCH": "images per TensorFlow call (default: 4)",
    "DOGBREEDS_ALLOW_SAVEDMODEL": "1 to let auto serve the TensorFlow SavedModel (a program: its graph can read files "
                                  "and environment variables); default: only the data-only OpenVINO variants",
    "DOGBREEDS_CACHE": "local cache folder for model artifacts and features (default: ~/.cache/dogbreeds)",
    "DOGBREEDS_LOG_FORMAT": "auto (default: text on a terminal, JSON otherwise), json or text",
}


def client(service: str):
    """A boto3 client with the worker's retry policy; endpoint from boto3's own settings."""
    import boto3

    return boto3.client(service, config=BOTO_CONFIG)
