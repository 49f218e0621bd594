"""Serving runtimes of a model artifact: which model file runs the inference, and how.

An artifact always carries the TensorFlow SavedModel (``model/``, runtime ``tf``, fp32: the
reference). ``dogbreeds-train publish`` may add faster variants next to it, e.g. an OpenVINO
IR quantised to int8 (``model-openvino-int8/model.xml``). ``manifest.json`` lists them all in
``runtimes``::

    "runtimes": {
      "tf": {"path": "model", "precision": "fp32"},            <- unchanged since schema 1
      "openvino-int8": {"runtime": "openvino", "path": "model-openvino-int8/model.xml",
                        "precision": "int8", "format": "openvino-ir",
                        "agreement": {"reference": "tf", "photos": 110, "top1_agreement": 0.9945,
                                      "threshold": 0.99, "passed": true, ...}, ...}
    }

An entry may name a ``fallback`` model (``{"path", "precision", "below_margin"}``, and for a
model with a dog score ``dog_threshold`` and ``dog_below_margin``): the photos whose top-2 breed
probability margin from the first model is below ``below_margin``, or whose dog score is within
``dog_below_margin`` of the dog threshold, are run again with it (the int8 variant falls back
to bf16 on the few close calls where quantisation noise could flip the top-1 or the dog
decision; see trainer.fast_runtimes). Every variant takes what the SavedModel takes (float32 ``(n, H, W, 3)`` RGB 0..255, the
preprocessing is inside) and returns the same output: ``(n, outputs)``, the breeds'
probabilities and, when the artifact has a dog check, the dog score as the last column. :func:`select` picks one:
an explicit choice (``--runtime`` / ``$DOGBREEDS_RUNTIME``: a key such as ``openvino-int8``,
or a runtime name such as ``openvino`` or ``tf``), else ``auto``: the fastest variant whose
package is installed and whose recorded top-1 agreement with fp32 passed the threshold.
:func:`load` turns an entry into ``predict(batch) -> probs``.

Data-only by default: an OpenVINO IR is a graph of inference operations and weights, while a
TensorFlow SavedModel is a program (its graph may read files and environment variables, e.g. the
function's AWS credentials, and write them anywhere TensorFlow's file systems reach). ``auto``
therefore never picks the SavedModel unless ``$DOGBREEDS_ALLOW_SAVEDMODEL`` is ``1`` (or the
caller passes ``allow_savedmodel=True``); asking for ``tf`` by name is the other explicit opt-in.

Nothing here imports TensorFlow or OpenVINO at module level: each is imported only when a
model of that runtime is loaded, so a worker installed without TensorFlow
(``dogbreeds[worker-lite]``) serves the OpenVINO variants.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from worker.artifact.contract import SERVE_SIGNATURE, ArtifactError

__all__ = [
    "AGREEMENT_THRESHOLD",
    "AUTO",
    "RUNTIME_ENV",
    "THREADS_ENV",
    "RuntimeEntry",
    "RuntimeSelectionError",
    "entries",
    "files_of",
    "is_available",
    "load",
    "load_openvino_model",
    "select",
    "serving_threads",
    "with_fallback",
]

RUNTIME_ENV = "DOGBREEDS_RUNTIME"
ALLOW_SAVEDMODEL_ENV = "DOGBREEDS_ALLOW_SAVEDMODEL"
THREADS_ENV = "DOGBREEDS_THREADS"
AUTO = "auto"
TF = "tf"
OPENVINO = "openvino"
AGREEMENT_THRESHOLD = 0.99  # top-1 agreement with fp32 on held-out photos needed for "auto"

#: Expected speed relative to fp32 on a CPU (what "fastest" means when choosing automatically).
PRECISION_SPEED = {"int8": 4.0, "bf16": 2.0, "fp16": 2.0, "fp32": 1.0}
#: Python module each runtime needs (checked without importing it).
RUNTIME_MODULES = {TF: "tensorflow", OPENVINO: "openvino"}

Predict = Callable[[np.ndarray], np.ndarray]


class RuntimeSelectionError(ValueError):
    """The requested runtime is not in the artifact, not installed, or none is usable."""


@dataclass(frozen=True)
class RuntimeEntry:
    key: str  # the key in manifest.json "runtimes", e.g. "tf", "openvino-int8"
    runtime: str  # "tf" | "openvino"
    path: str  # relative to the artifact directory
    precision: str  # "fp32" | "bf16" | "int8" ...
    agreement: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Usable automatically: the fp32 reference itself, or a variant whose recorded
        top-1 agreement with it passed the threshold at publish time."""
        if self.runtime == TF and self.precision == "fp32":
            return True
        return bool(self.agreement.get("passed"))

    @property
    def speed(self) -> float:
        """Expected speed relative to fp32 (``PRECISION_SPEED``), for ranking entries."""
        return PRECISION_SPEED.get(self.precision, 1.0)


def entries(runtimes: Mapping[str, Any]) -> list[RuntimeEntry]:
    """The manifest's ``runtimes`` object as entries (malformed ones are skipped)."""
    out = []
    for key, spec in (runtimes or {}).items():
        if not isinstance(spec, Mapping) or not isinstance(spec.get("path"), str):
            continue
        runtime = spec.get("runtime") or str(key).split("-", 1)[0]
        agreement = spec.get("agreement") if isinstance(spec.get("agreement"), Mapping) else {}
        extra = {k: v for k, v in spec.items() if k not in ("runtime", "path", "precision", "agreement")}
        out.append(RuntimeEntry(str(key), str(runtime), spec["path"], str(spec.get("precision", "fp32")),
                                dict(agreement), extra))
    return out


def is_available(runtime: str) -> bool:
    """Whether the runtime's Python package is installed (without importing it)."""
    module = RUNTIME_MODULES.get(runtime)
    if module is None:
        return False
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def savedmodel_allowed(env: Mapping[str, str] = os.environ) -> bool:
    """``$DOGBREEDS_ALLOW_SAVEDMODEL`` is 1/true/yes: ``auto`` may serve the TensorFlow SavedModel."""
    return env.get(ALLOW_SAVEDMODEL_ENV, "").strip().lower() in ("1", "true", "yes")


def savedmodel_refused(keys: str) -> str:
    return (f"this artifact carries no data-only model (it has: {keys}): the worker serves OpenVINO IR variants "
            "by default, since a TensorFlow SavedModel is a program (its graph can read files and environment "
            "variables). Publish it with its OpenVINO variants (dogbreeds-train publish builds them unless "
            "--tf-only; it needs the 'train' extra's openvino and nncf), or opt in to the SavedModel with "
            f"{ALLOW_SAVEDMODEL_ENV}=1 or --runtime tf")


def select(runtimes: Mapping[str, Any], requested: str | None = None, *,
           available: Callable[[str], bool] | None = None, allow_savedmodel: bool | None = None) -> RuntimeEntry:
    """Choose the runtime entry to serve with.

    ``requested``: None -> ``$DOGBREEDS_RUNTIME`` -> ``"auto"``. ``"auto"``: among the
    entries whose package is installed and that :attr:`RuntimeEntry.passed`, the fastest
    (int8 > bf16 > fp32; ``tf`` wins ties); the ``tf`` SavedModel only with
    ``allow_savedmodel`` (None -> ``$DOGBREEDS_ALLOW_SAVEDMODEL``). A key (``"openvino-int8"``)
    picks that entry even if its agreement failed (an explicit choice); a runtime name
    (``"openvino"``, ``"tf"``) picks the fastest passing entry of that runtime, else its fastest entry.
    """
    requested = (requested or os.environ.get(RUNTIME_ENV) or AUTO).strip()
    available = available or is_available
    allow_savedmodel = savedmodel_allowed() if allow_savedmodel is None else allow_savedmodel
    all_entries = entries(runtimes)
    if not all_entries:
        raise RuntimeSelectionError("the artifact lists no runtimes")
    keys = ", ".join(e.key for e in all_entries)

    def rank(e: RuntimeEntry):
        return (e.passed, e.speed, e.runtime == TF)

    if requested == AUTO:
        if not allow_savedmodel:
            all_entries = [e for e in all_entries if e.runtime != TF]
            if not all_entries:
                raise RuntimeSelectionError(savedmodel_refused(keys))
        usable = [e for e in all_entries if e.passed and available(e.runtime)]
        if not usable:
            passed = [e for e in all_entries if e.passed]
            choose = "" if allow_savedmodel else f"; the SavedModel is served only when chosen ({ALLOW_SAVEDMODEL_ENV}=1 or --runtime tf)"
            if not passed:
                raise RuntimeSelectionError(
                    f"no usable runtime: no variant of {keys} passed its agreement check at publish time; "
                    f"choose one explicitly with --runtime <key>{choose}")
            missing = sorted({RUNTIME_MODULES.get(e.runtime, e.runtime) for e in passed})
            raise RuntimeSelectionError(
                f"no usable runtime: the artifact carries {keys} (usable automatically: "
                f"{', '.join(e.key for e in passed)}), but {' / '.join(missing)} is not installed "
                "(pip install 'dogbreeds[worker-lite]' for OpenVINO, 'dogbreeds[worker-tf]' for TensorFlow)" + choose)
        return max(usable, key=rank)

    chosen = next((e for e in all_entries if e.key == requested), None)
    if chosen is None:
        of_runtime = [e for e in all_entries if e.runtime == requested]
        if not of_runtime:
            raise RuntimeSelectionError(f"runtime {requested!r} is not in this artifact (it carries: {keys})")
        chosen = max(of_runtime, key=rank)
    if not available(chosen.runtime):
        raise RuntimeSelectionError(
            f"runtime {chosen.key!r} needs the Python package {RUNTIME_MODULES.get(chosen.runtime, chosen.runtime)!r}, "
            "which is not installed")
    return chosen


def serving_threads() -> int:
    """Inference threads: ``$DOGBREEDS_THREADS``, else the CPUs this process may run on."""
    from worker.settings import env_int

    threads = env_int(THREADS_ENV, None)
    if threads is not None:
        return max(1, threads)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def tf_micro_batch() -> int:
    """Images per TensorFlow call (``DOGBREEDS_TF_MICRO_BATCH``, default 4): a worker batch of 16
    runs as 4 calls, so peak memory holds 4 images' activations instead of 16."""
    from worker.settings import env_int

    return max(1, env_int("DOGBREEDS_TF_MICRO_BATCH", 4))


def _checked(fn: Callable[[np.ndarray], np.ndarray], input_size, outputs: int) -> Predict:
    h, w = (int(v) for v in input_size)

    def predict(batch: np.ndarray) -> np.ndarray:
        x = np.asarray(batch, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != (h, w, 3):
            raise ValueError(f"expected a float32 batch of shape (n, {h}, {w}, 3), got {x.shape}")
        if x.shape[0] == 0:
            return np.zeros((0, outputs), dtype=np.float32)
        out = fn(np.ascontiguousarray(x))
        if outputs and out.shape[1:] != (outputs,):
            raise ValueError(f"the model returned {out.shape[1:]} per photo, the artifact declares {outputs} columns")
        return out

    return predict


def load(artifact_path: Path, entry: RuntimeEntry, *, input_size, num_classes: int,
         threads: int | None = None, outputs: int | None = None) -> Predict:
    """``predict(float32 (n, H, W, 3) RGB 0..255) -> (n, outputs)``: the ``num_classes`` breed
    probabilities, then (``outputs == num_classes + 1``) the dog score. ``outputs`` defaults to
    ``num_classes``; 0 skips the width check."""
    path = Path(artifact_path) / entry.path
    threads = threads or serving_threads()
    if entry.runtime == TF:
        fn = _load_tf(path, input_size, threads)
    elif entry.runtime == OPENVINO:
        if not path.is_file():
            raise ArtifactError(f"runtime {entry.key!r}: {path} is missing")
        fn = load_openvino_model(path, entry.precision, threads=threads)
        fallback = entry.extra.get("fallback")
        if isinstance(fallback, Mapping) and isinstance(fallback.get("path"), str):
            second = Path(artifact_path) / fallback["path"]
            if not second.is_file():
                raise ArtifactError(f"runtime {entry.key!r}: fallback {second} is missing")
            dog_threshold = fallback.get("dog_threshold")
            fn = with_fallback(fn, load_openvino_model(second, str(fallback.get("precision", "fp32")), threads=threads),
                               float(fallback.get("below_margin", 0.0)), breed_columns=num_classes or None,
                               dog_threshold=None if dog_threshold is None else float(dog_threshold),
                               dog_margin=float(fallback.get("dog_below_margin", 0.0)))
    else:
        raise RuntimeSelectionError(f"runtime {entry.runtime!r} ({entry.key}) is not supported by this worker")
    predict = _checked(fn, input_size, num_classes if outputs is None else outputs)
    predict._inner = fn  # keeps the model alive with the function
    return predict


def files_of(entry: RuntimeEntry, files) -> set[str]:
    """The artifact files an entry reads: everything in its model's folder (and its fallback's)."""
    paths = [entry.path]
    fallback = entry.extra.get("fallback")
    if isinstance(fallback, Mapping) and isinstance(fallback.get("path"), str):
        paths.append(fallback["path"])
    out = set()
    for path in paths:
        folder = path.rsplit("/", 1)[0] if "/" in path else path
        out |= {f for f in files if f == path or f.startswith(folder + "/")}
    return out


def top2_margin(probs: np.ndarray) -> np.ndarray:
    """Best minus second-best probability, per row."""
    if probs.shape[1] < 2:
        return np.ones(len(probs), dtype=probs.dtype)
    top2 = np.partition(probs, -2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def fallback_rows(out: np.ndarray, below_margin: float, *, breed_columns: int | None = None,
                  dog_threshold: float | None = None, dog_margin: float = 0.0) -> np.ndarray:
    """The cascade's rule (:func:`with_fallback`), per row of a primary runtime's outputs: True
    where the top-2 margin over the breeds is below ``below_margin`` or, with ``dog_threshold``,
    the dog score (the column after the ``breed_columns`` breeds) is within ``dog_margin`` of it."""
    breeds = out[:, :breed_columns] if breed_columns else out
    close = top2_margin(breeds) < below_margin
    if dog_threshold is not None and breed_columns and out.shape[1] > breed_columns:
        close |= np.abs(out[:, breed_columns] - dog_threshold) < dog_margin
    return close


def with_fallback(primary, secondary, below_margin: float, *, breed_columns: int | None = None,
                  dog_threshold: float | None = None, dog_margin: float = 0.0):
    """A cascade: ``primary`` (e.g. int8) for every photo; the photos whose top-2 margin is
    below ``below_margin`` -- where quantisation noise could flip the top-1 -- are run again
    with ``secondary`` (e.g. bf16) and take its answer. With ``breed_columns`` the margin is
    taken over the first columns only (the breeds; the last is the dog score), and with
    ``dog_threshold`` the photos whose dog score is within ``dog_margin`` of it are re-run too
    (quantisation noise could flip the dog decision): :func:`fallback_rows`.
    ``run.calls``/``run.fallbacks`` count photos."""

    def close_calls(out: np.ndarray) -> np.ndarray:
        return fallback_rows(out, below_margin, breed_columns=breed_columns, dog_threshold=dog_threshold,
                             dog_margin=dog_margin)

    def run(x: np.ndarray) -> np.ndarray:
        probs = primary(x)
        low = np.flatnonzero(close_calls(probs))
        if low.size:
            probs[low] = secondary(np.ascontiguousarray(x[low]))
        run.calls += len(x)
        run.fallbacks += int(low.size)
        return probs

    run.calls = run.fallbacks = 0
    run.below_margin = below_margin
    run._models = (primary, secondary)
    return run


# --------------------------------------------------------------------------- TensorFlow


def _load_tf(model_dir: Path, input_size, threads: int):
    import tensorflow as tf  # lazy: only the tf runtime needs TensorFlow

    try:  # only possible before TensorFlow's runtime starts (first model load in this process)
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        pass
    loaded = tf.saved_model.load(str(model_dir))
    signatures = dict(loaded.signatures)
    if SERVE_SIGNATURE not in signatures:
        raise ArtifactError(f"{model_dir}: no {SERVE_SIGNATURE!r} signature (has {sorted(signatures)})")
    fn = signatures[SERVE_SIGNATURE]
    _, kw_specs = fn.structured_input_signature
    if len(kw_specs) != 1:
        raise ArtifactError(f"{SERVE_SIGNATURE!r} signature must take one input, takes {sorted(kw_specs)}")
    (input_name, spec), = kw_specs.items()
    outputs = list(fn.structured_outputs)
    if len(outputs) != 1:
        raise ArtifactError(f"{SERVE_SIGNATURE!r} signature must return one output, returns {outputs}")
    output_name = outputs[0]
    h, w = input_size
    spec_hw = list(spec.shape)[1:3] if spec.shape.rank == 4 else None
    if spec_hw and None not in spec_hw and spec_hw != [h, w]:
        raise ArtifactError(f"SavedModel input is {spec_hw} but manifest input_size is {[h, w]}")

    micro = tf_micro_batch()

    def run(x: np.ndarray) -> np.ndarray:
        # Micro-batches: TensorFlow holds every activation of a call at once (~40 MB per VGG16
        # image in fp32), while images/s barely depends on the batch size on CPU.
        outs = [fn(**{input_name: tf.constant(x[i:i + micro])})[output_name].numpy()
                for i in range(0, len(x), micro)]
        return np.asarray(np.concatenate(outs), dtype=np.float32)

    run.micro_batch = micro
    run._loaded = loaded  # keep the SavedModel (and its variables) alive with the function
    return run


# --------------------------------------------------------------------------- OpenVINO

_OPENVINO_HINTS = {"bf16": "bf16", "fp16": "f16"}  # anything else (int8, fp32): f32 for the float parts
# OpenVINO pins its stream threads to cores by default, counting from the first core it may use: two
# one-thread pollers on one host then both ran on core 0 while core 1 idled (benchmarks/fleet.py: 2
# pollers 27.4 images/s, the same as 1). The OS scheduler places them (and the worker's download and
# decode threads) instead; a process restricted with sched_setaffinity stays within its CPUs.
_NO_PINNING = {"ENABLE_CPU_PINNING": False}


def load_openvino_model(xml_path: Path, precision: str = "fp32", *, threads: int | None = None, max_streams: int = 8):
    """Compile an OpenVINO IR for the CPU and return ``run(x) -> probs``.

    A batch is split over ``threads`` streams of one thread each, run concurrently (measured on
    2 busy cores: 1.2-1.5x the images/s of one 2-thread stream, whose thread barriers stall
    whenever a download/decode thread or a neighbour takes a core). A batch of one photo runs on
    a one-stream, ``threads``-thread compilation made on first use. Precision: bf16 ->
    ``INFERENCE_PRECISION_HINT=bf16`` (where the CPU has it); int8 IRs run their quantised
    layers in int8 and the rest in f32."""
    import openvino as ov  # lazy: only this runtime needs OpenVINO

    core = ov.Core()
    threads = int(threads or serving_threads())
    streams = max(1, min(threads, max_streams))
    hint = _OPENVINO_HINTS.get(precision, "f32")
    model = core.read_model(str(xml_path))
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(f"{xml_path}: expected one input and one output, got {len(model.inputs)}/{len(model.outputs)}")
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": streams, "NUM_STREAMS": streams,
                                                 "INFERENCE_PRECISION_HINT": hint, **_NO_PINNING})
    requests = [compiled.create_infer_request() for _ in range(streams)]
    single: list = []  # [request] of the one-stream compilation, made on first use
    lock = threading.Lock()

    def run_one(x: np.ndarray) -> np.ndarray:
        if not single:
            one = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                                    "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint,
                                                    **_NO_PINNING})
            single.append(one.create_infer_request())
        single[0].infer({0: x}, share_inputs=True)
        return np.array(single[0].get_output_tensor(0).data, dtype=np.float32, copy=True)

    def run(x: np.ndarray) -> np.ndarray:
        with lock:  # the infer requests are not shared between calls
            if len(x) == 1 or streams == 1:
                return run_one(x) if streams > 1 else _infer_sync(requests[0], x)
            parts = [part for part in np.array_split(x, min(streams, len(x))) if len(part)]
            for request, part in zip(requests, parts):
                request.start_async({0: part}, share_inputs=True)
            out = []
            for request in requests[:len(parts)]:
                request.wait()
                out.append(np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True))
            return np.concatenate(out)

    run._compiled = compiled
    return run


def _infer_sync(request, x: np.ndarray) -> np.ndarray:
    request.infer({0: x}, share_inputs=True)
    return np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)
