"""Decoding without large temporaries, with the same pixels as before.

worker.images converts a photo to RGB strip by strip with Pillow (alpha over white with Pillow's
own blend, 16-bit through a lookup table) and converts only the part the fit keeps. These tests
check (1) the memory: a 4-megapixel RGBA PNG used to make ~180 MB of numpy temporaries; (2) that
the pixels are those of the previous implementation, written out below as a whole-image numpy
oracle (the rules of the module docstring), for every colour mode, EXIF orientation, strip size
and fit, and for the sample photos."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from worker import images
from worker.images import decode_image, load_image, resize_image

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "photos"


# --------------------------------------------------------------------------
# the oracle: the previous implementation's rules, whole image at once
# --------------------------------------------------------------------------
def oracle_decode(data: bytes, target_size=None) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    if target_size is not None and img.format in ("JPEG", "MPO"):
        tw, th = target_size
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            tw, th = th, tw
        img.draft("RGB", (tw, th))
    img.load()
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("F", "I") or mode.startswith("I;16"):
        arr = np.asarray(img)
        if mode == "F":
            values = arr.astype(np.float64)
            finite = values[np.isfinite(values)]
            scale = 255.0 if finite.size and float(finite.max()) <= 1.0 else 1.0
            values = np.nan_to_num(values * scale, nan=0.0, posinf=255.0, neginf=0.0)
            grey = np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8)
        else:
            grey = ((np.clip(arr.astype(np.int64), 0, 65535) + 128) // 257).astype(np.uint8)
        trns = img.info.get("transparency")
        if isinstance(trns, (int, float)) and not isinstance(trns, bool):
            grey = np.where(arr == trns, np.uint8(255), grey)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in ("LA", "PA", "RGBA", "La", "RGBa") or (
            img.info.get("transparency") is not None and mode in ("1", "L", "P", "RGB")):
        rgba = np.asarray(img.convert("RGBA"))
        rgb, alpha = rgba[..., :3].astype(np.uint32), rgba[..., 3:4].astype(np.uint32)
        return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kw)
    return buffer.getvalue()


def photo_in_mode(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width)).astype(np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-3000, 70000, (height, width)).astype(np.int32))
    if mode == "F":
        return Image.fromarray((rng.random((height, width)) * (1.0 if seed % 2 else 300.0)).astype(np.float32))
    rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    rgba[rng.random((height, width)) < 0.2, 3] = 0
    rgba[rng.random((height, width)) < 0.2, 3] = 255
    base = Image.fromarray(rgba)
    if mode == "PA":
        return base.convert("P").convert("PA")
    return base.convert(mode)


# (mode, format, save options): every conversion rule of worker.images
CASES = [
    ("RGB", "PNG", {}), ("RGBA", "PNG", {}), ("LA", "PNG", {}), ("L", "PNG", {}), ("1", "PNG", {}),
    ("P", "PNG", {}), ("P", "PNG", {"transparency": 5}), ("L", "PNG", {"transparency": 77}),
    ("RGB", "PNG", {"transparency": (10, 20, 30)}), ("I;16", "PNG", {}), ("I;16", "TIFF", {}),
    ("I", "TIFF", {}), ("F", "TIFF", {}), ("PA", "TIFF", {}), ("CMYK", "TIFF", {}), ("CMYK", "JPEG", {}),
    ("RGB", "JPEG", {"quality": 90}), ("RGB", "JPEG", {"progressive": True}), ("L", "JPEG", {}),
    ("RGBA", "WEBP", {"lossless": True}), ("P", "GIF", {"transparency": 3}), ("RGB", "BMP", {}),
    ("RGBA", "TIFF", {"compression": "tiff_adobe_deflate"}),
]


@st.composite
def photos(draw):
    mode, fmt, options = draw(st.sampled_from(CASES))
    width, height = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    img = photo_in_mode(mode, width, height, draw(st.integers(0, 3)))
    orientation = draw(st.sampled_from([1, 1, 2, 3, 4, 5, 6, 7, 8]))
    if orientation != 1 and fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        exif = Image.Exif()
        exif[0x0112] = orientation
        options = {**options, "exif": exif.tobytes()}
    return encode(img, fmt, **options)


@settings(max_examples=150, deadline=None)
@given(data=photos(), strip=st.sampled_from([1, 7, 64, 1000, images.STRIP_PIXELS]),
       size=st.tuples(st.integers(1, 40), st.integers(1, 40)), fit=st.sampled_from(images.FITS))
def test_same_pixels_as_the_whole_image_oracle(data, strip, size, fit):
    """Every mode, orientation and strip size (many strips of a row or less, down to one pixel):
    decode_image is the oracle's array, and load_image is that array resized with the fit."""
    with mock.patch.object(images, "STRIP_PIXELS", strip):
        np.testing.assert_array_equal(decode_image(data), oracle_decode(data))
        expected = resize_image(oracle_decode(data, target_size=size), size, fit)
        np.testing.assert_array_equal(load_image(data, size=size, fit=fit), expected)


def test_alpha_blend_is_the_documented_formula_for_every_pair():
    c, a = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    rgba = np.stack([c, 255 - c, c // 2, a], -1).astype(np.uint8)
    out = decode_image(encode(Image.fromarray(rgba), "PNG"))
    expected = (rgba[..., :3].astype(np.int64) * a[..., None] + 255 * (255 - a[..., None]) + 127) // 255
    np.testing.assert_array_equal(out, expected)


def test_16_bit_lookup_is_round_v_over_257_for_every_value():
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    out = decode_image(encode(Image.fromarray(values), "PNG"))
    expected = np.floor(values.astype(np.float64) / 257 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    assert (out[..., 0] == out[..., 2]).all()


def sample_photos() -> list[Path]:
    photos = sorted(SAMPLES.rglob("*.jpg"))
    if not photos:
        pytest.skip("no sample photos")
    return photos


@pytest.mark.parametrize("fit", images.FITS)
def test_sample_photos_unchanged(fit):
    """Real photos (the repository's samples, JPEG): the pixels the models were trained on."""
    for path in sample_photos()[::4]:
        data = path.read_bytes()
        expected = resize_image(oracle_decode(data, target_size=(224, 224)), (224, 224), fit)
        np.testing.assert_array_equal(load_image(data, fit=fit), expected, err_msg=str(path))


def test_sample_photo_as_png_with_alpha_unchanged():
    path = sample_photos()[0]
    rgb = Image.open(path).convert("RGB")
    alpha = Image.linear_gradient("L").resize(rgb.size)
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    data = encode(rgba, "PNG")
    np.testing.assert_array_equal(load_image(data), resize_image(oracle_decode(data)))


# --------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------
def rgba_png_4mp() -> bytes:
    """A ~20 KB 4-megapixel RGBA PNG (2000 x 2000, a few flat bands of colour and alpha)."""
    band = np.zeros((2000, 2000, 4), np.uint8)
    band[..., 0] = np.repeat(np.arange(2000) // 250 * 30, 2000).reshape(2000, 2000)
    band[..., 3] = np.tile(np.arange(2000) // 500 * 80, (2000, 1))
    return encode(Image.fromarray(band), "PNG")


def test_4mp_rgba_png_makes_no_large_numpy_temporaries():
    """The old alpha blend built full-size uint32 arrays (~180 MB traced for this photo)."""
    data = rgba_png_4mp()
    assert len(data) < 100_000
    tracemalloc.start()
    try:
        load_image(data)
        decode_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert decode_peak < 4 * 2**20, f"{decode_peak / 2**20:.1f} MiB traced"


PEAK_RSS_CHILD = r"""
import io, json, re, resource, sys
import numpy as np
from PIL import Image
from worker.images import load_image

def status(key):
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1))

data = open(sys.argv[1], "rb").read()
warm = io.BytesIO()
Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(warm, "PNG")
load_image(warm.getvalue())  # Pillow's plugins and numpy's code paths loaded before measuring
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    before = status("VmRSS")
    load_image(data)
    peak = status("VmHWM") - before
except OSError:  # no clear_refs: the lifetime peak, which may include a transient before the decode
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    load_image(data)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"peak_kib": peak}))
"""


def test_4mp_rgba_png_peak_rss(tmp_path):
    """All memory of the decode, Pillow's included, in a fresh process: the RGBA image Pillow
    decodes (16 MB), the RGB copy the blend writes (16 MB) and a few strips: measured 34 MiB
    (the previous implementation: 229-234 MiB)."""
    path = tmp_path / "rgba.png"
    path.write_bytes(rgba_png_4mp())
    out = subprocess.run([sys.executable, "-c", PEAK_RSS_CHILD, str(path)], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    peak_mib = json.loads(out.stdout)["peak_kib"] / 1024
    assert peak_mib < 64, f"peak RSS grew by {peak_mib:.0f} MiB decoding a 4 MP RGBA PNG"
