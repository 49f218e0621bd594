"""Faster serving variants of a published model, written beside the TensorFlow SavedModel.

OpenVINO reads the SavedModel directly (one conversion path, no tf.lite / tf2onnx step), and on
CPUs with AVX-512 VNNI / BF16 its int8 and bf16 models are several times faster than TensorFlow
fp32 (README, Runtimes and Benchmarks: the figures ``make bench`` and benchmarks/quantization.py
print). So the artifact carries:

- ``model-openvino-int8/model.xml|bin``: the SavedModel converted by ``openvino.convert_model``,
  then post-training quantised by NNCF: int8 weights (symmetric, per output channel) and
  activations (per tensor) in every convolution, calibrated on the run's *training* photos;
  everything after the last convolution stays in float: the dense head, and the global pooling.
  That last part matters: the VGG16 transfer model pools block5_conv3 with GeM
  (``mean(x**3)**(1/3)``), and NNCF by default puts a per-tensor int8 grid on the cubed
  activations, which zeroes most of them (benchmarks/quantization.py measures int8's agreement
  with fp32 with and without the pooling in float; its table is in the README).
- ``model-openvino-bf16/model.xml|bin``: the same conversion, weights stored as fp16, run with
  ``INFERENCE_PRECISION_HINT=bf16`` (the CPU's AVX512-BF16 instructions; f32 where absent).
- the ``openvino-int8`` entry is a cascade: int8 for every photo, and bf16 again for the few
  photos whose int8 top-2 margin is too small to trust (below the 99th percentile of how much
  int8 moves the fp32 margin, measured on the calibration photos). With the pooling in float the
  threshold is small and few photos run twice (benchmarks/quantization.py's ``re-run`` column).

Each variant's top-1 agreement with the fp32 SavedModel is measured here, on the run's held-out
photos (validation + test split: never used to fit weights), through the same loader the worker
uses (:func:`worker.runtimes.load_openvino_model`), and recorded in the manifest with a pass/fail
against :data:`worker.runtimes.AGREEMENT_THRESHOLD`; the worker's ``auto`` choice only takes
variants that passed.

Needs ``openvino`` and (for int8) ``nncf``, both in the ``train`` extra; without them publishing
still works and writes the SavedModel only.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from trainer.sampling import wilson_interval
from worker import runtimes

log = logging.getLogger(__name__)

VARIANTS = ("int8", "bf16")
MAX_CALIBRATION = 300  # NNCF's default subset size
FALLBACK_QUANTILE = 0.99
BATCH = 16
KEPT_IN_FLOAT = {"head": "global pooling and dense head (every op after the last convolution)",
                 "first_conv": "first convolution"}


def available() -> bool:
    return runtimes.is_available("openvino")


def predict_all(predict, pixels: np.ndarray, batch: int = BATCH, desc: str | bool | None = None) -> np.ndarray:
    """``predict`` over ``pixels`` in batches of ``batch`` (float32), concatenated; with ``desc``,
    a progress bar (stderr) of that name."""
    with tqdm(total=len(pixels), desc=desc, unit="img", disable=not desc, leave=False) as bar:
        out = []
        for i in range(0, len(pixels), batch):
            out.append(predict(pixels[i:i + batch].astype(np.float32)))
            bar.update(len(out[-1]))
    return np.concatenate(out)


def agreement(reference: np.ndarray, probs: np.ndarray, labels: np.ndarray | None = None,
              threshold: float = runtimes.AGREEMENT_THRESHOLD, *, num_classes: int | None = None,
              dog_threshold: float | None = None) -> dict:
    """Top-1 agreement of ``probs`` with ``reference`` (and both top-1 accuracies when labels
    are given), as recorded in manifest ``runtimes.<key>.agreement``. With ``num_classes`` the
    outputs carry the dog score after the breeds: top-1 is taken over the breeds, rows whose
    label is negative (photos without a dog) are left out of it, and with ``dog_threshold`` the
    agreement of the no-dog decision over all rows is added (``dog_check_agreement``)."""
    if num_classes is not None and reference.shape[1] > num_classes:
        out = agreement(reference[:, :num_classes], probs[:, :num_classes], labels, threshold)
        if dog_threshold is not None and len(reference):
            same = (reference[:, num_classes] < dog_threshold) == (probs[:, num_classes] < dog_threshold)
            out["dog_check_agreement"] = round(float(same.mean()), 4)
            out["dog_check_photos"] = int(len(same))
            out["max_abs_dog_score_diff"] = round(float(np.abs(reference[:, num_classes] - probs[:, num_classes]).max()), 4)
            out["passed"] = bool(out["passed"] and out["dog_check_agreement"] >= threshold)
        return out
    if labels is not None and (np.asarray(labels) < 0).any():
        dogs = np.asarray(labels) >= 0
        reference, probs, labels = reference[dogs], probs[dogs], np.asarray(labels)[dogs]
    ref_top, top = reference.argmax(1), probs.argmax(1)
    agree = float((ref_top == top).mean()) if len(top) else 0.0
    low, high = wilson_interval(int((ref_top == top).sum()), len(top))
    out = {"reference": "tf", "photos": int(len(top)), "top1_agreement": round(agree, 4),
           "top1_agreement_95": [round(low, 4), round(high, 4)],
           "threshold": threshold, "passed": bool(len(top) > 0 and agree >= threshold),
           "max_abs_prob_diff": round(float(np.abs(reference - probs).max()) if len(top) else 0.0, 4)}
    if labels is not None and len(top):
        out["fp32_top1"] = round(float((ref_top == labels).mean()), 4)
        out["top1"] = round(float((top == labels).mean()), 4)
    return out


def first_convolution(model) -> str | None:
    return next((op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"), None)


def after_last_convolution(model) -> list[str]:
    """Names of the computing ops that no convolution depends on (in topological order): the
    global pooling and the dense head. A model with branches (flip test-time augmentation: the
    photo and its mirror image; a mixed model: two backbones) has one such tail per branch plus
    what joins them; in a single chain it is everything after the last convolution."""
    ops = list(model.get_ordered_ops())
    feeds_a_convolution: set[str] = set()
    for op in reversed(ops):  # consumers come after producers: walk back from the outputs
        name = op.get_friendly_name()
        if op.get_type_name() == "Convolution" or name in feeds_a_convolution:
            feeds_a_convolution.update(i.get_source_output().get_node().get_friendly_name() for i in op.inputs())
            feeds_a_convolution.add(name)
    return [op.get_friendly_name() for op in ops
            if op.get_friendly_name() not in feeds_a_convolution
            and op.get_type_name() not in ("Constant", "Parameter", "Result")]


def quantize_int8(model, calibration: np.ndarray, *, keep_float: Sequence[str] = ("head",)):
    """NNCF post-training int8 quantisation of an OpenVINO model (not saved). ``keep_float``:
    "head" keeps every op after the last convolution in float (the global pooling -- GeM cubes
    its inputs, which per-tensor int8 cannot represent -- and the dense head), "first_conv" the
    first convolution too."""
    import nncf

    names = []
    if "first_conv" in keep_float:
        first = first_convolution(model)
        names += [first] if first else []
    types = []
    if "head" in keep_float:
        names += after_last_convolution(model)
        types = ["MatMul"]
    scope = nncf.IgnoredScope(names=names, types=types, validate=False) if names or types else None
    dataset = nncf.Dataset(list(calibration), lambda image: image[None].astype(np.float32))
    kwargs = {"ignored_scope": scope} if scope else {}
    nncf.set_log_level(logging.WARNING)  # not its per-node INFO lines
    with contextlib.redirect_stdout(sys.stderr):  # its progress bars: stdout is for results (tables, --json)
        return nncf.quantize(model, dataset, subset_size=len(calibration),
                             preset=nncf.QuantizationPreset.PERFORMANCE, **kwargs)


def dog_fallback_margin(reference: np.ndarray, probs: np.ndarray, quantile: float = FALLBACK_QUANTILE) -> float:
    """How much quantisation moves the dog score: the ``quantile`` of ``|dog - dog_fp32|`` over
    photos. A photo whose quantised dog score is this close to the threshold is re-run."""
    if len(reference) == 0:
        return 0.0
    shift = np.abs(probs.astype(np.float64) - reference.astype(np.float64))
    return round(float(np.ceil(np.quantile(shift, quantile) * 1000)) / 1000, 3)


def fallback_margin(reference: np.ndarray, probs: np.ndarray, quantile: float = FALLBACK_QUANTILE) -> float:
    """How much quantisation moves the fp32 top-2 margin: the ``quantile`` of
    ``|(p[a] - p[b]) - (ref[a] - ref[b])|`` over photos, a/b = the fp32 top-2 classes. A photo
    whose quantised margin is below it may have flipped: the cascade re-runs it."""
    if len(reference) == 0 or reference.shape[1] < 2:
        return 0.0
    order = np.argsort(-reference, axis=1)[:, :2]
    rows = np.arange(len(reference))
    shift = (probs[rows, order[:, 0]] - probs[rows, order[:, 1]]) - (reference[rows, order[:, 0]] - reference[rows, order[:, 1]])
    return round(float(np.ceil(np.quantile(np.abs(shift.astype(np.float64)), quantile) * 1000)) / 1000, 3)


def build_openvino_variants(saved_model_dir: Path, out_dir: Path, *, calibration: np.ndarray, heldout: np.ndarray,
                            heldout_labels: np.ndarray | None = None, reference: np.ndarray | None = None,
                            variants: Sequence[str] = VARIANTS, threads: int | None = None,
                            keep_float: Sequence[str] = ("head",), int8_fallback: bool = True,
                            heldout_split: str = "val+test", num_classes: int | None = None,
                            dog_threshold: float | None = None, sample: dict | None = None,
                            progress: bool = True) -> tuple[dict[str, Path], dict]:
    """Convert ``saved_model_dir`` (the artifact's SavedModel) to OpenVINO variants under
    ``out_dir``; measure each against ``reference`` (fp32 probabilities of ``heldout``; computed
    with the SavedModel when None). Returns (artifact-relative path -> file, manifest runtimes
    entries). ``calibration`` and ``heldout`` are uint8 ``(n, H, W, 3)`` photos.

    With ``int8_fallback`` (and a bf16 variant), the int8 entry is a cascade: photos whose int8
    top-2 margin is below :func:`fallback_margin` (measured on the calibration photos, never on
    the held-out ones) are re-run in bf16; its recorded agreement is that of the cascade, beside
    the plain int8 one. ``num_classes``: the model's output has a dog score column after the
    breeds (the artifact's dog check, threshold ``dog_threshold``): top-1 is measured on the
    breeds of the dog photos (label >= 0), the dog decision on every held-out photo, and the
    cascade also re-runs the photos whose int8 dog score is close to the threshold.

    Each set is predicted once per model: the fp32 reference of ``heldout`` serves every variant,
    and the cascade's held-out outputs are not run again but composed from the int8 and bf16
    ones with the worker's own rule (:func:`worker.runtimes.fallback_rows`). ``sample``: how
    ``heldout`` was drawn from the split (trainer.sampling), recorded beside each agreement.
    ``progress``: a bar for every prediction pass (stderr)."""
    import openvino as ov

    out_dir = Path(out_dir)
    heldout = np.asarray(heldout)
    calibration = np.asarray(calibration)[:MAX_CALIBRATION]
    input_size = list(heldout.shape[1:3])
    cascade = int8_fallback and "int8" in variants and "bf16" in variants and len(calibration) > 0
    predict_tf = None
    if reference is None or cascade:
        tf_entry = runtimes.RuntimeEntry("tf", "tf", ".", "fp32")
        predict_tf = runtimes.load(Path(saved_model_dir), tf_entry, input_size=input_size, num_classes=0, threads=threads)
    if reference is None:
        log.info("publish: fp32 reference on %d held-out photos", len(heldout))
        reference = predict_all(predict_tf, heldout, desc=progress and "fp32 reference (held-out)")

    log.info("publish: converting the SavedModel to OpenVINO")
    started = time.perf_counter()
    model = ov.convert_model(str(saved_model_dir))
    converted_s = time.perf_counter() - started
    files: dict[str, Path] = {}
    entries: dict[str, dict] = {}
    built: dict[str, dict] = {}
    for precision in variants:  # write the IRs
        folder = f"model-openvino-{precision}"
        started = time.perf_counter()
        extra: dict = {}
        if precision == "int8":
            if len(calibration) == 0:
                log.warning("no calibration photos: skipping the int8 variant")
                continue
            log.info("publish: int8 quantisation calibrated on %d photos", len(calibration))
            variant = quantize_int8(model, calibration, keep_float=keep_float)
            ov.save_model(variant, str(out_dir / folder / "model.xml"), compress_to_fp16=False)
            extra["quantization"] = {
                "tool": "nncf post-training quantisation", "preset": "performance",
                "weights": "int8 symmetric, per output channel", "activations": "int8 per tensor",
                "calibration_photos": int(len(calibration)), "calibration_split": "train",
                "kept_in_float": [KEPT_IN_FLOAT[k]
                                  for k in keep_float],
            }
        elif precision in ("bf16", "fp32"):
            ov.save_model(model, str(out_dir / folder / "model.xml"), compress_to_fp16=precision == "bf16")
            if precision == "bf16":
                extra["weights"] = "stored fp16, computed bf16 (INFERENCE_PRECISION_HINT=bf16)"
        else:
            raise ValueError(f"unknown OpenVINO variant precision {precision!r}")
        for name in ("model.xml", "model.bin"):
            files[f"{folder}/{name}"] = out_dir / folder / name
        built[precision] = {"runtime": "openvino", "path": f"{folder}/model.xml", "precision": precision,
                            "format": "openvino-ir", "openvino": ov.get_version().split("-")[0], **extra,
                            "build_s": time.perf_counter() - started + converted_s}

    def measure(reference_probs, probs):
        return agreement(reference_probs, probs, heldout_labels, num_classes=num_classes, dog_threshold=dog_threshold)

    with_dog = num_classes is not None and dog_threshold is not None
    outputs: dict[str, np.ndarray] = {}
    # bf16 first: the int8 cascade's held-out outputs are int8's, with bf16's on the photos it re-runs
    for precision in sorted(built, key=lambda p: p == "int8"):  # measure them as the worker runs them
        spec = built[precision]
        key = f"openvino-{precision}"
        build_s = spec.pop("build_s")
        predict = runtimes.load_openvino_model(out_dir / spec["path"], precision, threads=threads)
        started = time.perf_counter()
        log.info("publish: %s on %d held-out photos", key, len(heldout))
        probs = outputs[precision] = predict_all(predict, heldout, desc=progress and f"{key} (held-out)")
        if precision == "int8" and cascade:  # bf16 was measured first (the sort above)
            plain = measure(reference, probs)
            log.info("publish: fp32 and int8 on %d calibration photos (the cascade's margins)", len(calibration))
            calibration_ref = predict_all(predict_tf, calibration, desc=progress and "fp32 (calibration)")
            calibration_int8 = predict_all(predict, calibration, desc=progress and "int8 (calibration)")
            c = num_classes or calibration_ref.shape[1]
            margin = fallback_margin(calibration_ref[:, :c], calibration_int8[:, :c])
            spec["fallback"] = {"path": built["bf16"]["path"], "precision": "bf16", "below_margin": margin,
                                "rule": f"photos whose int8 top-2 margin is below {margin} (the 99th percentile of "
                                        "int8's shift of the fp32 top-2 margin on the calibration photos) are "
                                        "re-run in bf16"}
            dog_margin = 0.0
            if with_dog:
                dog_margin = dog_fallback_margin(calibration_ref[:, c], calibration_int8[:, c])
                spec["fallback"].update(dog_threshold=dog_threshold, dog_below_margin=dog_margin)
                spec["fallback"]["rule"] += (f"; so are those whose int8 dog score is within {dog_margin} of the dog "
                                             "threshold (the 99th percentile of int8's shift of the dog score)")
            rerun = runtimes.fallback_rows(probs, margin, breed_columns=num_classes,
                                           dog_threshold=dog_threshold if with_dog else None, dog_margin=dog_margin)
            probs = np.where(rerun[:, None], outputs["bf16"], probs)
            spec["fallback"]["heldout_fallback_rate"] = round(float(rerun.mean()) if len(rerun) else 0.0, 4)
            spec["int8_only_agreement"] = {k: plain[k] for k in ("photos", "top1_agreement", "passed",
                                                                 "dog_check_agreement") if k in plain}
        seconds = time.perf_counter() - started
        measured = measure(reference, probs)
        measured["photos_split"] = heldout_split
        if sample:
            measured["sample"] = sample
        entries[key] = {**spec, "agreement": measured,
                        "publish_seconds": {"build": round(build_s, 1), "agreement": round(seconds, 1)}}
        log.info("%s: top-1 agreement %.2f%% on %d photos (%s)", key, 100 * measured["top1_agreement"],
                 measured["photos"], "passed" if measured["passed"] else "FAILED")
    entries = {f"openvino-{p}": entries[f"openvino-{p}"] for p in built}  # the manifest keeps the variants' order
    return files, entries
