"""Photos -> small JPEG thumbnails (data URIs) or links, for the report page.

:func:`thumbnail_jpeg` is pure (bytes in, bytes out) and decodes with :mod:`worker.images`, so a
thumbnail shows the photo exactly as the worker read it (EXIF orientation, colour modes, size
limits). :class:`PhotoFetcher` reads a manifest item's photo from S3 (the worker's boto3 client)
or from the local folder a ``classify`` run read, and turns every failure into a
:class:`Thumbnail` with a problem code: a photo that cannot be fetched or decoded gives a
placeholder, never an exception.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from PIL import Image

from worker.images import DEFAULT_MAX_BYTES, ImageDecodeError, decode_image
from worker.manifest_source import ManifestItem

__all__ = ["PhotoFetcher", "Thumbnail", "data_uri", "thumbnail_jpeg"]

DEFAULT_THUMB_SIZE = 128
DEFAULT_THUMB_QUALITY = 70


@dataclass(frozen=True)
class Thumbnail:
    """``src`` (a data URI or a URL) for an ``<img>``, or ``None`` with the ``problem`` that
    left a placeholder (an image error code, ``not_found``, ``unreadable_file``, ...)."""

    src: str | None
    problem: str | None = None


def thumbnail_jpeg(data: bytes, size: int = DEFAULT_THUMB_SIZE, quality: int = DEFAULT_THUMB_QUALITY) -> bytes:
    """A baseline JPEG whose longer side is at most ``size`` pixels (aspect ratio kept).
    Raises :class:`worker.images.ImageDecodeError` for a photo the worker could not read."""
    pixels = decode_image(data, target_size=(size, size))  # JPEG: libjpeg decodes at 1/2..1/8 scale
    image = Image.fromarray(pixels)
    del pixels
    image.thumbnail((size, size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


_S3_CODES = {"NoSuchKey": "not_found", "404": "not_found", "NotFound": "not_found", "NoSuchVersion": "not_found",
             "AccessDenied": "access_denied", "403": "access_denied", "NoSuchBucket": "no_such_bucket"}


class PhotoFetcher:
    """Fetches photos and makes their :class:`Thumbnail` (thread-safe: boto3 clients are)."""

    def __init__(self, s3: Any = None, *, size: int = DEFAULT_THUMB_SIZE, quality: int = DEFAULT_THUMB_QUALITY,
                 link: bool = False, link_expires: int = 7 * 24 * 3600, max_bytes: int = DEFAULT_MAX_BYTES):
        self.s3 = s3
        self.size = size
        self.quality = quality
        self.link = link
        self.link_expires = link_expires
        self.max_bytes = max_bytes

    def read(self, item: ManifestItem) -> bytes:
        if item.photo_is_local:
            with open(Path(item.bucket) / item.key, "rb") as fh:
                return fh.read(self.max_bytes + 1)  # decode_image refuses what is larger
        request = {"Bucket": item.bucket, "Key": item.key}
        if item.version_id:
            request["VersionId"] = item.version_id
        body = self.s3.get_object(**request)["Body"]
        try:
            return body.read(self.max_bytes + 1)  # a huge object is refused without reading it whole
        finally:
            body.close()

    def url(self, item: ManifestItem) -> str:
        if item.photo_is_local:
            return (Path(item.bucket) / item.key).resolve().as_uri()
        params = {"Bucket": item.bucket, "Key": item.key}
        if item.version_id:
            params["VersionId"] = item.version_id
        return self.s3.generate_presigned_url("get_object", Params=params, ExpiresIn=self.link_expires)

    def thumbnail(self, item: ManifestItem) -> Thumbnail:
        try:
            if self.link:
                return Thumbnail(self.url(item))
            return Thumbnail(data_uri(thumbnail_jpeg(self.read(item), self.size, self.quality)))
        except ImageDecodeError as error:
            return Thumbnail(None, error.code)
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            return Thumbnail(None, _S3_CODES.get(code, "s3_error"))
        except BotoCoreError:
            return Thumbnail(None, "s3_error")
        except OSError:
            return Thumbnail(None, "unreadable_file")
        except Exception as error:  # a placeholder, never a crash (Pillow can raise almost anything)
            return Thumbnail(None, f"thumbnail_failed:{type(error).__name__}")
