"""Serving runtimes (worker.runtimes) and the fast variants publish writes (trainer.fast_runtimes):
selection logic, OpenVINO conversion + int8/bf16 agreement on a TINY Keras model with the
project's preprocessing layers, the artifact round trip, and serving without TensorFlow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import COLOUR_BREEDS, FAST_SIZE, colour_data, colour_photo
from worker import runtimes
from worker.runtimes import RuntimeSelectionError, select

REPO = Path(__file__).resolve().parents[2]
SIZE = FAST_SIZE

TF_ONLY = {"tf": {"path": "model", "precision": "fp32"}}


def _variant(precision, passed=True, agreement=0.995):
    return {"runtime": "openvino", "path": f"model-openvino-{precision}/model.xml", "precision": precision,
            "agreement": {"reference": "tf", "photos": 200, "top1_agreement": agreement, "threshold": 0.99,
                          "passed": passed}}


def _all(int8_passed=True, bf16_passed=True):
    return {**TF_ONLY, "openvino-int8": _variant("int8", int8_passed), "openvino-bf16": _variant("bf16", bf16_passed)}


def everything(_runtime):
    return True


def only(*names):
    return lambda runtime: runtime in names


# --------------------------------------------------------------------------- selection


def test_old_manifest_selects_tf_only_when_the_savedmodel_is_allowed(monkeypatch):
    monkeypatch.delenv(runtimes.RUNTIME_ENV, raising=False)
    entry = select(TF_ONLY, available=everything, allow_savedmodel=True)
    assert (entry.key, entry.runtime, entry.path, entry.precision) == ("tf", "tf", "model", "fp32")
    assert select(TF_ONLY, "tf", available=everything).key == "tf"  # asking for it by name is an opt-in too


def test_auto_serves_no_savedmodel_by_default(monkeypatch):
    """A SavedModel is a program: auto serves the data-only variants, and a TF-only artifact is a
    clear refusal that says how to publish the variants or how to opt in."""
    monkeypatch.delenv(runtimes.RUNTIME_ENV, raising=False)
    monkeypatch.delenv(runtimes.ALLOW_SAVEDMODEL_ENV, raising=False)
    with pytest.raises(RuntimeSelectionError) as refused:
        select(TF_ONLY, available=everything)
    message = str(refused.value)
    assert "no data-only model" in message and "OpenVINO" in message and "--tf-only" in message
    assert "DOGBREEDS_ALLOW_SAVEDMODEL=1" in message and "--runtime tf" in message
    # variants that failed their agreement check, or an OpenVINO that is not installed: still no SavedModel
    with pytest.raises(RuntimeSelectionError, match="passed its agreement check"):
        select(_all(int8_passed=False, bf16_passed=False), available=everything)
    with pytest.raises(RuntimeSelectionError, match="openvino is not installed"):
        select(_all(), available=only("tf"))
    for value in ("1", "true", "yes"):
        monkeypatch.setenv(runtimes.ALLOW_SAVEDMODEL_ENV, value)
        assert select(TF_ONLY, available=everything).key == "tf"
    monkeypatch.setenv(runtimes.ALLOW_SAVEDMODEL_ENV, "0")
    with pytest.raises(RuntimeSelectionError, match="no data-only model"):
        select(TF_ONLY, available=everything)
    assert select(_all(), available=everything).key == "openvino-int8"


def test_auto_picks_the_fastest_variant_that_passed(monkeypatch):
    monkeypatch.delenv(runtimes.RUNTIME_ENV, raising=False)
    assert select(_all(), available=everything).key == "openvino-int8"
    assert select(_all(int8_passed=False), available=everything).key == "openvino-bf16"
    assert select(_all(int8_passed=False, bf16_passed=False), available=everything, allow_savedmodel=True).key == "tf"
    # an entry without a recorded agreement is never chosen automatically
    unmeasured = {**TF_ONLY, "openvino-int8": {"runtime": "openvino", "path": "x/model.xml", "precision": "int8"}}
    assert select(unmeasured, available=everything, allow_savedmodel=True).key == "tf"


def test_auto_only_considers_installed_runtimes(monkeypatch):
    monkeypatch.delenv(runtimes.RUNTIME_ENV, raising=False)
    assert select(_all(), available=only("tf"), allow_savedmodel=True).key == "tf"  # worker-tf install: no openvino
    assert select(_all(), available=only("openvino")).key == "openvino-int8"  # worker-lite: no tensorflow
    assert select(_all(int8_passed=False), available=only("openvino")).key == "openvino-bf16"
    with pytest.raises(RuntimeSelectionError, match="worker-lite"):
        select(TF_ONLY, available=only("openvino"), allow_savedmodel=True)


def test_explicit_choices(monkeypatch):
    monkeypatch.delenv(runtimes.RUNTIME_ENV, raising=False)
    assert select(_all(), "tf", available=everything).key == "tf"
    assert select(_all(), "openvino-bf16", available=everything).key == "openvino-bf16"
    # a key is an explicit choice: taken even when its agreement failed
    assert select(_all(int8_passed=False), "openvino-int8", available=everything).key == "openvino-int8"
    # a runtime name: its fastest entry that passed
    assert select(_all(int8_passed=False), "openvino", available=everything).key == "openvino-bf16"
    assert select(_all(), "auto", available=everything).key == "openvino-int8"
    with pytest.raises(RuntimeSelectionError, match="not in this artifact"):
        select(TF_ONLY, "openvino", available=everything)
    with pytest.raises(RuntimeSelectionError, match="not installed"):
        select(_all(), "openvino-int8", available=only("tf"))


def test_environment_variable(monkeypatch):
    monkeypatch.setenv(runtimes.RUNTIME_ENV, "openvino-bf16")
    assert select(_all(), available=everything).key == "openvino-bf16"
    assert select(_all(), "tf", available=everything).key == "tf"  # the argument wins
    monkeypatch.setenv(runtimes.RUNTIME_ENV, "")
    assert select(_all(), available=everything).key == "openvino-int8"


def test_worker_environment_names_the_runtime():
    from worker.settings import WorkerEnvironment

    assert WorkerEnvironment.from_env({}).runtime == "auto"
    assert WorkerEnvironment.from_env({"DOGBREEDS_RUNTIME": "tf"}).runtime == "tf"


def test_serving_threads_follow_dogbreeds_threads_then_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 5, 7}, raising=False)
    monkeypatch.setenv(runtimes.THREADS_ENV, "3")
    assert runtimes.serving_threads() == 3
    monkeypatch.setenv(runtimes.THREADS_ENV, "0")
    assert runtimes.serving_threads() == 1  # never zero threads
    monkeypatch.delenv(runtimes.THREADS_ENV)
    # a worker pinned to 3 of a machine's 64 CPUs (taskset, a cpuset container) runs 3 threads
    assert runtimes.serving_threads() == 3
    monkeypatch.delattr(os, "sched_getaffinity")  # no affinity API (macOS): the CPU count
    assert runtimes.serving_threads() == 64


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity API on this platform")
def test_serving_threads_see_a_real_cpu_affinity(monkeypatch):
    monkeypatch.delenv(runtimes.THREADS_ENV, raising=False)
    allowed = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(allowed)})  # this thread only, restored below
        assert runtimes.serving_threads() == 1
    finally:
        os.sched_setaffinity(0, allowed)
    assert runtimes.serving_threads() == len(allowed)


def test_fallback_cascade_reruns_only_the_close_calls():
    primary_out = np.array([[0.90, 0.05, 0.05], [0.50, 0.49, 0.01], [0.20, 0.30, 0.50], [0.34, 0.33, 0.33]], np.float32)
    seen = []

    def primary(x):
        return primary_out[: len(x)].copy()

    def secondary(x):
        seen.append(x[:, 0, 0, 0].tolist())
        return np.tile(np.array([[0.0, 0.0, 1.0]], np.float32), (len(x), 1))

    np.testing.assert_allclose(runtimes.top2_margin(primary_out), [0.85, 0.01, 0.2, 0.01], atol=1e-6)
    run = runtimes.with_fallback(primary, secondary, below_margin=0.05)
    x = np.arange(4, dtype=np.float32)[:, None, None, None] * np.ones((4, 2, 2, 3), np.float32)
    out = run(x)
    assert seen == [[1.0, 3.0]]  # only rows 1 and 3, in one call
    assert out.argmax(1).tolist() == [0, 2, 2, 2]
    assert (run.calls, run.fallbacks) == (4, 2)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(2, 5), st.floats(0, 0.6), st.booleans(), st.floats(0, 0.3), st.integers(0, 2**31))
def test_the_cascade_is_the_primary_with_the_secondary_on_the_fallback_rows(n, breeds, margin, dog, dog_margin, seed):
    """Publishing composes the cascade's outputs as np.where(fallback_rows, secondary, primary):
    that must be exactly what running with_fallback gives, rows, dog score and counts."""
    rng = np.random.default_rng(seed)
    width = breeds + (1 if dog else 0)
    primary_out = rng.dirichlet(np.ones(width), n).astype(np.float32)
    primary_out[rng.random(n) < 0.3, :2] = 0.4  # exact ties and near ties
    secondary_out = rng.random((n, width)).astype(np.float32)
    kwargs = {"breed_columns": breeds if dog else None, "dog_threshold": 0.5 if dog else None, "dog_margin": dog_margin}
    cascade = runtimes.with_fallback(lambda x: primary_out[x[:, 0, 0, 0].astype(int)].copy(),
                                     lambda x: secondary_out[x[:, 0, 0, 0].astype(int)].copy(), margin, **kwargs)
    x = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((n, 1, 1, 3), np.float32)
    rows = runtimes.fallback_rows(primary_out, margin, **kwargs)
    np.testing.assert_array_equal(cascade(x), np.where(rows[:, None], secondary_out, primary_out))
    assert cascade.fallbacks == int(rows.sum())


def test_fallback_margin_is_a_quantile_of_the_margin_shift():
    from trainer.fast_runtimes import fallback_margin

    reference = np.array([[0.6, 0.3, 0.1]] * 100, np.float32)
    shifted = reference.copy()
    shifted[:, 0] -= np.linspace(0, 0.1, 100)  # margin shifts of 0 .. 0.1
    assert fallback_margin(reference, shifted, quantile=0.5) == pytest.approx(0.051, abs=0.002)
    assert fallback_margin(reference, reference) == 0.0


# --------------------------------------------------------------------------- conversion + artifact



def test_publish_records_variants_with_measured_agreement(fast_colour_artifact):
    from worker.artifact import verify_artifact

    manifest = verify_artifact(fast_colour_artifact)
    assert manifest.runtimes["tf"] == {"path": "model", "precision": "fp32"}  # unchanged contract
    for precision in ("int8", "bf16"):
        entry = manifest.runtimes[f"openvino-{precision}"]
        assert entry["runtime"] == "openvino" and entry["precision"] == precision
        assert entry["path"] == f"model-openvino-{precision}/model.xml"
        assert {f"model-openvino-{precision}/model.xml", f"model-openvino-{precision}/model.bin"} <= set(manifest.files)
        agreement = entry["agreement"]
        assert agreement["photos"] == 30 and agreement["threshold"] == 0.99
        assert agreement["top1_agreement"] >= 0.99 and agreement["passed"] is True
        assert agreement["top1"] >= agreement["fp32_top1"] - 0.005
        low, high = agreement["top1_agreement_95"]  # the Wilson interval of what 30 photos can tell
        assert 0.85 < low < agreement["top1_agreement"] <= high <= 1.0
    fallback = manifest.runtimes["openvino-int8"]["fallback"]  # the int8 entry is an int8 -> bf16 cascade
    assert fallback["path"] == "model-openvino-bf16/model.xml" and fallback["precision"] == "bf16"
    assert 0.0 <= fallback["below_margin"] < 0.5 and 0.0 <= fallback["heldout_fallback_rate"] <= 1.0
    assert manifest.runtimes["openvino-int8"]["int8_only_agreement"]["photos"] == 30
    quantization = manifest.runtimes["openvino-int8"]["quantization"]
    assert quantization["calibration_photos"] == 60
    xml = (fast_colour_artifact / "model-openvino-int8" / "model.xml").read_text()
    assert "FakeQuantize" in xml  # really quantised


@pytest.mark.parametrize("rule", ["every_row", "no_row"])
def test_publish_composes_the_cascade_from_the_variants_it_measured(fast_colour_artifact, tmp_path, monkeypatch, rule):
    """The cascade's recorded agreement is composed from the int8 and bf16 passes, row by row
    with the worker's rule: re-running every row must record exactly bf16's agreement, none
    exactly plain int8's."""
    from trainer import fast_runtimes

    monkeypatch.setattr(runtimes, "fallback_rows", lambda out, *a, **k: np.full(len(out), rule == "every_row"))
    x, _ = colour_data(20)
    heldout, labels = colour_data(10, seed0=100)
    heldout, labels = heldout[labels != 1], labels[labels != 1]  # int8 right on half of them, bf16 on none

    def fake_variant(xml, precision, threads=None):  # int8 answers breed 0, bf16 breed 1: told apart in the record
        return lambda batch: np.eye(len(COLOUR_BREEDS), dtype=np.float32)[[0 if precision == "int8" else 1] * len(batch)]

    monkeypatch.setattr(runtimes, "load_openvino_model", fake_variant)
    _, entries = fast_runtimes.build_openvino_variants(fast_colour_artifact / "model", tmp_path, calibration=x,
                                                       heldout=heldout, heldout_labels=labels, threads=1,
                                                       progress=False)
    cascade, int8_only = entries["openvino-int8"]["agreement"], entries["openvino-int8"]["int8_only_agreement"]
    assert entries["openvino-int8"]["fallback"]["heldout_fallback_rate"] == (1.0 if rule == "every_row" else 0.0)
    bf16 = entries["openvino-bf16"]["agreement"]
    assert int8_only["top1_agreement"] != bf16["top1_agreement"]
    if rule == "every_row":
        assert cascade == bf16
    else:
        assert {k: cascade[k] for k in int8_only} == int8_only


def test_openvino_leaves_thread_placement_to_the_os(fast_colour_artifact):
    """OpenVINO pins stream threads to cores counting from the first it may use, so two one-thread
    pollers on one host both ran on core 0 (benchmarks/fleet.py: 2 pollers no faster than 1)."""
    predict = runtimes.load_openvino_model(fast_colour_artifact / "model-openvino-int8" / "model.xml", "int8", threads=1)
    assert predict._compiled.get_property("ENABLE_CPU_PINNING") is False


def _int8_weights(op) -> bool:
    """Whether a Convolution/MatMul runs int8: weights Constant(i8) -> Convert -> Multiply(scale)."""
    import openvino as ov

    node = op.input_value(1).get_node()
    while node.get_type_name() in ("Multiply", "Convert", "Subtract"):
        node = node.input_value(0).get_node()
    return node.get_type_name() == "Constant" and node.get_element_type() == ov.Type.i8


def _int8_layers(model) -> tuple[list[bool], list[bool]]:
    ops = model.get_ordered_ops()
    return ([_int8_weights(op) for op in ops if op.get_type_name() == "Convolution"],
            [_int8_weights(op) for op in ops if op.get_type_name() == "MatMul"])


def _quantized_ops(model) -> set[str]:
    """Names of the ops that take a FakeQuantize'd input (run in int8)."""
    return {op.get_friendly_name() for op in model.get_ordered_ops()
            if any(i.get_source_output().get_node().get_type_name() == "FakeQuantize" for i in op.inputs())}


def test_int8_ir_keeps_the_pooling_and_dense_head_in_float(fast_colour_artifact):
    import openvino as ov

    from trainer.fast_runtimes import after_last_convolution, quantize_int8

    model = ov.Core().read_model(str(fast_colour_artifact / "model-openvino-int8" / "model.xml"))
    assert _int8_layers(model) == ([True, True], [False, False])  # convolutions int8, dense head float
    # nothing after the last convolution reads a quantised tensor: GeM cubes its input, and a
    # per-tensor int8 grid over cubed activations zeroes most of them (VGG16 + GeM: 90.1% top-1
    # agreement with fp32 when the pooling was quantised, 99.5% without; see trainer.fast_runtimes)
    tail = after_last_convolution(model)
    assert {op.get_type_name() for op in model.get_ordered_ops() if op.get_friendly_name() in tail} >= {"Power", "ReduceMean", "MatMul"}
    assert _quantized_ops(model) & set(tail) == set()
    assert _quantized_ops(model) & {op.get_friendly_name() for op in model.get_ordered_ops()
                                    if op.get_type_name() == "Convolution"}  # the convolutions do read int8
    # optionally the first convolution (it sees raw pixels) stays in float too
    calibration, _ = colour_data(4)
    fresh = ov.convert_model(str(fast_colour_artifact / "model"))
    both = quantize_int8(fresh, calibration, keep_float=("head", "first_conv"))
    assert _int8_layers(both) == ([False, True], [False, False])
    # without keep_float the pooling is quantised: the test above can fail
    nothing_kept = quantize_int8(ov.convert_model(str(fast_colour_artifact / "model")), calibration, keep_float=())
    assert _quantized_ops(nothing_kept) & set(after_last_convolution(nothing_kept))


def test_tampered_variant_is_refused(fast_colour_artifact, tmp_path):
    import shutil

    from worker.artifact import ArtifactError, verify_artifact

    copy = tmp_path / "copy"
    shutil.copytree(fast_colour_artifact, copy)
    with open(copy / "model-openvino-int8" / "model.bin", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ArtifactError, match="model-openvino-int8/model.bin: sha256 mismatch"):
        verify_artifact(copy)
    # a runtimes entry pointing at an unlisted file is refused too
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["runtimes"]["bogus"] = {"runtime": "openvino", "path": "nowhere/model.xml", "precision": "int8"}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="'bogus' path 'nowhere/model.xml' is not listed"):
        verify_artifact(copy)


def test_classifier_serves_each_runtime_and_they_agree(fast_colour_artifact, monkeypatch):
    from worker.classifier import Classifier

    monkeypatch.delenv(runtimes.RUNTIME_ENV, raising=False)
    photos, labels = colour_data(5, seed0=300)
    tops = {}
    for runtime in ("auto", "tf", "openvino-bf16", "openvino"):
        classifier = Classifier.load(str(fast_colour_artifact), top_k=2, runtime=runtime)
        tops[classifier.model_info["runtime"]] = [t[0].breed for t in classifier.classify(photos)]
        probs = classifier.artifact.predict(photos.astype(np.float32))
        assert probs.shape == (len(photos), 3) and np.allclose(probs.sum(1), 1, atol=1e-3)
    assert set(tops) == {"openvino-int8", "tf", "openvino-bf16"}  # auto and "openvino" -> int8
    assert tops["openvino-int8"] == tops["tf"] == tops["openvino-bf16"]
    cascade = Classifier.load(str(fast_colour_artifact), runtime="openvino-int8").artifact.predict._inner
    assert cascade.below_margin == json.loads((fast_colour_artifact / "manifest.json").read_text())[
        "runtimes"]["openvino-int8"]["fallback"]["below_margin"]
    assert Classifier.load(str(fast_colour_artifact), runtime="tf").artifact.predict(
        np.zeros((0, SIZE, SIZE, 3), np.float32)).shape == (0, 3)


def test_tf_runtime_runs_micro_batches_with_the_same_answers(fast_colour_artifact, monkeypatch):
    from worker.artifact import read_manifest

    manifest = read_manifest(fast_colour_artifact)
    entry = select(manifest.runtimes, "tf")
    import tensorflow as tf

    x, _ = colour_data(4)  # 12 photos
    outputs, calls = {}, []
    constant = tf.constant

    def counted_constant(value, *args, **kwargs):  # each TensorFlow call gets its input through tf.constant
        calls.append(len(value))
        return constant(value, *args, **kwargs)

    monkeypatch.setattr(tf, "constant", counted_constant)
    for micro, expected_calls in (("5", [5, 5, 2]), ("64", [12])):
        monkeypatch.setenv("DOGBREEDS_TF_MICRO_BATCH", micro)
        predict = runtimes.load(fast_colour_artifact, entry, input_size=manifest.input_size, num_classes=3)
        assert predict._inner.micro_batch == int(micro)
        calls.clear()
        outputs[micro] = predict(x.astype(np.float32))
        assert calls == expected_calls
    assert outputs["5"].shape == (12, 3)
    np.testing.assert_allclose(outputs["5"], outputs["64"], rtol=1e-5, atol=1e-6)
    monkeypatch.delenv("DOGBREEDS_TF_MICRO_BATCH")
    assert runtimes.tf_micro_batch() == 4


def test_cli_predict_runtime_option(fast_colour_artifact, tmp_path):
    from click.testing import CliRunner

    from worker.cli import main

    for seed, folder in enumerate(COLOUR_BREEDS):
        (tmp_path / f"{seed}.jpg").write_bytes(colour_photo(COLOUR_BREEDS[folder], seed=500 + seed))
    result = CliRunner().invoke(main, ["predict", "--model", str(fast_colour_artifact), "--runtime", "openvino-int8", "--json",
                                       str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["breed"] for r in rows] == [f.split("-", 1)[1] for f in COLOUR_BREEDS]
    bad = CliRunner().invoke(main, ["predict", "--model", str(fast_colour_artifact), "--runtime", "onnx", str(tmp_path)])
    assert bad.exit_code == 1 and "not in this artifact" in bad.output  # a one-line refusal, not a traceback
    assert "Traceback" not in bad.output


BLOCK_TENSORFLOW = """
import sys, importlib.abc

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('tensorflow', 'keras', 'tf_keras', 'trainer'):
            raise ImportError(f'blocked import of {name} (worker-lite has no TensorFlow)')
        return None

sys.meta_path.insert(0, Block())
"""


def test_worker_serves_the_fast_runtime_without_tensorflow(fast_colour_artifact, tmp_path):
    """The worker modules import TensorFlow only for the tf runtime: with every import of
    tensorflow/keras failing, the worker still loads the artifact and classifies with OpenVINO."""
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(colour_photo(COLOUR_BREEDS["n02111889-Samoyed"], seed=7))
    code = BLOCK_TENSORFLOW + f"""
import json
import worker.cli, worker.handler, worker.jobs, worker.poller, worker.pipeline, worker.runtimes
from worker import images, runtimes
from worker.classifier import Classifier

assert not runtimes.is_available('tf') and runtimes.is_available('openvino')  # as in a worker-lite install
classifier = Classifier.load({str(fast_colour_artifact)!r}, top_k=1)
pixels = images.read_image_file({str(photo)!r}, size=classifier.input_size)[None]
top = classifier.classify(pixels)[0][0]
try:
    Classifier.load({str(fast_colour_artifact)!r}, runtime='tf')
    tf_error = None
except Exception as error:
    tf_error = type(error).__name__
loaded = sorted({{m.split('.')[0] for m in sys.modules}} & {{'tensorflow', 'keras', 'trainer'}})
print(json.dumps({{"runtime": classifier.model_info["runtime"], "breed": top.breed, "loaded": loaded,
                   "tf_error": tf_error}}))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(runtimes.RUNTIME_ENV, None)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"runtime": "openvino-int8", "breed": "Samoyed", "loaded": [],
                      "tf_error": "RuntimeSelectionError"}
