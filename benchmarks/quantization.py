"""Quantisation benchmark: which parts of a model int8 may touch, measured on real test photos.

For one published artifact (``--model``; by default the one benchmarks/throughput.py trains and
publishes under ``--work``), re-runs publish's int8 quantisation
(:func:`trainer.fast_runtimes.quantize_int8`: NNCF post-training, calibrated on the artifact's
own training photos) once per ``--keep-float`` setting, and reports for each:

- top-1 agreement of the plain int8 model with the fp32 SavedModel (TensorFlow) on the real
  test photos (the same photos as benchmarks/throughput.py: held-out sample photos plus the
  official test photos of the model's breeds from ../shared/data/stanford-dogs-subset), and
  both top-1 accuracies;
- the int8 -> bf16 cascade the worker serves (``worker.runtimes.with_fallback``, threshold from
  :func:`trainer.fast_runtimes.fallback_margin` on the calibration photos): its agreement and
  the share of photos it runs twice;
- images/s of the plain int8 model at batch 16 (the worker's loader, all cores) and how long
  quantisation took.

``--keep-float`` values: ``none`` (NNCF's defaults: every op it can quantise, the GeM pooling
included), ``head`` (what publish does: every op after the last convolution stays float),
``head,first_conv``. Prints a table; ``--json`` prints one JSON list of rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    DEFAULT_MODEL_NAME,
    Column,
    decode,
    default_model,
    loadavg,
    log,
    print_table,
    test_photos,
)
from trainer import fast_runtimes  # noqa: E402

BATCH = 16


def _timed(predict, x: np.ndarray) -> tuple[np.ndarray, float]:
    predict(x[:BATCH].astype(np.float32))  # warm-up (first-call allocations)
    started = time.perf_counter()
    probs = fast_runtimes.predict_all(predict, x, BATCH)
    return probs, len(x) / (time.perf_counter() - started)


def calibration_photos(path: Path, manifest, size, fit) -> np.ndarray:
    """The artifact's own training photos (split.json ``train`` under the run's data folder)."""
    data = Path((manifest.training or {}).get("data", ""))
    split = json.loads((path / "split.json").read_text())
    photos = [data / relative for relative in split.get("train", [])]
    missing = [p for p in photos if not p.is_file()]
    if not photos or missing:
        sys.exit(f"the artifact's training photos are not readable under {data} ({len(missing)} missing)")
    return decode(photos, size, fit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Artifact (folder or registry <root>/<name>). Default: the throughput "
                                        "benchmark's model under --work (trained and published when missing).")
    parser.add_argument("--work", default=str(ROOT / ".cache" / "throughput"), help="Working folder.")
    parser.add_argument("--keep-float", nargs="+", default=["none", "head", "head,first_conv"],
                        help="Settings to compare (none | head | head,first_conv).")
    parser.add_argument("--json", action="store_true", help="Print one JSON list of rows instead of a table.")
    args = parser.parse_args()

    import openvino as ov

    from worker import runtimes
    from worker.artifact import read_labels, read_manifest, resolve_artifact

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path = resolve_artifact(args.model or default_model(work, DEFAULT_MODEL_NAME))
    manifest = read_manifest(path)
    size, fit = tuple(manifest.input_size), manifest.input_fit
    tests = test_photos([label.folder for label in read_labels(path)])
    labels = np.array([label for _, label in tests])
    log(f"{len(tests)} test photos, load average {loadavg()}")
    x = decode([p for p, _ in tests], size, fit)
    calibration = calibration_photos(path, manifest, size, fit)[:fast_runtimes.MAX_CALIBRATION]
    num_classes = manifest.num_classes

    def load(entry):
        return runtimes.load(path, entry, input_size=size, num_classes=num_classes)

    tf_predict = load(runtimes.RuntimeEntry("tf", "tf", "model", "fp32"))
    reference, tf_img_s = _timed(tf_predict, x)
    reference_cal = fast_runtimes.predict_all(tf_predict, calibration)
    bf16 = runtimes.load_openvino_model(path / "model-openvino-bf16" / "model.xml", "bf16")
    rows = []
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        tmp = Path(scratch)
        for setting in args.keep_float:
            keep = () if setting == "none" else tuple(setting.split(","))
            log(f"quantising with keep_float={keep or '()'}")
            started = time.perf_counter()
            quantized = fast_runtimes.quantize_int8(ov.convert_model(str(path / "model")), calibration, keep_float=keep)
            quantize_s = time.perf_counter() - started
            xml = tmp / setting.replace(",", "+") / "model.xml"
            ov.save_model(quantized, str(xml), compress_to_fp16=False)
            int8 = runtimes.load_openvino_model(xml, "int8")
            probs, img_s = _timed(int8, x)
            margin = fast_runtimes.fallback_margin(reference_cal, fast_runtimes.predict_all(int8, calibration))
            cascade = runtimes.with_fallback(int8, bf16, margin)
            cascaded = fast_runtimes.predict_all(cascade, x)
            plain = fast_runtimes.agreement(reference, probs, labels)
            rows.append({"keep_float": setting, "photos": plain["photos"], "top1_agreement": plain["top1_agreement"],
                         "fp32_top1": plain["fp32_top1"], "top1": plain["top1"],
                         "flipped": int((probs.argmax(1) != reference.argmax(1)).sum()),
                         "cascade_top1_agreement": fast_runtimes.agreement(reference, cascaded)["top1_agreement"],
                         "cascade_top1": round(float((cascaded.argmax(1) == labels).mean()), 4),
                         "fallback_margin": margin, "fallback_rate": round(cascade.fallbacks / max(1, cascade.calls), 4),
                         "int8_img_s": round(img_s, 2), "tf_fp32_img_s": round(tf_img_s, 2),
                         "quantize_s": round(quantize_s, 1), "calibration_photos": int(len(calibration)),
                         "loadavg": loadavg()})
            log(f"  {rows[-1]}")
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"model: {path} ({manifest.name} {manifest.version}); {len(tests)} test photos; "
          f"TF fp32 {tf_img_s:.2f} images/s at batch {BATCH}")
    print_table([Column("keep in float", 16, "keep_float", left=True), Column("agreement", 9, "top1_agreement", ".2%"),
                 Column("flipped", 7, "flipped"), Column("fp32 top-1", 10, "fp32_top1", ".2%"),
                 Column("int8 top-1", 10, "top1", ".2%"), Column("cascade agr.", 12, "cascade_top1_agreement", ".2%"),
                 Column("re-run", 7, "fallback_rate", ".1%"), Column("int8 img/s", 10, "int8_img_s", ".2f"),
                 Column("quantise s", 10, "quantize_s", ".1f")], rows)

if __name__ == "__main__":
    main()
