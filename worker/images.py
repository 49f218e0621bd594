"""Image bytes -> RGB ``uint8`` numpy arrays, shared by the trainer and the worker.

(Longer than the other modules on purpose: every colour mode, limit and strip-wise conversion
below is one decoding contract, documented and tested in one place.)

Training and serving both call :func:`load_image`, so a photo is decoded and
resized exactly the same way in both places.  Only Pillow and numpy are used
(no TensorFlow import), and every function is pure: no Pillow global is read
for configuration or mutated by this module.

Decoding (:func:`decode_image`)
-------------------------------
* Accepted container formats: JPEG (including multi-picture MPO files from
  cameras), PNG (including APNG), WebP, GIF, BMP and TIFF.  Anything else that
  Pillow can open (ICO, PPM, PSD, TGA, ...) is refused as ``unsupported_format``;
  bytes that are not an image at all (text, HTML, SVG, PDF, ...) are refused as
  ``not_an_image``.
* Animated images (GIF, APNG, WebP) and multi-page TIFFs: only the first
  frame / page is used.
* EXIF orientation is applied: the transposition ``PIL.ImageOps.exif_transpose``
  makes, done strip by strip.  Malformed EXIF metadata, or an orientation value
  other than 1-8, is ignored (the image is then used as stored).
* Pixel modes are converted to RGB as follows:

  - ``1``, ``L``, ``P``, ``RGB``, ``RGBX``, ``YCbCr``, ``CMYK``: Pillow's
    ``convert("RGB")`` (CMYK uses Pillow's plain conversion; embedded ICC
    profiles are not applied).
  - **Alpha** (``LA``, ``PA``, ``RGBA``, ``La``, ``RGBa``, and ``1``/``L``/``P``/
    ``RGB`` images with a transparency key or palette transparency) is
    composited over **white**: ``out = round((c * a + 255 * (255 - a)) / 255)``.
    A fully transparent pixel becomes ``(255, 255, 255)`` whatever its colour.
  - **High bit depth**: ``I;16`` (and ``I;16L``, ``I;16B``, ``I;16N``) and the
    32-bit integer mode ``I`` are treated as a 16-bit range ``0..65535``
    (values outside it are clipped) and mapped to 8 bits by
    ``round(v / 257)``, the exact inverse of the usual 8->16 bit expansion
    ``v8 * 257`` (65535 -> 255, 0 -> 0).  The float mode ``F`` is treated as
    ``0..1`` when every finite value is ``<= 1`` (scaled by 255), otherwise as
    ``0..255``; values are clipped and NaN becomes 0.  Grey results are
    replicated to three channels.
  - Any other mode Pillow cannot convert to RGB (e.g. ``LAB``) is refused as
    ``unsupported_format``.

* Limits (:class:`DecodeLimits`) are checked *before* any pixel is decoded:
  ``len(data)`` against ``max_bytes`` first, then the declared
  ``width * height`` from the header against ``max_pixels`` (decompression
  bombs).  Pillow's own ``DecompressionBombError``/``Warning`` are also
  reported as ``too_many_pixels``, but the check here does not depend on
  ``PIL.Image.MAX_IMAGE_PIXELS``.
* Truncated data is always an error: decoding refuses to run when
  ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` has been enabled by other code
  (``RuntimeError``), because that flag makes Pillow pad truncated files with
  grey silently.
* With ``target_size`` and a JPEG input, ``Image.draft("RGB", target_size)``
  lets libjpeg decode at 1/2, 1/4 or 1/8 scale while staying at least as
  large as ``target_size`` (after EXIF rotation), which speeds up big photos
  (a 64-megapixel JPEG is decoded at 1000 x 1000 for a 224 px model).

Memory
------
Decoding makes no large temporaries: Pillow decodes the photo in its own
mode, then the part that is kept (all of it for :func:`decode_image`, the
crop of the fit for :func:`load_image`) is converted to RGB **strip by strip**
(:data:`STRIP_PIXELS` pixels at a time) with Pillow's own operations: alpha
composited over white with ``Image.paste(..., mask=...)`` (the same integers
as the formula above), EXIF rotation per strip, 16-bit values through a
65,536-entry lookup table.  :func:`load_image` then resizes that RGB image
with Pillow and returns only the small array; the full-size photo never
becomes a numpy array.  Peak memory of one decode is therefore about the
decoded image (4 bytes per pixel in Pillow for RGB, RGBA and CMYK; 1 for
``L``/``P``; 2 for 16-bit grey) plus the converted RGB copy (4 bytes per
kept pixel; none for a plain RGB photo that is kept whole), plus a few
strips: about 8 bytes per pixel at most, instead of one full-size numpy copy
per conversion step (README, "Decoding memory", has the figures
benchmarks/decode_memory.py prints).  A progressive JPEG also
holds libjpeg's coefficient buffer (2 bytes per sample of the full-size
image) even when it is drafted down.

``budget`` (a :class:`worker.decode_budget.DecodeBudget`) bounds the pixels
decoded at once by several threads: a decode reserves the header's
``width * height`` after the limit checks and before any pixel is decoded,
and gives it back when its result is made.

``MemoryError`` is never turned into an :class:`ImageDecodeError`: only the
exceptions Pillow raises for malformed data (:data:`DECODER_ERRORS`) are
classified; everything else propagates to the caller (the worker then fails
the photo's message for a retry instead of recording a permanent
``corrupt`` item).

Resizing (:func:`resize_image`) -- the two fits
-----------------------------------------------
To ``size = (width, height)`` (default 224x224), with one of :data:`FITS`:

* ``crop`` (the default): scaled, aspect ratio kept, until the photo covers
  ``size``, then the centre ``size`` is cut out (a 500x375 photo loses 12.5% on
  the left and on the right): the breed's proportions stay as the ImageNet
  backbones saw them, at the cost of the border (README, Benchmarks, has
  both fits measured by benchmarks/accuracy.py).
* ``squash``: the whole photo is squashed to ``size``, the aspect ratio is not
  kept, as with ``tf.keras.utils.image_dataset_from_directory`` in the original
  design (and the artifacts published before ``input_fit`` existed).

An artifact records its fit (``manifest.json`` ``input_fit``) and the worker
resizes with it, so training and serving always agree.  Resampling is Pillow
``Image.Resampling.BILINEAR`` which, when shrinking, widens its filter support
(antialiasing).  The output is ``uint8``.

Error classification
--------------------
Every refusal raises :class:`ImageDecodeError` with one of the stable codes
in :data:`ERROR_CODES`.  For files that start like an accepted format:

* ``truncated`` -- the data ends early: a PNG whose chunks run past the end of
  the data or lack ``IEND``, a WebP whose RIFF size exceeds the data, or a
  Pillow error saying ``image file is truncated`` / ``Truncated File Read``.
* ``corrupt`` -- everything else the decoder rejects, notably a PNG chunk CRC
  mismatch (every PNG's chunk CRCs are verified before decoding, since Pillow
  does not check IDAT CRCs) and Pillow's ``broken data stream`` decoder error
  (invalid compressed data in a complete file).
"""

from __future__ import annotations

import io
import os
import re
import struct
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import numpy as np
from PIL import Image, ImageFile

from worker.decode_budget import DecodeBudget

__all__ = [
    "CORRUPT",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "EMPTY",
    "ERROR_CODES",
    "MODEL_INPUT_SIZE",
    "NOT_AN_IMAGE",
    "SUPPORTED_FORMATS",
    "TOO_MANY_BYTES",
    "TOO_MANY_PIXELS",
    "TRUNCATED",
    "UNSUPPORTED_FORMAT",
    "DecodeLimits",
    "ImageDecodeError",
    "decode_image",
    "load_image",
    "read_image_file",
    "resize_image",
]

DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_MAX_PIXELS = 64_000_000
MODEL_INPUT_SIZE = (224, 224)
FITS = ("crop", "squash")  # how a photo becomes MODEL_INPUT_SIZE (see the module docstring)
DEFAULT_FIT = "crop"
LEGACY_FIT = "squash"  # artifacts whose manifest has no input_fit were trained on squashed photos
#: File name suffixes treated as photos when listing folders or S3 prefixes (case-insensitive).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")

# --------------------------------------------------------------------------
# Error codes
# --------------------------------------------------------------------------
EMPTY = "empty"
TOO_MANY_BYTES = "too_many_bytes"
NOT_AN_IMAGE = "not_an_image"
UNSUPPORTED_FORMAT = "unsupported_format"
TRUNCATED = "truncated"
TOO_MANY_PIXELS = "too_many_pixels"
CORRUPT = "corrupt"

#: Stable, machine-readable error codes -> one-line description.
ERROR_CODES: Mapping[str, str] = MappingProxyType(
    {
        EMPTY: "The input has zero bytes.",
        TOO_MANY_BYTES: "The input is larger than DecodeLimits.max_bytes (checked before decoding).",
        NOT_AN_IMAGE: "The bytes are not an image (text, HTML, SVG, PDF, unknown binary).",
        UNSUPPORTED_FORMAT: "An image in a format other than JPEG, PNG, WebP, GIF, BMP, TIFF, "
        "or with a pixel mode that cannot be converted to RGB.",
        TRUNCATED: "The image data ends before the image is complete.",
        TOO_MANY_PIXELS: "Declared width*height exceeds DecodeLimits.max_pixels "
        "(decompression bomb guard, checked before decoding).",
        CORRUPT: "The image data is damaged (bad PNG CRC, invalid compressed data, "
        "decoder error not otherwise classified).",
    }
)

#: Pillow format names accepted (MPO is how Pillow names multi-picture JPEGs).
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})
_OPEN_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG also yields MPO
_TEXT_IMAGE_FORMATS = ("PPM", "XBM", "XPM")  # image formats that are plain text

#: What Pillow raises for malformed image data: these become an ImageDecodeError (``corrupt``,
#: ``truncated``, ...). Anything else, notably ``MemoryError``, propagates: running out of memory
#: says nothing about the photo, so it must fail the message for a retry, never be recorded as a
#: permanent ``corrupt`` item. tests/unit/test_images_fuzz.py damages photos of every accepted
#: format (bit flips, overwritten header bytes, cuts, splices) and checks that nothing but these
#: comes out of Pillow (20,000 examples once, ~450 in each test run).
DECODER_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes PIL.UnidentifiedImageError and "image file is truncated"
    ValueError,
    SyntaxError,  # Pillow's "not a ... file" for some plugins
    EOFError,
    zlib.error,
    struct.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,  # only raised when warnings are turned into errors
)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TRUNCATION_MESSAGES = re.compile(r"truncated", re.IGNORECASE)  # "image file is truncated", "Truncated File Read"


class ImageDecodeError(Exception):
    """Raised when bytes cannot be turned into an RGB image.

    ``code`` is one of :data:`ERROR_CODES` (stable, machine readable);
    ``message`` is for humans.
    """

    def __init__(self, code: str, message: str):
        if code not in ERROR_CODES:
            raise ValueError(f"unknown image error code {code!r}")
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True)
class DecodeLimits:
    """Resource limits applied before any pixel is decoded."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"DecodeLimits.{name} must be a positive int, got {value!r}")


_DEFAULT_LIMITS = DecodeLimits()


# --------------------------------------------------------------------------
# Sniffing helpers
# --------------------------------------------------------------------------
def _sniff_supported(data: bytes) -> str | None:
    """Name of the accepted format whose signature ``data`` starts with."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(_PNG_SIGNATURE):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if data[:2] == b"BM":
        return "BMP"
    return None


def _looks_like_text(data: bytes) -> bool:
    """Heuristic: the first KiB is text (UTF-8/ASCII, or a UTF-16 BOM)."""
    head = data[:1024]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return True
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    if not head or b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not merely a character cut at the end
            return False
        text = head[: exc.start].decode("utf-8")
    if not text:
        return False
    printable = sum(1 for ch in text if ch.isprintable() or ch in "\t\n\r\f\v")
    return printable >= 0.95 * len(text)


def _png_structure_error(data: bytes) -> ImageDecodeError | None:
    """Walk the PNG chunks, verifying lengths and CRCs up to IEND."""
    view = memoryview(data)
    size = len(data)
    pos = len(_PNG_SIGNATURE)
    while True:
        if pos + 8 > size:
            return ImageDecodeError(TRUNCATED, "PNG data ends before the IEND chunk")
        length = int.from_bytes(view[pos : pos + 4], "big")
        ctype = bytes(view[pos + 4 : pos + 8])
        if length > 0x7FFFFFFF:
            return ImageDecodeError(CORRUPT, f"PNG chunk {ctype!r} has an invalid length")
        end = pos + 12 + length
        if end > size:
            return ImageDecodeError(TRUNCATED, f"PNG chunk {ctype!r} runs past the end of the data")
        stored = int.from_bytes(view[end - 4 : end], "big")
        if zlib.crc32(view[pos + 4 : end - 4]) != stored:
            return ImageDecodeError(CORRUPT, f"PNG chunk {ctype!r} has a bad CRC")
        if ctype == b"IEND":
            return None
        pos = end


def _structural_truncation(fmt: str, data: bytes) -> ImageDecodeError | None:
    if fmt == "PNG":
        return _png_structure_error(data)
    if fmt == "WEBP" and len(data) >= 8:
        if int.from_bytes(data[4:8], "little") + 8 > len(data):
            return ImageDecodeError(TRUNCATED, "WebP data is shorter than its RIFF header declares")
    if fmt == "BMP" and len(data) >= 6:
        declared = int.from_bytes(data[2:6], "little")
        if declared and declared > len(data) and not _looks_like_text(data):
            return ImageDecodeError(TRUNCATED, "BMP data is shorter than its header declares")
    return None


def _classify_decoder_failure(fmt: str, data: bytes, exc: BaseException) -> ImageDecodeError:
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageDecodeError(TOO_MANY_PIXELS, str(exc))
    structural = _structural_truncation(fmt, data)
    if structural is not None:
        return structural
    text = str(exc)
    if _TRUNCATION_MESSAGES.search(text):
        return ImageDecodeError(TRUNCATED, f"{fmt} data is truncated ({text})")
    return ImageDecodeError(CORRUPT, f"{fmt} data could not be decoded ({type(exc).__name__}: {text})")


def _identify_unsupported(data: bytes) -> ImageDecodeError:
    """For data that is not one of the accepted formats: other image or not an image?"""
    stripped = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    if stripped[:1] == b"<":  # HTML, XML, SVG
        return ImageDecodeError(NOT_AN_IMAGE, "data is markup (HTML/XML/SVG), not a raster image")
    formats = _TEXT_IMAGE_FORMATS if _looks_like_text(data) else None
    try:
        with Image.open(io.BytesIO(data), formats=formats) as img:
            fmt = img.format
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        fmt = "an unsupported format"
    except DECODER_ERRORS:
        return ImageDecodeError(NOT_AN_IMAGE, "data is not a recognised image")
    return ImageDecodeError(
        UNSUPPORTED_FORMAT,
        f"image format {fmt} is not accepted (accepted: JPEG, PNG, WebP, GIF, BMP, TIFF)",
    )


# --------------------------------------------------------------------------
# Pixel conversion, one strip of rows at a time
# --------------------------------------------------------------------------
#: Pixels converted per strip: the only temporaries a conversion makes are a few strips of this
#: size (~1 MB each in Pillow), whatever the photo's size.
STRIP_PIXELS = 1 << 18
_WHITE = (255, 255, 255)
_ALPHA_MODES = frozenset({"LA", "PA", "RGBA", "La", "RGBa"})
#: EXIF orientation -> the transpose that displays the stored image upright (as
#: ``PIL.ImageOps.exif_transpose`` does).
_ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})
_LUT_16_TO_8 = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)  # round(v / 257)


def _is_high_depth(mode: str) -> bool:
    return mode in ("F", "I") or mode.startswith("I;16")


def _transparency_value(img: Image.Image) -> int | float | None:
    trns = img.info.get("transparency")
    if isinstance(trns, (int, float)) and not isinstance(trns, bool):
        return trns
    return None


def _float_scale(img: Image.Image) -> float:
    """Mode ``F``: 255 when every finite value is <= 1 (a 0..1 image), else 1 (0..255); the
    maximum is taken over the whole image, strip by strip."""
    top = None
    rows = max(1, STRIP_PIXELS // max(1, img.width))
    for y in range(0, img.height, rows):
        values = np.asarray(img.crop((0, y, img.width, min(img.height, y + rows))))
        finite = values[np.isfinite(values)]
        if finite.size:
            peak = float(finite.max())
            top = peak if top is None else max(top, peak)
    return 255.0 if top is not None and top <= 1.0 else 1.0


def _high_depth_strip(strip: Image.Image, scale: float, trns) -> Image.Image:
    """``I;16*``/``I``: round(v / 257) of v clipped to 0..65535; ``F``: v * scale clipped to
    0..255, NaN -> 0; the transparency value (if any) -> white; grey replicated to RGB."""
    values = np.asarray(strip)
    if strip.mode == "F":
        scaled = np.nan_to_num(values.astype(np.float64) * scale, nan=0.0, posinf=255.0, neginf=0.0)
        grey = np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)
    elif values.dtype.itemsize == 2 and values.dtype.kind == "u":  # I;16, I;16B, ...: already 0..65535
        grey = _LUT_16_TO_8[values]
    else:  # I: 32-bit, clipped to the 16-bit range
        grey = _LUT_16_TO_8[np.clip(values, 0, 65535)]
    if trns is not None:
        grey[values == trns] = 255
    return Image.fromarray(np.ascontiguousarray(grey)).convert("RGB")


def _over_white_strip(strip: Image.Image) -> Image.Image:
    """Alpha composited over white with Pillow's own blend: ``round((c * a + 255 * (255 - a)) / 255)``
    per channel (the same integers as the formula; checked for all 65,536 (c, a) pairs in the
    tests)."""
    rgba = strip if strip.mode == "RGBA" else strip.convert("RGBA")
    out = Image.new("RGB", rgba.size, _WHITE)
    out.paste(rgba, mask=rgba)
    return out


def _strip_converter(img: Image.Image):
    """The function that turns one strip of ``img`` (same mode) into RGB, per the rules of the
    module docstring; raises ImageDecodeError(unsupported_format) for modes with no RGB."""
    mode = img.mode
    if _is_high_depth(mode):
        scale = _float_scale(img) if mode == "F" else 1.0
        trns = _transparency_value(img)
        return lambda strip: _high_depth_strip(strip, scale, trns)
    has_alpha = mode in _ALPHA_MODES or (img.info.get("transparency") is not None and mode in ("1", "L", "P", "RGB"))
    if has_alpha:
        return _over_white_strip
    if mode == "RGB":
        return None
    try:
        img.crop((0, 0, 1, 1)).convert("RGB")  # a pixel: can this mode be converted at all?
    except ValueError as exc:
        raise ImageDecodeError(UNSUPPORTED_FORMAT, f"pixel mode {mode} cannot be converted to RGB") from exc
    return lambda strip: strip.convert("RGB")


def _stored_box(orientation: int, box: tuple[int, int, int, int], stored: tuple[int, int]) -> tuple[int, int, int, int]:
    """The box of the stored image that ``box`` (in the displayed, upright image) comes from."""
    x0, y0, x1, y1 = box
    w, h = stored
    return {
        1: (x0, y0, x1, y1),
        2: (w - x1, y0, w - x0, y1),
        3: (w - x1, h - y1, w - x0, h - y0),
        4: (x0, h - y1, x1, h - y0),
        5: (y0, x0, y1, x1),
        6: (y0, h - x1, y1, h - x0),
        7: (w - y1, h - x1, w - y0, h - x0),
        8: (w - y1, x0, w - y0, x1),
    }[orientation]


def _display_size(img: Image.Image, orientation: int) -> tuple[int, int]:
    return (img.height, img.width) if orientation in _SWAPS_AXES else img.size


def _upright_strips(img: Image.Image, orientation: int, box: tuple[int, int, int, int]):
    """Yield ``(row, rgb_strip)``: ``box`` of the upright (EXIF-oriented) image, converted to RGB,
    a strip of rows at a time (``row`` counted from the top of ``box``)."""
    convert = _strip_converter(img)
    method = _ORIENTATIONS.get(orientation)
    x0, y0, x1, y1 = box
    rows = max(1, STRIP_PIXELS // max(1, x1 - x0))
    for top in range(y0, y1, rows):
        strip_box = (x0, top, x1, min(y1, top + rows))
        strip = img.crop(_stored_box(orientation if method is not None else 1, strip_box, img.size))
        if method is not None:
            strip = strip.transpose(method)
        yield top - y0, (strip if convert is None else convert(strip))


def _upright_rgb_image(img: Image.Image, orientation: int, box: tuple[int, int, int, int]) -> Image.Image:
    """``box`` of the upright image as one RGB Pillow image, built strip by strip (a plain RGB
    photo is cropped, or used as it is when ``box`` is all of it)."""
    if orientation not in _ORIENTATIONS and img.mode == "RGB":
        return img if box == (0, 0, *img.size) else img.crop(box)
    out = Image.new("RGB", (box[2] - box[0], box[3] - box[1]))
    for row, strip in _upright_strips(img, orientation, box):
        out.paste(strip, (0, row))
    return out


def _upright_rgb_array(img: Image.Image, orientation: int) -> np.ndarray:
    """The whole upright image as an ``H x W x 3`` uint8 array, filled strip by strip."""
    width, height = _display_size(img, orientation)
    out = np.empty((height, width, 3), np.uint8)
    for row, strip in _upright_strips(img, orientation, (0, 0, width, height)):
        out[row : row + strip.height] = np.asarray(strip)
    return out


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1 when absent or unreadable: the image is then used as stored)."""
    try:
        value = img.getexif().get(0x0112, 1)
    except DECODER_ERRORS:
        return 1
    # a malformed tag may hold text, a tuple, ...: only the eight integer values mean something
    return value if isinstance(value, int) and value in _ORIENTATIONS else 1


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------
def _open_checked(data, limits: DecodeLimits) -> tuple[Image.Image, str]:
    """Validate ``data`` and open it: the limits are checked before any pixel is decoded."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) == 0:
        raise ImageDecodeError(EMPTY, "no image data (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageDecodeError(
            TOO_MANY_BYTES, f"{len(data)} bytes exceeds the limit of {limits.max_bytes} bytes"
        )
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is enabled; worker.images needs it disabled "
            "so truncated images are rejected identically in training and serving"
        )

    sniffed = _sniff_supported(data)
    if sniffed is None:
        raise _identify_unsupported(data)

    try:
        img = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except DECODER_ERRORS as exc:
        if _looks_like_text(data) and not isinstance(exc, Image.DecompressionBombError):
            raise ImageDecodeError(NOT_AN_IMAGE, "data is text, not an image") from exc
        raise _classify_decoder_failure(sniffed, data, exc) from exc
    try:
        fmt = img.format or sniffed
        if fmt not in SUPPORTED_FORMATS:  # defensive: formats= restricts this already
            raise ImageDecodeError(UNSUPPORTED_FORMAT, f"image format {fmt} is not accepted")
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageDecodeError(CORRUPT, f"image declares an invalid size {width}x{height}")
        if width * height > limits.max_pixels:
            raise ImageDecodeError(
                TOO_MANY_PIXELS,
                f"{width}x{height} = {width * height} pixels exceeds the limit of "
                f"{limits.max_pixels}",
            )
        if fmt == "PNG":
            structural = _png_structure_error(data)
            if structural is not None:
                raise structural
    except BaseException:
        img.close()
        raise
    return img, fmt


@contextmanager
def _decoded(data, limits: DecodeLimits, target_size: tuple[int, int] | None, budget: DecodeBudget | None):
    """Open, check, reserve ``width * height`` of ``budget`` (if any), draft (JPEG), load; yields
    ``(image, orientation)`` with the reservation held. The image is closed (its pixels freed)
    before the reservation ends, so the budget can hand that memory back to the OS."""
    img, fmt = _open_checked(data, limits)
    try:
        with budget.reserve(img.width * img.height) if budget is not None else nullcontext():
            try:
                if target_size is not None and fmt in ("JPEG", "MPO"):
                    tw, th = (int(target_size[0]), int(target_size[1]))
                    if _orientation(img) in _SWAPS_AXES:  # stored image is rotated by 90 degrees
                        tw, th = th, tw
                    if tw > 0 and th > 0:
                        try:
                            img.draft("RGB", (tw, th))
                        except DECODER_ERRORS:
                            pass  # draft is only an optimisation
                try:
                    img.load()  # Image.open leaves animations / multi-page files on frame 0
                    orientation = _orientation(img)
                except DECODER_ERRORS as exc:
                    raise _classify_decoder_failure(fmt, bytes(data), exc) from exc
                try:
                    yield img, orientation
                except DECODER_ERRORS as exc:  # raised while converting the decoded pixels
                    raise _classify_decoder_failure(fmt, bytes(data), exc) from exc
            finally:
                img.close()
    finally:
        img.close()


def decode_image(
    data: bytes,
    *,
    limits: DecodeLimits = _DEFAULT_LIMITS,
    target_size: tuple[int, int] | None = None,
    budget: DecodeBudget | None = None,
) -> np.ndarray:
    """Decode image bytes into an ``H x W x 3`` ``uint8`` RGB array.

    See the module docstring for the accepted formats, the mode conversions
    (alpha over white, 16-bit/float scaling), EXIF orientation and the error
    codes.  ``target_size=(width, height)`` only enables JPEG draft decoding
    (the result stays at least that large); it does not resize.  ``budget``:
    hold ``width * height`` of this :class:`~worker.decode_budget.DecodeBudget`
    while decoding.

    Raises :class:`ImageDecodeError` for bad input and ``RuntimeError`` when
    ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is enabled.  ``MemoryError`` is
    never turned into an ImageDecodeError: it propagates.
    """
    with _decoded(data, limits, target_size, budget) as (img, orientation):
        return _upright_rgb_array(img, orientation)


def check_fit(fit: str) -> str:
    if fit not in FITS:
        raise ValueError(f"unknown fit {fit!r}: one of {', '.join(FITS)}")
    return fit


def crop_box(width: int, height: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The centred box (left, top, right, bottom) of a ``width x height`` photo with the aspect
    ratio of ``size``, rounded to whole pixels: what ``crop`` keeps."""
    target = size[0] / size[1]
    if width / height > target:  # wider than the target: cut left and right
        kept = max(1, min(width, round(height * target)))
        left = (width - kept) // 2
        return (left, 0, left + kept, height)
    kept = max(1, min(height, round(width / target)))
    top = (height - kept) // 2
    return (0, top, width, top + kept)


def resize_image(rgb: np.ndarray, size: tuple[int, int] = MODEL_INPUT_SIZE, fit: str = DEFAULT_FIT) -> np.ndarray:
    """Resize to ``size = (width, height)`` with ``fit`` (``crop``: aspect kept, centre cut out;
    ``squash``: the whole photo, aspect not kept); returns ``height x width x 3`` uint8, with
    Pillow ``BILINEAR`` resampling (antialiased when shrinking)."""
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 array, got shape {arr.shape} dtype {arr.dtype}")
    width, height = int(size[0]), int(size[1])
    if width <= 0 or height <= 0:
        raise ValueError(f"size must be positive (width, height), got {size!r}")
    img = Image.fromarray(np.ascontiguousarray(arr))
    if check_fit(fit) == "crop":
        img = img.crop(crop_box(img.width, img.height, (width, height)))
    resized = img.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8).copy()


def load_image(
    data: bytes,
    *,
    size: tuple[int, int] = MODEL_INPUT_SIZE,
    fit: str = DEFAULT_FIT,
    limits: DecodeLimits = _DEFAULT_LIMITS,
    budget: DecodeBudget | None = None,
) -> np.ndarray:
    """Decode and resize with ``fit``: ``size[1] x size[0] x 3`` uint8.

    The function both the trainer and the worker call.  The same pixels as
    ``resize_image(decode_image(data, target_size=size), size, fit)``, without
    a full-size array: only the part ``fit`` keeps is converted to RGB (strip
    by strip, in Pillow), then resized.  ``budget``: as for :func:`decode_image`.
    """
    width, height = int(size[0]), int(size[1])
    if width <= 0 or height <= 0:
        raise ValueError(f"size must be positive (width, height), got {size!r}")
    check_fit(fit)
    with _decoded(data, limits, (width, height), budget) as (img, orientation):
        upright = _display_size(img, orientation)
        box = crop_box(*upright, (width, height)) if fit == "crop" else (0, 0, *upright)
        rgb = _upright_rgb_image(img, orientation, box)
        if rgb is not img:
            img.close()  # the source pixels are no longer needed: free them before resizing
        with rgb:
            resized = rgb.resize((width, height), Image.Resampling.BILINEAR)
        return np.array(resized, dtype=np.uint8)


def read_image_file(path: str | os.PathLike, **kw) -> np.ndarray:
    """Read an image file and :func:`load_image` it (keyword arguments pass through).

    Reads at most ``limits.max_bytes + 1`` bytes so oversized files are refused
    without loading them whole.
    """
    limits = kw.get("limits", _DEFAULT_LIMITS)
    with open(path, "rb") as fh:
        data = fh.read(limits.max_bytes + 1)
    return load_image(data, **kw)
