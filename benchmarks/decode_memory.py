"""Decoding memory benchmark: worst-case photos through the real worker, and one photo at a time.

Photos that are small files but many pixels are what makes a decoder run out of memory. This
script generates such photos (64 megapixels each, the default ``max_pixels``; a few KB to a few MB
on disk) into a temporary folder, then measures:

1. **per photo**: the peak resident memory of ``worker.images.load_image(data)`` (224 x 224, crop)
   for one photo of each kind, in a fresh process per photo (the peak, ``VmHWM``, is reset through
   ``/proc/self/clear_refs`` just before the decode, and the resident size before is subtracted),
   with this checkout's decoder (``after``) and with the decoder of git revision ``--before``
   (``before``: the one with the numpy alpha blend; run under an address-space limit of
   ``--before-cap-gb`` so that it cannot take the machine down; ``> cap`` when it hit it).
2. **end to end**: the peak RSS of the real worker (``python -m worker.cli run``, i.e.
   ``dogbreeds-worker run --until-empty``, default settings: 8 download threads, batch 16,
   the default decode budget) classifying one job message of ``--photos`` photos from moto's
   S3/SQS server, with an OpenVINO int8 model; the worker's own peak comes from ``os.wait4`` (its
   ``ru_maxrss``), so it includes the model, the runtime and every decode. Batches
   (``--batches``): ``samples`` (ordinary photos: what the model and runtime take alone),
   ``mixed`` (the worst-case kinds in turn), ``noisy-progressive-jpeg`` (16 downloads of ~45 MiB
   each: the bytes held while photos wait for the budget). ``--budgets`` runs each batch again
   with other ``DOGBREEDS_DECODE_BUDGET_PIXELS`` values (``1e12``: no budget).

The model is ``--model`` (any artifact with an ``openvino-int8`` runtime), else one built once under
``--work``: the VGG16 transfer architecture the trainer publishes (VGG preprocessing, VGG16 conv
blocks, GeM pooling, dense head, 120 breeds) with random weights, converted and quantised exactly as
``dogbreeds-train publish`` does (OpenVINO int8 + the bf16 variant of its cascade). Its weights do
not matter for memory; its shapes do. It is served with ``--runtime openvino-int8`` (its agreement
with fp32 is meaningless with random weights, so ``auto`` would not pick it).

Prints a table; ``--json`` prints one JSON object ``{"photos": [...], "end_to_end": [...]}``.
Peak RSS does not depend on the machine's load; the seconds printed beside it do.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import local_server, log, new_stack  # noqa: E402

SIDE = 8000  # 8000 x 8000 = 64,000,000 pixels: exactly the default DecodeLimits.max_pixels
BEFORE_REVISION = "32b2570"  # the last commit with the numpy alpha blend (worker/images.py)
MODEL_INPUT = 224
BREEDS = 120


# --------------------------------------------------------------------------- worst-case photos


@dataclass(frozen=True)
class Kind:
    name: str
    suffix: str
    what: str


KINDS = [
    Kind("rgba-png", ".png", "RGBA PNG, alpha gradient (composited over white)"),
    Kind("progressive-jpeg", ".jpg", "progressive JPEG, 4:4:4 (libjpeg keeps every coefficient)"),
    Kind("cmyk-tiff", ".tif", "CMYK TIFF, deflate"),
    Kind("grey16-png", ".png", "16-bit greyscale PNG (I;16)"),
    Kind("animated-gif", ".gif", "animated GIF, 3 frames, transparent index (first frame used)"),
    Kind("palette-trns-png", ".png", "palette PNG with a transparent index"),
    Kind("la-png", ".png", "greyscale + alpha PNG"),
    Kind("rotated-rgba-png", ".png", "RGBA PNG with EXIF orientation 6 (rotated while converting)"),
    Kind("noisy-progressive-jpeg", ".jpg", "progressive JPEG of noise, ~40 MiB: a large download waiting for its turn"),
]
MIXED = "mixed"  # a batch of every kind in turn
SAMPLES = "samples"  # a batch of ordinary photos (samples/photos): the model's own share of the peak
NOISE = 0.2  # share of noise in noisy-progressive-jpeg: ~40 MiB at 64 MP, quality 90


def _grey(side: int = SIDE):
    """A smooth grey ramp with coarse steps (compresses to a small file, but is not flat)."""
    from PIL import Image

    ramp = Image.linear_gradient("L").point(lambda v: v // 32 * 36)
    return ramp.resize((side, side), Image.Resampling.NEAREST)


def make_photo(kind: str, path: Path, side: int = SIDE) -> None:
    from PIL import Image

    grey = _grey(side)
    if kind == "grey16-png":
        Image.fromarray(_ramp16(side)).save(path, "PNG", compress_level=1)
        return
    if kind == "animated-gif":
        frames = [grey.convert("P")] + [grey.transpose(t).convert("P")
                                        for t in (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180)]
        frames[0].save(path, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0, transparency=0)
        return
    if kind == "palette-trns-png":
        grey.convert("P").save(path, "PNG", transparency=0, compress_level=1)
        return
    if kind == "la-png":
        Image.merge("LA", (grey, grey.transpose(Image.Transpose.ROTATE_90))).save(path, "PNG", compress_level=1)
        return
    if kind == "noisy-progressive-jpeg":
        _noisy(grey).save(path, "JPEG", quality=90, progressive=True, subsampling=0)
        return
    rgb = Image.merge("RGB", (grey, grey.transpose(Image.Transpose.ROTATE_90),
                              grey.transpose(Image.Transpose.FLIP_TOP_BOTTOM)))
    del grey
    if kind == "progressive-jpeg":
        rgb.save(path, "JPEG", quality=90, progressive=True, subsampling=0)
    elif kind == "cmyk-tiff":
        rgb.convert("CMYK").save(path, "TIFF", compression="tiff_adobe_deflate")
    elif kind in ("rgba-png", "rotated-rgba-png"):
        rgba = rgb.convert("RGBA")
        rgba.putalpha(_grey(side).transpose(Image.Transpose.ROTATE_270))
        options = {}
        if kind == "rotated-rgba-png":
            exif = Image.Exif()
            exif[0x0112] = 6
            options["exif"] = exif.tobytes()
        rgba.save(path, "PNG", compress_level=1, **options)
    else:
        raise ValueError(kind)


def _noisy(grey):
    """The ramp plus strong noise per channel: a JPEG that stays large (just under 50 MiB at 64 MP)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    channels = []
    for _ in range(3):
        noise = Image.fromarray(rng.integers(0, 256, (grey.height, grey.width), dtype=np.uint8))
        channels.append(Image.blend(grey, noise, NOISE))
    return Image.merge("RGB", channels)


def _ramp16(side: int):
    import numpy as np

    row = (np.arange(side, dtype=np.uint32) * 65535 // max(1, side - 1) // 4096 * 4096).astype(np.uint16)
    return np.broadcast_to(row, (side, side)).copy()


def make_photos(folder: Path, side: int = SIDE) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind in KINDS:
        path = folder / f"{kind.name}-{side}{kind.suffix}"
        if not path.is_file():
            started = time.perf_counter()
            make_photo(kind.name, path, side)
            log(f"  made {path.name}: {path.stat().st_size / 2**20:.1f} MiB in {time.perf_counter() - started:.0f} s")
        paths[kind.name] = path
    return paths


# --------------------------------------------------------------------------- one photo, one process


def _status_kib(key: str) -> int:
    return int(re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def child_decode(path: str, implementation: str, cap_gb: float) -> None:
    """In a fresh process: the peak resident memory of one load_image call."""
    import importlib.util

    import numpy as np
    from PIL import Image

    if implementation == "after":
        from worker import images
    else:
        spec = importlib.util.spec_from_file_location("images_before", implementation)
        images = importlib.util.module_from_spec(spec)
        sys.modules["images_before"] = images
        spec.loader.exec_module(images)
    data = Path(path).read_bytes()
    warm = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(warm, "PNG")
    images.load_image(warm.getvalue())  # plugins and code paths loaded before measuring
    if cap_gb:
        cap = int(cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    started = time.perf_counter()
    result = {"status": "ok"}
    try:
        images.load_image(data, size=(MODEL_INPUT, MODEL_INPUT))
    except MemoryError:
        result["status"] = "MemoryError"
    except images.ImageDecodeError as error:  # the old decoder turned MemoryError into "corrupt"
        result["status"] = f"ImageDecodeError {error.code}: {error.message[:80]}"
    result.update(seconds=round(time.perf_counter() - started, 2),
                  peak_mib=round((_status_kib("VmHWM") - before) / 1024, 1))
    print("BENCH-RESULT " + json.dumps(result), flush=True)


def _result(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith("BENCH-RESULT "):
            return json.loads(line[len("BENCH-RESULT "):])
    raise RuntimeError(f"the child printed no result:\n{stdout[-2000:]}")


def decode_peak(path: Path, implementation: str, cap_gb: float = 0) -> dict:
    process = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_decode", str(path), implementation,
                              str(cap_gb)], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if process.returncode != 0:
        raise RuntimeError(f"decode child failed ({process.returncode}):\n{process.stderr[-3000:]}")
    return _result(process.stdout)


def before_module(revision: str, folder: Path) -> Path | None:
    """worker/images.py at ``revision`` (None when git or the revision is not there)."""
    try:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:worker/images.py"], capture_output=True,
                                text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = folder / f"images_{revision}.py"
    path.write_text(source)
    return path


# --------------------------------------------------------------------------- the model


def child_build_model(dest: str) -> None:
    """The VGG16 transfer architecture with random weights, published with OpenVINO int8 + bf16."""
    import keras
    import numpy as np

    from trainer import artifact_writer, fast_runtimes
    from trainer.pooling import global_pooling
    from trainer.preprocessing import build_preprocessing

    keras.utils.set_random_seed(0)
    backbone = keras.applications.VGG16(include_top=False, weights=None, input_shape=(MODEL_INPUT, MODEL_INPUT, 3))
    model = keras.Sequential([
        keras.Input((MODEL_INPUT, MODEL_INPUT, 3)),
        build_preprocessing("vgg", "vgg16"),
        backbone,
        global_pooling("gem"),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dense(BREEDS, activation="softmax"),
    ])
    rng = np.random.default_rng(0)
    calibration = rng.integers(0, 256, (24, MODEL_INPUT, MODEL_INPUT, 3), dtype=np.uint8)
    heldout = rng.integers(0, 256, (8, MODEL_INPUT, MODEL_INPUT, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory(prefix="decode-memory-model-") as tmp:
        saved = Path(tmp) / "saved"
        artifact_writer.export_saved_model(model, saved)
        files, entries = fast_runtimes.build_openvino_variants(saved, Path(tmp) / "variants", calibration=calibration,
                                                               heldout=heldout)
        labels = [artifact_writer.label_from_folder(i, f"n{i:08d}-breed_{i}") for i in range(BREEDS)]
        artifact_writer.write_artifact(
            Path(dest), model_dir=saved, labels=labels, extra_files=files,
            manifest_fields={"name": "vgg16-shaped", "version": "v1", "backbone": "vgg16",
                             "input_size": [MODEL_INPUT, MODEL_INPUT], "weights": {"kind": "random", "imagenet": False},
                             "runtimes": {"tf": {"path": "model", "precision": "fp32"}, **entries}},
            model_card="# vgg16-shaped\nThe VGG16 transfer architecture with random weights: for memory benchmarks.\n")


def default_model(work: Path) -> str:
    dest = work / "model-vgg16-shaped"
    if (dest / "manifest.json").is_file():
        log(f"using the model built by an earlier run: {dest}")
        return str(dest)
    log("building the VGG16-shaped int8 model (once; a few minutes)")
    process = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_build-model", str(dest)], cwd=ROOT,
                             stdout=sys.stderr, stderr=sys.stderr, timeout=3600)
    if process.returncode != 0:
        raise RuntimeError("building the model failed")
    return str(dest)


# --------------------------------------------------------------------------- end to end


def end_to_end(server, model: str, paths: list[Path], run_id: str, budget: int | None, runtime: str) -> dict:
    s3, sqs, stack = new_stack(f"decode-{run_id}")
    keys = []
    for i, path in enumerate(paths):
        key = f"photos/{i:02d}-{path.name}"  # outside incoming/: no S3 notifications, one job message
        s3.upload_file(str(path), stack.bucket, key)
        keys.append(key)
    job_id = f"worst-{len(keys)}"
    sqs.send_message(QueueUrl=stack.queue_url, MessageBody=json.dumps({"job_id": job_id, "bucket": stack.bucket,
                                                                       "keys": keys}))
    env = {**os.environ, **server.environment(), "PYTHONPATH": str(ROOT)}
    env.pop("DOGBREEDS_DECODE_BUDGET_PIXELS", None)
    if budget is not None:
        env["DOGBREEDS_DECODE_BUDGET_PIXELS"] = str(budget)
    command = [sys.executable, "-m", "worker.cli", "run", "--model", model, "--queue-url", stack.queue_url,
               "--until-empty", "--wait-seconds", "1", "--runtime", runtime]
    with tempfile.TemporaryFile() as logs:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=logs, stderr=logs)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage: its peak RSS
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        if process.returncode != 0:
            logs.seek(0)
            raise RuntimeError(f"the worker failed ({process.returncode}):\n{logs.read().decode()[-4000:]}")
    manifest = json.loads(s3.get_object(Bucket=stack.bucket, Key=f"manifests/{job_id}.json")["Body"].read())
    statuses = {}
    for item in manifest["items"]:
        statuses[item["status"] if item["status"] == "ok" else item["error_code"]] = \
            statuses.get(item["status"] if item["status"] == "ok" else item["error_code"], 0) + 1
    return {"photos": len(keys), "decode_budget_pixels": budget, "runtime": manifest["model"]["runtime"],
            "peak_rss_mib": round(usage.ru_maxrss / 1024), "seconds": round(seconds, 1), "items": statuses}


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(ROOT / ".cache" / "decode_memory"),
                        help="Folder for the model built once (not for the photos).")
    parser.add_argument("--model", help="Artifact with an openvino-int8 runtime (default: build a VGG16-shaped one).")
    parser.add_argument("--runtime", default="openvino-int8", help="Runtime the worker serves (--runtime).")
    parser.add_argument("--photos", type=int, default=16, help="Worst-case photos in the worker's job message.")
    parser.add_argument("--batches", default=f"{SAMPLES},{MIXED},noisy-progressive-jpeg",
                        help=f"Comma-separated batches to run end to end: '{SAMPLES}' (ordinary photos of "
                             f"samples/photos: the model's share), '{MIXED}' (every kind in turn) or one kind "
                             "(--photos photos of it).")
    parser.add_argument("--budgets", default="default",
                        help="Comma-separated DOGBREEDS_DECODE_BUDGET_PIXELS values for the end-to-end runs "
                             "('default': the variable unset).")
    parser.add_argument("--before", default=BEFORE_REVISION,
                        help="Git revision whose worker/images.py is the 'before' decoder ('' to skip).")
    parser.add_argument("--before-cap-gb", type=float, default=8.0,
                        help="Address-space limit of each 'before' decode process (it can need several GB).")
    parser.add_argument("--side", type=int, default=SIDE, help="Photo width and height in pixels.")
    parser.add_argument("--no-e2e", action="store_true", help="Only the per-photo measurements.")
    parser.add_argument("--no-per-photo", action="store_true", help="Only the end-to-end measurements.")
    parser.add_argument("--photos-dir", help="Keep the generated photos in this folder (and reuse them on later "
                                             "runs) instead of a temporary one.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of tables.")
    if len(sys.argv) > 1 and sys.argv[1] == "--_decode":
        return child_decode(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    if len(sys.argv) > 1 and sys.argv[1] == "--_build-model":
        return child_build_model(sys.argv[2])
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="decode-memory-") as tmp:
        folder = Path(args.photos_dir or tmp)
        log(f"worst-case photos ({args.side} x {args.side}) in {folder}")
        photos = make_photos(folder, args.side)
        before = before_module(args.before, Path(tmp)) if args.before else None
        if args.before and before is None:
            log(f"git revision {args.before} not found: no 'before' column")
        rows = []
        for kind in [] if args.no_per_photo else KINDS:
            path = photos[kind.name]
            row = {"kind": kind.name, "what": kind.what, "bytes": path.stat().st_size,
                   "pixels": args.side * args.side, "after": decode_peak(path, "after")}
            if before is not None:
                row["before"] = decode_peak(path, str(before), args.before_cap_gb)
                row["before_cap_gb"] = args.before_cap_gb
            log(f"  {kind.name}: after {row['after']}  before {row.get('before')}")
            rows.append(row)

        e2e = []
        if not args.no_e2e:
            model = args.model or default_model(work)
            with local_server() as server:
                for batch_name in args.batches.split(","):
                    if batch_name == SAMPLES:
                        batch = sorted((ROOT / "samples" / "photos").rglob("*.jpg"))[:args.photos]
                    else:
                        kinds = [k.name for k in KINDS] if batch_name == MIXED else [batch_name]
                        batch = [photos[kinds[i % len(kinds)]] for i in range(args.photos)]
                    for value in args.budgets.split(","):
                        budget = None if value.strip() == "default" else int(float(value))
                        log(f"end to end: {len(batch)} photos ({batch_name}), decode budget {budget or 'default'}")
                        run = end_to_end(server, model, batch, f"run{len(e2e)}", budget, args.runtime)
                        e2e.append({"batch": batch_name, "model": model, **run})
                        log(f"  {e2e[-1]}")

    result = {"photos": rows, "end_to_end": e2e, "cpus": os.cpu_count(),
              "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3])}
    (work / "decode_memory.json").write_text(json.dumps(result, indent=1) + "\n")  # also after a table run
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_tables(result)


def print_tables(result: dict) -> None:
    def peak(measured: dict | None, cap=None) -> str:
        if measured is None:
            return "-"
        if measured["status"] == "ok":
            return f"{measured['peak_mib']:.0f}"
        if measured["status"] == "MemoryError":
            return f"> {cap:g} GB cap"
        return "lost: " + measured["status"].split(":")[0].replace("ImageDecodeError ", "")

    print(f"\nOne photo, load_image to 224 x 224: peak RSS of the decode (MiB), {result['cpus']} CPUs, "
          f"load {result['loadavg']}")
    print(f"{'photo':<23} {'pixels':>10} {'file MiB':>8} {'before':>16} {'after':>8} {'before s':>8} {'after s':>7}")
    for r in result["photos"]:
        before = r.get("before")
        print(f"{r['kind']:<23} {r['pixels']:>10,} {r['bytes'] / 2**20:>8.2f} "
              f"{peak(before, r.get('before_cap_gb')):>16} {peak(r['after']):>8} "
              f"{(before or {}).get('seconds', '-'):>8} {r['after']['seconds']:>7}")
    if result["end_to_end"]:
        print("\nThe worker end to end (python -m worker.cli run --until-empty, one job message, moto's S3/SQS):")
        print(f"{'batch':<23} {'photos':>6} {'runtime':<14} {'decode budget':>15} {'peak RSS MiB':>12} "
              f"{'seconds':>8}  items")
        for r in result["end_to_end"]:
            print(f"{r['batch']:<23} {r['photos']:>6} {r['runtime']:<14} "
                  f"{r['decode_budget_pixels'] or 'default (64 MP)'!s:>15} {r['peak_rss_mib']:>12} {r['seconds']:>8}  "
                  f"{r['items']}")


if __name__ == "__main__":
    main()
