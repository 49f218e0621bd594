"""Photos in the wild are broken in every way: each kind below ends up as exactly one manifest entry, the
documented ``ok`` result or typed ``error`` code, in ONE job message that also holds good photos (which must
come out unaffected). Every file is generated here. Runs the real poller against moto's server mode.

Expected outcomes (``worker.images`` module docstring, ``worker.pipeline.PERMANENT_S3_ERRORS``):

=====================================  ==========================================================
kind                                   outcome
=====================================  ==========================================================
empty object                           error ``empty``
plain text, HTML, SVG, PDF             error ``not_an_image``
ICO (a real image, not accepted)       error ``unsupported_format``
truncated JPEG, truncated PNG          error ``truncated``
PNG with a broken CRC                  error ``corrupt``
PNG declaring 30000x30000 (bomb)       error ``too_many_pixels``
object over ``DecodeLimits.max_bytes``  error ``too_many_bytes``
key that does not exist                error ``not_found``
GetObject denied by a bucket policy    error ``access_denied`` (moto enforces Deny statements)
animated GIF                           ok, first frame
CMYK JPEG, 16-bit RGB PNG              ok, classified by colour
16-bit grey PNG, 8-bit grey JPEG       ok
palette PNG with transparency          ok (transparent pixels are white)
EXIF orientation 6 JPEG                ok, decoded upright
keys with spaces, '+', '%', unicode    ok, in a job (plain key) and via a real S3 event (URL-encoded)
=====================================  ==========================================================
"""

from __future__ import annotations

import io
import json
import struct
import zlib

import boto3
import numpy as np
import pytest
from PIL import Image

from infra.local_stack import create_stack
from tests.conftest import COLOUR_BREEDS, colour_photo

pytestmark = pytest.mark.integration

BUCKET = "wild"
MAX_BYTES = 200_000  # the pipeline's byte limit in this suite
RED, GREEN, BLUE = (COLOUR_BREEDS[f] for f in ("n02085620-Chihuahua", "n02111889-Samoyed", "n02088364-beagle"))
BREED_OF = {RED: "Chihuahua", GREEN: "Samoyed", BLUE: "beagle"}
DENIED_KEY = "batch/private photo.jpg"
EVENT_KEY = "incoming/Sam oyed+1 100%2B ünïcødé 🐕.jpg"  # spaces, '+', a literal '%2B', unicode


# --------------------------------------------------------------------------- file generators
def _png_chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def _noise(rgb, size=(64, 48), seed=0, sd=20.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.array(rgb)[None, None, :] + rng.normal(0, sd, (size[1], size[0], 3)), 0, 255).astype(np.uint8)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kw)
    return buffer.getvalue()


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A real 1-bit greyscale PNG of width x height zero pixels: ~110 KB that inflates to ~112 MB of rows."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    chunk_rows = 2000
    parts = [compressor.compress(row * chunk_rows) for _ in range(height // chunk_rows)]
    parts.append(compressor.compress(row * (height % chunk_rows)))
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts))
            + _png_chunk(b"IEND", b""))


def png_16bit_rgb(rgb, size=(48, 40), seed=3) -> bytes:
    """A hand-made 16 bits per channel RGB PNG (colour type 2, bit depth 16)."""
    pixels = _noise(rgb, size, seed).astype(">u2") * 257
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(size[1]))
    ihdr = struct.pack(">IIBBBBB", size[0], size[1], 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw))
            + _png_chunk(b"IEND", b""))


def png_broken_crc() -> bytes:
    data = bytearray(_encode(Image.fromarray(_noise(GREEN)), "PNG"))
    idat = data.index(b"IDAT")
    length = int.from_bytes(data[idat - 4:idat], "big")
    data[idat + 4 + length] ^= 0xFF  # first byte of the IDAT CRC: the pixel data itself is intact
    return bytes(data)


def animated_gif() -> bytes:
    first = Image.fromarray(_noise(RED, seed=1, sd=5)).convert("P", palette=Image.Palette.ADAPTIVE)
    second = Image.fromarray(_noise(BLUE, seed=2, sd=5)).convert("P", palette=Image.Palette.ADAPTIVE)
    third = Image.fromarray(_noise(GREEN, seed=3, sd=5)).convert("P", palette=Image.Palette.ADAPTIVE)
    return _encode(first, "GIF", save_all=True, append_images=[second, third], duration=100, loop=0)


def palette_with_transparency() -> bytes:
    """A palette PNG: red photo with a transparent 8-pixel border (tRNS index 0)."""
    img = Image.new("P", (64, 48), 0)
    img.putpalette([0, 0, 0] + [RED[0], RED[1], RED[2]] * 255)
    pixels = np.zeros((48, 64), np.uint8)
    pixels[8:-8, 8:-8] = 1
    img.putdata(pixels.flatten().tolist())
    return _encode(img, "PNG", transparency=0)


def exif_rotated_jpeg() -> bytes:
    """Stored 96x48: left half red, right half blue; EXIF orientation 6 (rotate 90 degrees clockwise to
    display). Upright, it is 48x96 with the red half on TOP."""
    stored = np.zeros((48, 96, 3), np.uint8)
    stored[:, :48] = (230, 20, 20)
    stored[:, 48:] = (20, 20, 230)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())


def bad_inputs() -> dict[str, tuple[bytes | None, tuple[str, str]]]:
    """key -> (object bytes, or None for "do not upload"; expected ("ok", breed-or-None) or ("error", code))."""
    good_jpeg = colour_photo(GREEN, seed=7)
    grey = _noise((128, 128, 128), seed=4)
    return {
        "batch/empty.jpg": (b"", ("error", "empty")),
        "batch/notes.txt": (b"dear diary,\nno dog photos today.\n" * 20, ("error", "not_an_image")),
        "batch/page.html": (b"<!DOCTYPE html><html><body><img src='dog.jpg'></body></html>",
                            ("error", "not_an_image")),
        "batch/vector.svg": (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="9" height="9">'
                             b'<rect width="9" height="9" fill="red"/></svg>', ("error", "not_an_image")),
        "batch/scan.pdf": (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<</Type/Catalog>>endobj\ntrailer<<>>\n%%EOF\n",
                           ("error", "not_an_image")),
        "batch/favicon.ico": (_encode(Image.fromarray(_noise(RED, (32, 32))), "ICO"), ("error", "unsupported_format")),
        "batch/truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], ("error", "truncated")),
        "batch/truncated.png": (_encode(Image.fromarray(_noise(RED)), "PNG")[:-200], ("error", "truncated")),
        "batch/bad-crc.png": (png_broken_crc(), ("error", "corrupt")),
        "batch/bomb.png": (png_bomb(), ("error", "too_many_pixels")),
        "batch/huge.png": (_encode(Image.fromarray(np.random.default_rng(5).integers(0, 256, (300, 300, 3),
                                                                                     dtype=np.uint8)), "PNG"),
                           ("error", "too_many_bytes")),
        "batch/never-uploaded.jpg": (None, ("error", "not_found")),
        DENIED_KEY: (colour_photo(RED, seed=8), ("error", "access_denied")),
        "batch/animated.gif": (animated_gif(), ("ok", "Chihuahua")),  # first frame red, then blue, green
        "batch/cmyk.jpg": (_encode(Image.fromarray(_noise(GREEN, seed=6)).convert("CMYK"), "JPEG"), ("ok", "Samoyed")),
        "batch/deep-colour.png": (png_16bit_rgb(BLUE), ("ok", "beagle")),
        "batch/deep-grey.png": (_encode(Image.fromarray(grey[..., 0].astype(np.uint16) * 257), "PNG"), ("ok", None)),
        "batch/grey.jpg": (_encode(Image.fromarray(grey[..., 0]), "JPEG"), ("ok", None)),
        "batch/palette-transparent.png": (palette_with_transparency(), ("ok", "Chihuahua")),
        "batch/rotated.jpg": (exif_rotated_jpeg(), ("ok", None)),
        "batch/100% dog+cat é 🐶.jpg": (colour_photo(BLUE, seed=9), ("ok", "beagle")),  # a plain key in a job
        # the rest of the batch: good photos in every accepted container
        "batch/good-red.jpg": (colour_photo(RED, seed=10), ("ok", "Chihuahua")),
        "batch/good-green.png": (colour_photo(GREEN, seed=11, fmt="PNG"), ("ok", "Samoyed")),
        "batch/good-blue.webp": (colour_photo(BLUE, seed=12, fmt="WEBP"), ("ok", "beagle")),
        "batch/good-red.bmp": (colour_photo(RED, seed=13, fmt="BMP"), ("ok", "Chihuahua")),
        "batch/good-green.tiff": (colour_photo(GREEN, seed=14, fmt="TIFF"), ("ok", "Samoyed")),
    }


def test_the_generated_files_are_what_they_claim_to_be():
    """Guards the generators themselves, so the suite keeps testing the kinds it names."""
    files = {k: v[0] for k, v in bad_inputs().items()}
    bomb = files["batch/bomb.png"]
    assert struct.unpack(">II", bomb[16:24]) == (30000, 30000) and len(bomb) < 150_000
    inflater, inflated, idat = zlib.decompressobj(), 0, bomb[41:-16]  # a real bomb: the rows are all there
    while idat:
        inflated += len(inflater.decompress(idat, 1 << 24))
        idat = inflater.unconsumed_tail
    assert inflated == 30000 * (1 + 30000 // 8) and inflater.eof
    assert len(files["batch/huge.png"]) > MAX_BYTES
    assert all(len(v) < MAX_BYTES for k, v in files.items() if v is not None and k != "batch/huge.png")
    with Image.open(io.BytesIO(files["batch/animated.gif"])) as gif:
        assert gif.n_frames == 3
    assert Image.open(io.BytesIO(files["batch/cmyk.jpg"])).mode == "CMYK"
    assert Image.open(io.BytesIO(files["batch/deep-grey.png"])).mode.startswith("I")
    assert files["batch/deep-colour.png"][24:26] == b"\x10\x02"  # IHDR: bit depth 16, colour type RGB
    palette = Image.open(io.BytesIO(files["batch/palette-transparent.png"]))
    assert palette.mode == "P" and palette.info.get("transparency") == 0
    assert Image.open(io.BytesIO(files["batch/rotated.jpg"])).getexif()[0x0112] == 6
    assert Image.open(io.BytesIO(files["batch/favicon.ico"])).format == "ICO"
    assert Image.open(io.BytesIO(files["batch/grey.jpg"])).mode == "L"
    crc_png = files["batch/bad-crc.png"]
    assert Image.open(io.BytesIO(crc_png)).convert("RGB").size == (64, 48)  # Pillow alone would accept it


# --------------------------------------------------------------------------- the suite
@pytest.fixture
def wild_stack(moto_server):
    """A bucket whose incoming/ notifies a queue (DLQ after 2 receives); a bucket policy denies GetObject on
    DENIED_KEY."""
    s3, sqs = boto3.client("s3"), boto3.client("sqs")
    created = create_stack(s3, sqs, bucket=BUCKET, queue="wild", max_receive_count=2, suffixes=None)
    s3.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Deny", "Principal": "*", "Action": "s3:GetObject",
        "Resource": f"arn:aws:s3:::{BUCKET}/{DENIED_KEY}"}]}))
    return {"s3": s3, "sqs": sqs, "queue": created.queue_url, "dlq": created.dlq_url}


def _pipeline(artifact_path, s3):
    from worker.classifier import Classifier
    from worker.images import DecodeLimits
    from worker.pipeline import Pipeline, PipelineSettings

    settings = PipelineSettings(batch_size=4, download_threads=4, limits=DecodeLimits(max_bytes=MAX_BYTES))
    return Pipeline(Classifier.load(str(artifact_path)), s3, settings)


def _manifests(s3) -> dict[str, dict]:
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="manifests/").get("Contents", [])
    return {o["Key"]: json.loads(s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()) for o in listed}


def test_every_kind_of_bad_input_gets_its_documented_outcome_and_the_batch_is_unaffected(wild_stack,
                                                                                           colour_artifact):
    from worker.jobs import OutputSettings
    from worker.poller import Poller, PollerSettings

    s3, sqs = wild_stack["s3"], wild_stack["sqs"]
    cases = bad_inputs()
    for key, (body, _) in cases.items():
        if body is not None:
            s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    s3.put_object(Bucket=BUCKET, Key=EVENT_KEY, Body=colour_photo(GREEN, seed=15))  # -> an S3 event message
    keys = list(cases)
    sqs.send_message(QueueUrl=wild_stack["queue"],
                     MessageBody=json.dumps({"job_id": "wild-batch", "bucket": BUCKET, "keys": keys}))

    pipeline = _pipeline(colour_artifact, s3)
    try:
        summary = Poller(sqs, pipeline, OutputSettings(prefix="manifests"),
                         PollerSettings(wild_stack["queue"], wait_seconds=1, retry_delay=0, until_empty=True)).run()
    finally:
        pipeline.close()

    assert summary.failed == 0, "no message may fail because of a bad photo"
    docs = _manifests(s3)
    job = docs.pop("manifests/wild-batch.json")
    found: dict[str, list[dict]] = {}
    for item in job["items"]:
        found.setdefault(item["key"], []).append(item)
    assert sorted(found) == sorted(keys), "exactly the job's keys, no more, no fewer"
    problems = []
    for key, (_, (status, expected)) in cases.items():
        (item,) = found[key]  # exactly one entry per photo
        if item["status"] != status:
            problems.append(f"{key}: {item['status']} {item.get('error_code')} (wanted {status} {expected})")
        elif status == "error" and (item["error_code"] != expected or not item["error_message"]):
            problems.append(f"{key}: error {item['error_code']} (wanted {expected})")
        elif status == "ok" and (expected is not None and item["breed"] != expected or not item["top_k"]
                                 or item["breed"] not in BREED_OF.values()):
            problems.append(f"{key}: ok {item['breed']} (wanted {expected})")
    assert not problems, "\n".join(problems)
    n_ok = sum(1 for _, (status, _) in cases.values() if status == "ok")
    assert job["counts"] == {"ok": n_ok, "error": len(cases) - n_ok, "no_dog": 0, "uncertain": 0}

    # the S3 event for the URL-encoded key: one more manifest, the key decoded exactly once
    assert len(docs) == 1, sorted(docs)
    (event_doc,) = docs.values()
    assert event_doc["source"] == "s3-event"
    assert [(i["key"], i["status"], i["breed"]) for i in event_doc["items"]] == [(EVENT_KEY, "ok", "Samoyed")]

    # nothing left behind: every message deleted, none dead-lettered
    attrs = sqs.get_queue_attributes(QueueUrl=wild_stack["queue"], AttributeNames=["All"])["Attributes"]
    assert attrs["ApproximateNumberOfMessages"] == "0" and attrs["ApproximateNumberOfMessagesNotVisible"] == "0"
    assert not sqs.receive_message(QueueUrl=wild_stack["dlq"], WaitTimeSeconds=0).get("Messages")


def test_exif_rotation_and_transparency_through_the_fetch_path(wild_stack, colour_artifact):
    """The decoded pixels the model sees (the pipeline's own S3 fetch + decode, at the model's input size):
    the EXIF-rotated photo is upright and transparent palette pixels are white."""
    from worker.classifier import Classifier
    from worker.images import DecodeLimits
    from worker.messages import ImageRef
    from worker.pipeline import S3Reader, fetch_and_decode

    s3 = wild_stack["s3"]
    files = bad_inputs()
    size = Classifier.load(str(colour_artifact)).input_size
    for key in ("batch/rotated.jpg", "batch/palette-transparent.png"):
        s3.put_object(Bucket=BUCKET, Key=key, Body=files[key][0])

    def pixels(key):
        fetched = fetch_and_decode(S3Reader(s3), ImageRef(BUCKET, key), size, DecodeLimits(max_bytes=MAX_BYTES))
        assert fetched.error is None and fetched.etag, fetched.error
        return fetched.pixels.astype(int)

    rotated = pixels("batch/rotated.jpg")
    h, w = rotated.shape[:2]
    top, bottom = rotated[2:h // 2 - 2].mean(axis=(0, 1)), rotated[h // 2 + 2:-2].mean(axis=(0, 1))
    left, right = rotated[:, 2:w // 2 - 2].mean(axis=(0, 1)), rotated[:, w // 2 + 2:-2].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 50, f"upright: red on top, got {top}"
    assert bottom[2] > 200 and bottom[0] < 50, f"upright: blue at the bottom, got {bottom}"
    assert abs(left - right).max() < 10, "not stored-orientation (left/right halves would differ)"

    palette = pixels("batch/palette-transparent.png")
    assert (palette[0, 0] == 255).all() and (palette[-1, -1] == 255).all(), "transparent border -> white"
    assert tuple(palette[palette.shape[0] // 2, palette.shape[1] // 2]) == RED
