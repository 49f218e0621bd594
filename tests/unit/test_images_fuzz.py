"""Property tests of worker.images on damaged bytes (hypothesis): whatever the bytes, decoding
ends in an image or an ImageDecodeError (never another exception); MemoryError is never
swallowed into a permanent error code."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from worker import images
from worker.images import DecodeLimits, ImageDecodeError, decode_image, load_image

LIMITS = DecodeLimits(max_pixels=4_000_000)  # a flipped header may declare a big image: keep each example fast


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kw)
    return buffer.getvalue()


def _pattern(mode: str, size=(24, 16)) -> Image.Image:
    rng = np.random.default_rng(7)
    rgba = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    rgba[:, : size[0] // 3, 3] = 0  # some transparent pixels
    base = Image.fromarray(rgba)
    if mode in ("RGBA", "LA", "PA"):
        return base.convert(mode) if mode != "PA" else base.convert("P").convert("PA")
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (size[1], size[0])).astype(np.uint16))
    if mode == "F":
        return Image.fromarray(rng.random((size[1], size[0])).astype(np.float32))
    return base.convert("RGB").convert(mode)


def _animated_gif() -> bytes:
    frames = [_pattern("P"), _pattern("RGB").convert("P"), _pattern("L").convert("P")]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0, transparency=0)


#: One small valid photo of every accepted format and the colour modes worth damaging.
SEEDS = {
    "jpeg": _encode(_pattern("RGB"), "JPEG", quality=90),
    "jpeg-progressive": _encode(_pattern("RGB"), "JPEG", progressive=True, quality=80),
    "jpeg-cmyk": _encode(_pattern("CMYK"), "JPEG"),
    "jpeg-grey": _encode(_pattern("L"), "JPEG"),
    "png-rgb": _encode(_pattern("RGB"), "PNG"),
    "png-rgba": _encode(_pattern("RGBA"), "PNG"),
    "png-la": _encode(_pattern("LA"), "PNG"),
    "png-palette-trns": _encode(_pattern("P"), "PNG", transparency=3),
    "png-16bit": _encode(_pattern("I;16"), "PNG"),
    "png-1bit": _encode(_pattern("1"), "PNG"),
    "webp-lossless-alpha": _encode(_pattern("RGBA"), "WEBP", lossless=True),
    "webp-lossy": _encode(_pattern("RGB"), "WEBP", quality=70),
    "gif-animated": _animated_gif(),
    "bmp": _encode(_pattern("RGB"), "BMP"),
    "bmp-palette": _encode(_pattern("P"), "BMP"),
    "tiff": _encode(_pattern("RGB"), "TIFF"),
    "tiff-cmyk-lzw": _encode(_pattern("CMYK"), "TIFF", compression="tiff_lzw"),
    "tiff-16bit": _encode(_pattern("I;16"), "TIFF"),
    "tiff-float": _encode(_pattern("F"), "TIFF"),
    "tiff-pa": _encode(_pattern("PA"), "TIFF"),
    "tiff-deflate": _encode(_pattern("RGBA"), "TIFF", compression="tiff_adobe_deflate"),
}


@st.composite
def damaged(draw) -> bytes:
    """A seed photo with bits flipped, bytes overwritten, a cut, or a splice of random bytes."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "byte", "truncate", "splice", "header"]))
        if not data:
            break
        if kind == "flip":
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif kind == "header":  # damage the first 64 bytes, where sizes and modes live
            at = draw(st.integers(0, min(63, len(data) - 1)))
            data[at] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255))]))
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data) - 1)):]
        else:
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


def _outcome(fn, data: bytes):
    try:
        out = fn(data)
    except ImageDecodeError as error:
        assert error.code in images.ERROR_CODES
        return error.code
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    return "ok"


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=damaged())
def test_damaged_photos_only_ever_raise_image_decode_error(data):
    # any other exception (MemoryError included) fails the test
    decoded = _outcome(lambda d: decode_image(d, limits=LIMITS), data)
    loaded = _outcome(lambda d: load_image(d, size=(16, 16), limits=LIMITS), data)
    assert decoded == loaded  # the two entry points judge the bytes alike


@settings(max_examples=150, deadline=None)
@given(head=st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
                             b"RIFF\x00\x00\x00\x00WEBP", b""]),
       tail=st.binary(max_size=512))
def test_random_bytes_behind_a_real_signature(head, tail):
    _outcome(lambda d: decode_image(d, limits=LIMITS), head + tail)


@settings(max_examples=60, deadline=None)
@given(data=damaged())
def test_damaged_photos_with_default_limits(data):
    _outcome(decode_image, data)  # a header may now declare up to 64 MP: still only ImageDecodeError


def test_every_seed_decodes():
    for name, data in SEEDS.items():
        assert decode_image(data).shape[:2] in ((16, 24),), name


# --------------------------------------------------------------------------
# MemoryError propagates, from every stage of decoding
# --------------------------------------------------------------------------
def _raise_memory_error(*args, **kwargs):
    raise MemoryError("out of memory (simulated)")


STAGES = {
    "open": (Image, "open"),
    "load": (Image.Image, "load"),
    "draft": (Image.Image, "draft"),
    "getexif": (Image.Image, "getexif"),
    "crop": (Image.Image, "crop"),
    "convert": (Image.Image, "convert"),
    "paste": (Image.Image, "paste"),
    "new image": (Image, "new"),
    "resize": (Image.Image, "resize"),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize("seed", ["jpeg", "png-rgba", "png-16bit", "tiff-cmyk-lzw", "gif-animated"])
def test_memory_error_propagates(monkeypatch, stage, seed):
    from PIL import ImageFile, JpegImagePlugin

    target, name = STAGES[stage]
    monkeypatch.setattr(target, name, _raise_memory_error)
    if stage == "load":  # the plugins override load(): patch theirs too
        monkeypatch.setattr(ImageFile.ImageFile, "load", _raise_memory_error)
    if stage == "draft":
        monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", _raise_memory_error)
    raised = []
    for call in (lambda: decode_image(SEEDS[seed], target_size=(8, 8)), lambda: load_image(SEEDS[seed], size=(8, 8))):
        try:
            call()
        except MemoryError:
            raised.append("MemoryError")
        except ImageDecodeError as error:
            raised.append(f"ImageDecodeError {error.code}")
        else:
            raised.append("nothing")
    # a stage a path does not use raises nothing there; a stage it uses must surface MemoryError
    assert "ImageDecodeError" not in " ".join(raised), raised
    assert "MemoryError" in raised or stage in {"draft", "getexif", "paste", "new image", "crop", "convert"}, raised


def test_memory_error_from_the_pixel_decoder_propagates(monkeypatch):
    """The decoder itself (Pillow's C code) running out of memory: every format's load path."""
    from PIL import ImageFile

    def decoder_fails(self, *args, **kwargs):
        raise MemoryError("decoder could not allocate")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decoder_fails)
    for name, data in SEEDS.items():
        with pytest.raises(MemoryError):
            load_image(data, size=(8, 8))
        with pytest.raises(MemoryError):
            decode_image(data)
        assert name


@pytest.mark.parametrize("value", [0, 9, 65535])
def test_odd_exif_orientation_values(value):
    """An orientation tag holding a number that is none of the eight: oriented exactly as
    PIL.ImageOps.exif_transpose orients it (as stored unless Pillow reads one of the eight
    values), never an exception."""
    from PIL import ImageOps

    img = _pattern("RGB", size=(30, 10))
    exif = Image.Exif()
    exif[0x0112] = value
    for fmt in ("JPEG", "PNG"):
        data = _encode(img, fmt, exif=exif.tobytes())
        width, height = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size
        assert decode_image(data).shape == (height, width, 3)
        assert load_image(data, size=(8, 8)).shape == (8, 8, 3)
