"""Tiny S3 helpers: ``s3://bucket/key`` parsing and a default client.

The client honours the standard AWS environment (``AWS_ENDPOINT_URL``,
``AWS_DEFAULT_REGION``, credentials ...) through boto3 itself; nothing here adds
endpoint flags of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["S3Uri", "is_s3_uri", "parse_s3_uri", "s3_client"]

_SCHEME = "s3://"


@dataclass(frozen=True)
class S3Uri:
    """A parsed ``s3://bucket/key`` URI. ``key`` has no leading slash and may be ''."""

    bucket: str
    key: str = ""

    @classmethod
    def parse(cls, uri: str) -> "S3Uri":
        if not isinstance(uri, str) or not uri.startswith(_SCHEME):
            raise ValueError(f"not an s3:// URI: {uri!r}")
        rest = uri[len(_SCHEME):]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ValueError(f"s3 URI without a bucket: {uri!r}")
        return cls(bucket=bucket, key=key.lstrip("/"))

    def join(self, *parts: str) -> "S3Uri":
        """Append path segments with single slashes: S3Uri('b','models').join('x','1')."""
        segments = [self.key.strip("/")] + [str(p).strip("/") for p in parts]
        return S3Uri(self.bucket, "/".join(s for s in segments if s))

    @property
    def prefix(self) -> str:
        """The key with a trailing '/' (or '' for the bucket root), for listing."""
        key = self.key.strip("/")
        return f"{key}/" if key else ""

    def __str__(self) -> str:
        return f"{_SCHEME}{self.bucket}/{self.key}" if self.key else f"{_SCHEME}{self.bucket}"


def is_s3_uri(value: object) -> bool:
    return isinstance(value, str) and value.startswith(_SCHEME)


def parse_s3_uri(uri: str) -> S3Uri:
    return S3Uri.parse(uri)


def s3_client():
    """``boto3.client("s3")``; boto3 reads AWS_ENDPOINT_URL / region / credentials itself."""
    import boto3

    return boto3.client("s3")
