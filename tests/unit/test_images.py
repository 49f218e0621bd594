"""Unit tests for worker.images (every input is generated here with Pillow/numpy)."""

from __future__ import annotations

import io
import pickle
import re
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from worker import images
from worker.images import (
    DEFAULT_FIT,
    ERROR_CODES,
    FITS,
    MODEL_INPUT_SIZE,
    DecodeLimits,
    ImageDecodeError,
    crop_box,
    decode_image,
    load_image,
    read_image_file,
    resize_image,
)

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "photos"

RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def two_colour(width: int, height: int, left=RED, right=BLUE, split: float = 0.5) -> Image.Image:
    arr = np.empty((height, width, 3), np.uint8)
    cut = int(width * split)
    arr[:, :cut] = left
    arr[:, cut:] = right
    return Image.fromarray(arr)


def png_chunk(ctype: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + ctype
        + payload
        + struct.pack(">I", zlib.crc32(ctype + payload) & 0xFFFFFFFF)
    )


def hand_made_png(width: int, height: int, colour_type: int = 2) -> bytes:
    """Valid signature/IHDR/IDAT/IEND with correct CRCs, but a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def error_code(data: bytes, **kw) -> str:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, **kw)
    assert info.value.code in ERROR_CODES
    return info.value.code


def assert_close(pixel, expected, tol: int) -> None:
    diff = np.abs(np.asarray(pixel, np.int32) - np.asarray(expected, np.int32))
    assert diff.max() <= tol, f"{tuple(int(v) for v in pixel)} != {expected} (tol {tol})"


# --------------------------------------------------------------------------
# API surface
# --------------------------------------------------------------------------
def documented_decode_error_codes() -> set[str]:
    """The decode error codes README.md's manifest section lists ("Item error codes: from
    decoding, `empty`, ...; from S3, ...")."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("Item error codes:", 1)[1].split("from S3", 1)[0]
    assert "from decoding" in section
    return set(re.findall(r"`([a-z_]+)`", section))


def test_decode_error_codes_are_the_documented_ones():
    """Manifest readers (the report, operators' scripts) switch on these codes: a new code, or a
    renamed one, must reach the documentation of the manifest."""
    assert set(ERROR_CODES) == documented_decode_error_codes()
    with pytest.raises(ValueError):
        ImageDecodeError("undocumented_code", "an error no manifest reader knows")


def test_default_limits_refuse_just_past_the_documented_bounds():
    """README: 50 MiB and 64 megapixels by default."""
    assert error_code(b"\xff\xd8\xff" + bytes(50 * 1024 * 1024 - 2)) == "too_many_bytes"
    assert error_code(hand_made_png(64_000_001, 1)) == "too_many_pixels"  # header only: nothing is decoded
    assert error_code(b"\xff\xd8\xff" + bytes(50 * 1024 * 1024 - 3)) != "too_many_bytes"  # exactly 50 MiB: read


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "64"])
def test_decode_limits_must_be_positive_ints(bad):
    with pytest.raises(ValueError):
        DecodeLimits(max_pixels=bad)
    with pytest.raises(ValueError):
        DecodeLimits(max_bytes=bad)


def test_image_decode_error_fields_and_pickle():
    err = ImageDecodeError("truncated", "cut short")
    assert (err.code, err.message) == ("truncated", "cut short")
    assert "truncated" in str(err) and "cut short" in str(err)
    again = pickle.loads(pickle.dumps(err))
    assert (again.code, again.message) == ("truncated", "cut short")
    with pytest.raises(ValueError):
        ImageDecodeError("nope", "unknown code")


def test_module_does_not_import_tensorflow():
    source = Path(images.__file__).read_text()
    assert "tensorflow" not in source.replace("tf.keras.utils", "")


# --------------------------------------------------------------------------
# formats
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fmt, kw, tol",
    [
        ("JPEG", {"quality": 95}, 12),
        ("PNG", {}, 0),
        ("WEBP", {"lossless": True}, 0),
        ("WEBP", {"quality": 90}, 20),
        ("GIF", {}, 0),
        ("BMP", {}, 0),
        ("TIFF", {}, 0),
    ],
)
def test_decodes_accepted_formats(fmt, kw, tol):
    data = encode(two_colour(64, 48), fmt, **kw)
    assert Image.open(io.BytesIO(data)).format == fmt
    out = decode_image(data)
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    assert_close(out[24, 8], RED, tol)
    assert_close(out[24, 56], BLUE, tol)


def test_animated_gif_uses_first_frame():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (32, 32), c) for c in colours]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    out = decode_image(data)
    assert out.shape == (32, 32, 3)
    assert np.all(out == np.array(colours[0], np.uint8))


def test_exif_orientation_6_is_applied():
    # stored 60 wide x 40 high, red block in the stored top-left corner
    arr = np.full((40, 60, 3), 255, np.uint8)
    arr[:10, :10] = RED
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    data = encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(data)
    assert out.shape == (60, 40, 3)  # rotated: now 40 wide x 60 high
    assert_close(out[3, 36], RED, 40)  # stored top-left -> displayed top-right
    assert_close(out[3, 3], WHITE, 40)
    assert_close(out[56, 36], WHITE, 40)


def test_draft_size_accounts_for_exif_rotation():
    arr = np.zeros((1000, 3000, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, 3000, dtype=np.uint8)[None, :]
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(arr), "JPEG", quality=85, exif=exif.tobytes())
    out = decode_image(data, target_size=(250, 750))  # (width, height) as displayed
    assert out.shape == (750, 250, 3)  # 1/4 scale draft, then rotated; never below target
    assert decode_image(data).shape == (3000, 1000, 3)


# --------------------------------------------------------------------------
# pixel modes
# --------------------------------------------------------------------------
def test_mode_1():
    img = Image.new("1", (4, 2), 0)
    img.putpixel((1, 0), 1)
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "1"
    out = decode_image(data)
    assert out.shape == (2, 4, 3)
    assert tuple(out[0, 0]) == (0, 0, 0)
    assert tuple(out[0, 1]) == WHITE


def test_mode_l():
    data = encode(Image.new("L", (3, 2), 77), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "L"
    assert np.all(decode_image(data) == 77)


def test_mode_la_alpha_over_white():
    img = Image.new("LA", (3, 1))
    img.putpixel((0, 0), (10, 0))  # fully transparent
    img.putpixel((1, 0), (100, 255))  # opaque
    img.putpixel((2, 0), (0, 128))  # half transparent black
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "LA"
    out = decode_image(data)
    assert tuple(out[0, 0]) == WHITE
    assert tuple(out[0, 1]) == (100, 100, 100)
    assert tuple(out[0, 2]) == (127, 127, 127)


def test_mode_p():
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 12, 200, 99] + [0] * (256 * 3 - 6))
    img.putpixel((1, 0), 1)
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = decode_image(data)
    assert tuple(out[0, 0]) == (0, 0, 0)
    assert tuple(out[0, 1]) == (12, 200, 99)


def test_mode_p_with_transparent_index_is_white():
    img = Image.new("P", (2, 1))
    img.putpalette([5, 6, 7, 12, 200, 99] + [0] * (256 * 3 - 6))
    img.putpixel((1, 0), 1)
    data = encode(img, "PNG", transparency=0)
    out = decode_image(data)
    assert tuple(out[0, 0]) == WHITE
    assert tuple(out[0, 1]) == (12, 200, 99)


def test_mode_pa_alpha_over_white():
    img = Image.new("PA", (2, 1))
    img.putpalette([30, 60, 90] * 256)
    img.putpixel((0, 0), (0, 0))
    img.putpixel((1, 0), (0, 255))
    data = encode(img, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "PA"
    out = decode_image(data)
    assert tuple(out[0, 0]) == WHITE
    assert tuple(out[0, 1]) == (30, 60, 90)


def test_mode_rgba_alpha_over_white():
    img = Image.new("RGBA", (3, 1))
    img.putpixel((0, 0), (10, 20, 30, 0))
    img.putpixel((1, 0), (10, 20, 30, 255))
    img.putpixel((2, 0), (0, 0, 255, 128))
    data = encode(img, "PNG")
    out = decode_image(data)
    assert tuple(out[0, 0]) == WHITE
    assert tuple(out[0, 1]) == (10, 20, 30)
    assert tuple(out[0, 2]) == (127, 127, 255)


def test_mode_cmyk_jpeg():
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data)
    assert out.shape == (16, 16, 3)
    assert_close(out[8, 8], RED, 10)


@pytest.mark.parametrize("mode, fmt", [("I;16", "PNG"), ("I;16B", "TIFF")])
def test_mode_i16_scaled_to_8_bit(mode, fmt):
    arr = np.array([[65535, 0, 257 * 100, 128]], np.uint16)
    img = Image.new(mode, (4, 1))
    for x, v in enumerate(arr[0]):
        img.putpixel((x, 0), int(v))
    data = encode(img, fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = decode_image(data)
    assert out.dtype == np.uint8
    assert [tuple(p) for p in out[0]] == [(255,) * 3, (0,) * 3, (100,) * 3, (0,) * 3]


def test_mode_i_treated_as_16_bit_and_clipped():
    img = Image.new("I", (4, 1))
    for x, v in enumerate([65535, 0, 70000, -5]):
        img.putpixel((x, 0), v)
    data = encode(img, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    out = decode_image(data)
    assert list(out[0, :, 0]) == [255, 0, 255, 0]


@pytest.mark.parametrize(
    "values, expected",
    [
        ([1.0, 0.0, 0.25, -0.5], [255, 0, 64, 0]),  # max <= 1: 0..1 range
        ([200.0, 0.0, 300.0, 7.4], [200, 0, 255, 7]),  # otherwise 0..255, clipped
    ],
)
def test_mode_f_scaling(values, expected):
    img = Image.new("F", (4, 1))
    for x, v in enumerate(values):
        img.putpixel((x, 0), v)
    data = encode(img, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    out = decode_image(data)
    assert list(out[0, :, 0]) == expected
    assert np.all(out[..., 0] == out[..., 2])


# --------------------------------------------------------------------------
# error classification
# --------------------------------------------------------------------------
def test_empty():
    assert error_code(b"") == "empty"


def test_too_many_bytes_checked_before_decoding():
    data = encode(two_colour(64, 48), "PNG")
    limits = DecodeLimits(max_bytes=len(data) - 1)
    assert error_code(data, limits=limits) == "too_many_bytes"
    # not even sniffed: garbage over the limit is too_many_bytes, not not_an_image
    assert error_code(b"x" * 101, limits=DecodeLimits(max_bytes=100)) == "too_many_bytes"
    assert decode_image(data, limits=DecodeLimits(max_bytes=len(data))).shape == (48, 64, 3)


@pytest.mark.parametrize(
    "data",
    [
        b"just some plain text\nwith two lines\n",
        b"<!DOCTYPE html><html><body><img src='dog.jpg'></body></html>",
        b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" '
        b'height="10"><rect width="10" height="10" fill="red"/></svg>',
        b"BMW is a car brand, not a bitmap",
        bytes(range(256)) * 4,
    ],
    ids=["text", "html", "svg", "text-starting-with-BM", "binary-garbage"],
)
def test_not_an_image(data):
    assert error_code(data) == "not_an_image"


@pytest.mark.parametrize("fmt", ["ICO", "PPM"])
def test_other_pillow_formats_are_unsupported(fmt):
    data = encode(Image.new("RGB", (16, 16), RED), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself can read it
    assert error_code(data) == "unsupported_format"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated(fmt):
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    assert decode_image(data).shape == (120, 160, 3)
    assert error_code(data[: len(data) // 2]) == "truncated"


def test_truncated_png_inside_header():
    data = encode(two_colour(64, 48), "PNG")
    assert error_code(data[:20]) == "truncated"


def test_png_missing_iend_is_truncated():
    data = encode(two_colour(64, 48), "PNG")
    assert data.endswith(png_chunk(b"IEND", b""))
    assert error_code(data[:-12]) == "truncated"  # cut exactly at a chunk boundary


@pytest.mark.parametrize("where", ["payload", "crc-field"])
def test_png_bad_crc_is_corrupt(where):
    data = bytearray(encode(two_colour(64, 48), "PNG"))
    pos = data.index(b"IDAT")
    length = struct.unpack(">I", data[pos - 4 : pos])[0]
    if where == "payload":
        data[pos + 4 + length // 2] ^= 0x01  # flip one bit in the IDAT payload
    else:
        data[pos + 4 + length] ^= 0x01  # pixel data intact, only the stored CRC is wrong
    assert error_code(bytes(data)) == "corrupt"


def test_decompression_bomb_png_refused_fast():
    bomb = hand_made_png(30_000, 30_000)
    assert len(bomb) < 200
    start = time.perf_counter()
    assert error_code(bomb) == "too_many_pixels"
    assert time.perf_counter() - start < 1.0


def test_pixel_limit_does_not_rely_on_pil_global(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL's own guard disabled
    bomb = hand_made_png(12_000, 12_000, colour_type=0)  # 144 Mpx > default 64 Mpx
    start = time.perf_counter()
    assert error_code(bomb) == "too_many_pixels"
    assert time.perf_counter() - start < 1.0


def test_pil_bomb_warning_becomes_too_many_pixels():
    bomb = hand_made_png(10_000, 10_000, colour_type=0)  # 100 Mpx > PIL's 89 Mpx warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        code = error_code(bomb, limits=DecodeLimits(max_pixels=150_000_000))
    assert code == "too_many_pixels"


def test_too_many_pixels_configurable_limit():
    data = encode(two_colour(100, 50), "PNG")
    assert error_code(data, limits=DecodeLimits(max_pixels=4_999)) == "too_many_pixels"
    assert decode_image(data, limits=DecodeLimits(max_pixels=5_000)).shape == (50, 100, 3)


def test_refuses_to_run_with_load_truncated_images(monkeypatch):
    data = encode(two_colour(64, 48), "JPEG")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(data[: len(data) // 2])


def test_module_leaves_pil_globals_alone():
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    decode_image(encode(two_colour(8, 8), "PNG"))
    with pytest.raises(ImageDecodeError):
        decode_image(hand_made_png(30_000, 30_000))
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before
    assert before == (89_478_485, False)


# --------------------------------------------------------------------------
# resize / load
# --------------------------------------------------------------------------
def test_squash_keeps_the_whole_photo_distorted():
    src = np.asarray(two_colour(400, 200))
    out = resize_image(src, fit="squash")
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert np.all(out[:, :100] == RED)  # left half red, top to bottom: no letterbox
    assert np.all(out[:, 124:] == BLUE)
    # left quarter red: squash keeps it (a centre crop to a square loses it entirely)
    out = resize_image(np.asarray(two_colour(400, 200, split=0.25)), fit="squash")
    assert np.all(out[:, :50] == RED)
    assert np.all(out[:, 62:] == BLUE)


def test_crop_is_the_default_and_keeps_the_centre_undistorted():
    # 400x200, left quarter red: the centre 200x200 square (x 100..300) is all blue
    src = np.asarray(two_colour(400, 200, split=0.25))
    out = resize_image(src)
    assert out.shape == (224, 224, 3) and np.all(out == BLUE)
    assert DEFAULT_FIT == "crop" and FITS == ("crop", "squash")
    # a tall photo loses its top and bottom: 100x300, the centre 100x100 is rows 100..200
    tall = np.zeros((300, 100, 3), np.uint8)
    tall[:100], tall[100:200], tall[200:] = RED, BLUE, RED
    np.testing.assert_array_equal(resize_image(tall, (50, 50)), np.full((50, 50, 3), BLUE, np.uint8))
    # undistorted: a circle stays a circle (equal extent across and down)
    yy, xx = np.mgrid[:300, :500]
    disc = np.where(((xx - 250) ** 2 + (yy - 150) ** 2 < 100 ** 2)[..., None], 255, 0).astype(np.uint8).repeat(3, 2)
    mask = resize_image(disc, (150, 150))[..., 0] > 127
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    assert abs((rows[-1] - rows[0]) - (cols[-1] - cols[0])) <= 1
    squashed = resize_image(disc, (150, 150), fit="squash")[..., 0] > 127
    rows, cols = np.flatnonzero(squashed.any(1)), np.flatnonzero(squashed.any(0))
    assert (rows[-1] - rows[0]) - (cols[-1] - cols[0]) > 30  # stretched across


def test_crop_box_matches_an_explicit_crop_then_resize():
    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, (90, 170, 3), dtype=np.uint8)
    assert crop_box(170, 90, (64, 32)) == (0, 2, 170, 87)  # a 2:1 box, centred
    assert crop_box(90, 170, (32, 32)) == (0, 40, 90, 130) and crop_box(400, 200, (32, 32)) == (100, 0, 300, 200)
    expected = np.asarray(Image.fromarray(src[2:87]).resize((64, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(resize_image(src, (64, 32)), expected)
    with pytest.raises(ValueError, match="unknown fit"):
        resize_image(src, (64, 32), fit="pad")


def test_resize_size_is_width_height_and_bilinear():
    rng = np.random.default_rng(2)
    src = rng.integers(0, 256, (90, 170, 3), dtype=np.uint8)
    out = resize_image(src, (64, 32), fit="squash")
    assert out.shape == (32, 64, 3) and out.dtype == np.uint8
    expected = np.asarray(Image.fromarray(src).resize((64, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out, expected)
    nearest = np.asarray(Image.fromarray(src).resize((64, 32), Image.Resampling.NEAREST))
    assert not np.array_equal(out, nearest)


def test_resize_rejects_non_rgb_uint8():
    with pytest.raises(ValueError):
        resize_image(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError):
        resize_image(np.zeros((4, 4, 3), np.float32))


def sample_photo() -> Path:
    photos = sorted(SAMPLES.rglob("*.jpg"))
    if not photos:
        pytest.skip("no sample photos")
    return photos[0]


def test_load_image_on_sample_photo():
    path = sample_photo()
    data = path.read_bytes()
    out = load_image(data)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert out.std() > 5  # a real photo, not a flat fill
    np.testing.assert_array_equal(read_image_file(path), out)
    small = load_image(data, size=(100, 60))
    assert small.shape == (60, 100, 3)


def test_read_image_file_respects_byte_limit(tmp_path):
    path = tmp_path / "img.png"
    path.write_bytes(encode(two_colour(64, 48), "PNG"))
    with pytest.raises(ImageDecodeError) as info:
        read_image_file(path, limits=DecodeLimits(max_bytes=50))
    assert info.value.code == "too_many_bytes"
    assert read_image_file(path, size=(32, 16)).shape == (16, 32, 3)


def test_draft_decode_close_to_full_decode_for_large_jpeg():
    h, w = 2000, 3000
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.empty((h, w, 3), np.uint8)
    arr[..., 0] = (xx / w * 255).astype(np.uint8)
    arr[..., 1] = (yy / h * 255).astype(np.uint8)
    arr[..., 2] = ((np.sin(xx / 90) * np.cos(yy / 70) + 1) * 127).astype(np.uint8)
    arr[((xx - 1500) ** 2 + (yy - 1000) ** 2) < 400**2] = (240, 200, 20)
    data = encode(Image.fromarray(arr), "JPEG", quality=90)

    drafted = decode_image(data, target_size=MODEL_INPUT_SIZE)
    assert drafted.shape == (250, 375, 3)  # libjpeg 1/8 scale: draft really used
    assert min(drafted.shape[:2]) >= 224

    fast = load_image(data)
    full = resize_image(decode_image(data))
    assert fast.shape == full.shape == (224, 224, 3)
    assert np.abs(fast.astype(np.int16) - full.astype(np.int16)).mean() < 3


def test_s3_error_codes_are_the_documented_ones():
    """The S3 item error codes (worker.pipeline.PERMANENT_S3_ERRORS) are listed in the README's
    manifest section too ("...; from S3, `not_found`, ...")."""
    from worker.pipeline import PERMANENT_S3_ERRORS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("Item error codes:", 1)[1].split("from S3", 1)[1].split("What fails a message", 1)[0]
    assert set(PERMANENT_S3_ERRORS.values()) <= set(re.findall(r"`([a-z_]+)`", section))
