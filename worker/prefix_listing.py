"""List the photos of a prefix job in S3 (the one S3 call that turns a message into photos).

Beside :mod:`worker.s3uri` and the manifest writer: the S3 I/O of the worker, each call taking a
boto3 S3 client. ETags are stored without the double quotes ``ListObjectsV2`` returns (S3 events
carry them unquoted), so both sources compare equal.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from worker.deadline import Deadline, check
from worker.messages import IMAGE_SUFFIXES, SOURCE_PREFIX_JOB, ImageRef, Job, MessageError, strip_etag

__all__ = ["expand_prefix_job"]


def expand_prefix_job(
    job: Job,
    s3: Any,
    *,
    suffixes: Iterable[str] | None = IMAGE_SUFFIXES,
    max_keys: int | None = None,
    page_size: int | None = None,
    deadline: Deadline | None = None,
) -> Job:
    """List ``s3://job.bucket/job.prefix`` and return the job with its refs filled.

    Uses the ``list_objects_v2`` paginator (``page_size`` sets ``MaxKeys`` per
    request). Keys ending in ``/`` are skipped, the rest are kept when they end
    in one of ``suffixes`` (case-insensitive; ``None`` keeps every key). Refs are
    sorted by key and carry the (unquoted) ETag and size. More than ``max_keys``
    matching objects raises ``MessageError("too_many_objects")`` rather than
    silently processing part of the prefix (the listing stops there). S3
    errors (``ClientError``) propagate unchanged. ``deadline`` is checked
    before each LIST request (``DeadlineReached``).
    """
    if job.source != SOURCE_PREFIX_JOB or job.bucket is None or job.prefix is None:
        raise ValueError(f"not a prefix job: {job!r}")
    if max_keys is not None and max_keys < 0:
        raise ValueError("max_keys must be >= 0")
    wanted = None if suffixes is None else tuple(s.lower() for s in suffixes)

    pagination: dict[str, int] = {}
    if page_size is not None:
        pagination["PageSize"] = page_size
    paginator = s3.get_paginator("list_objects_v2")
    pages = iter(paginator.paginate(Bucket=job.bucket, Prefix=job.prefix, PaginationConfig=pagination))

    refs: list[ImageRef] = []
    while True:
        check(deadline, "a prefix listing request")
        page = next(pages, None)
        if page is None:
            break
        for obj in page.get("Contents", ()) or ():
            key = obj["Key"]
            if key.endswith("/") or (wanted is not None and not key.lower().endswith(wanted)):
                continue
            refs.append(ImageRef(bucket=job.bucket, key=key, etag=strip_etag(obj.get("ETag")), size=obj.get("Size")))
            if max_keys is not None and len(refs) > max_keys:
                raise MessageError(
                    MessageError.TOO_MANY_OBJECTS,
                    f"s3://{job.bucket}/{job.prefix} holds more than {max_keys} matching objects",
                )
    refs.sort(key=lambda r: r.key)
    return dataclasses.replace(job, refs=tuple(refs))
