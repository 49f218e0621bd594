"""Turn a finished run into a versioned model artifact (the contract of ``worker.artifact``):
the self-contained inference model (TF SavedModel, plus faster OpenVINO int8/bf16 variants with
their measured agreement, see trainer.fast_runtimes), labels, manifest, model card and plots; then copy it to a
local registry folder or upload it to ``s3://bucket/models/<name>/<version>/``, moving ``latest``."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import keras
import numpy as np

from trainer import models
from trainer import preprocessing as _registered_layers  # noqa: F401  (custom layers for keras.models.load_model)
from trainer.experiment import load_run
from worker import artifact, images

PLOTS = ("curves.png", "confusion.png", "mistakes.png")
log = logging.getLogger(__name__)


def inference_model(run_dir: Path) -> tuple[keras.Model, dict]:
    """Rebuild the inference model of a run: preprocessing -> frozen backbone part (same
    weights, checksum verified by the backbone loader) -> the trained part."""
    run, config = load_run(run_dir)
    family = models.get_family(run["family"])
    trained = keras.models.load_model(Path(run_dir) / "model.keras", compile=False)
    backbone = None
    if family.inputs == "features":
        backbone, weights = models.build_feature_backbones(family, config.weights,
                                                           (config.image_size, config.image_size, 3))
        if weights.get("sha256") != run["weights"].get("sha256"):
            raise RuntimeError(f"backbone weights differ from the run's: {weights.get('sha256')} != {run['weights'].get('sha256')}")
    model = models.assemble_inference_model(family, trained, backbone=backbone, preprocessing_choice=config.preprocessing,
                                            input_shape=(config.image_size, config.image_size, 3),
                                            flip_tta=config.flip_tta)
    return model, run


def model_card(run: dict, name: str) -> str:
    config, metrics, weights = run["config"], run["metrics"]["test"], run["weights"]
    hp = "\n".join(f"| {k} | {v} |" for k, v in sorted(run["hyperparameters"].items()))
    caveats = []
    if not weights.get("imagenet"):
        caveats.append("The backbone did NOT start from ImageNet weights: expect far lower accuracy.")
    if metrics["photos"] < 200:
        caveats.append(f"The test set is small ({metrics['photos']} photos): accuracy is a rough estimate.")
    if config["preprocessing"] == "seed":
        caveats.append("Preprocessing 'seed' (equalise + [0,1]) does not match the ImageNet backbone's input range.")
    caveats.append("Trained on Stanford Dogs photos (ImageNet): non-commercial research and education use. "
                   "A photo without a dog still gets a breed; scores are not calibrated probabilities of 'dog'.")
    return f"""# {name}: dog breed classifier

{models.get_family(run['family']).description}.

| | |
|---|---|
| model family | `{run['family']}` |
| backbone | `{run['backbone']}` |
| weights started from | {weights.get('kind')}: {weights.get('note', '')} (sha256 `{weights.get('sha256', '')[:16]}...`) |
| preprocessing | `{config['preprocessing']}` (inside the model: feed float32 RGB 0..255, {config['image_size']}x{config['image_size']}, resized with fit `{config.get('image_fit', images.LEGACY_FIT)}`) |
| breeds | {len(run['classes'])} |
| data | `{config['data']}` |
| split | {run['split']['method']}: train {run['split']['train']}, val {run['split']['val']}, test {run['split']['test']} |
| augmentation | {config['augment_copies']} augmented copies per training photo (rotation, flip, translation, zoom, contrast) |

## Metrics (test split)

| photos | loss | top-1 | top-5 |
|---|---|---|---|
| {metrics['photos']} | {metrics['loss']} | {metrics['top1']:.1%} | {metrics['top5']:.1%} |

## Hyper-parameters

| name | value |
|---|---|
{hp}

## Caveats

{chr(10).join('- ' + c for c in caveats)}

## Breeds

{', '.join(f.split('-', 1)[1].replace('_', ' ') for f in run['classes'])}
"""


def run_fit(run: dict) -> str:
    """The worker.images fit of a run (runs saved before image_fit existed squashed their photos)."""
    return run["config"].get("image_fit", images.LEGACY_FIT)


def _run_photos(run_dir: Path, run: dict, parts: tuple[str, ...], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decoded photos (uint8) and class indices of some split parts of a run (split.json +
    the run config's data folder or S3 prefix; unreadable photos are skipped)."""
    from trainer.data import DatasetIndex, Photo, load_photos

    split = json.loads((Path(run_dir) / "split.json").read_text())
    relative = [r for part in parts for r in split.get(part, [])]
    dataset = DatasetIndex(source=run["config"]["data"], classes=list(run["classes"]),
                           photos=[Photo(r, r.split("/", 1)[0]) for r in relative])
    loaded = load_photos(dataset, dataset.photos, size=(size, size), progress=False, fit=run_fit(run))
    return loaded.pixels, loaded.labels


def fast_runtime_variants(run_dir: Path, run: dict, saved_model_dir: Path, work_dir: Path,
                          heldout_parts: tuple[str, ...] = ("val", "test")) -> tuple[dict, dict]:
    """OpenVINO int8/bf16 variants (trainer.fast_runtimes) of the exported SavedModel: int8
    calibrated on the run's training photos; agreement with fp32 measured on its validation +
    test photos (``heldout_parts``). Returns (extra files, manifest runtimes entries); ({}, {}) when OpenVINO is
    not installed or the conversion fails (the artifact then serves with TensorFlow only)."""
    from trainer import fast_runtimes

    if not fast_runtimes.available():
        log.warning("openvino is not installed: publishing the TensorFlow model only")
        return {}, {}
    size = int(run["config"]["image_size"])
    try:
        calibration, _ = _run_photos(run_dir, run, ("train",), size)
        heldout, labels = _run_photos(run_dir, run, tuple(heldout_parts), size)
        if len(heldout) == 0:
            log.warning("no held-out photos to measure agreement on: publishing the TensorFlow model only")
            return {}, {}
        return fast_runtimes.build_openvino_variants(saved_model_dir, work_dir, calibration=calibration,
                                                     heldout=heldout, heldout_labels=labels,
                                                     heldout_split="+".join(heldout_parts))
    except Exception:  # noqa: BLE001 - a faster variant is optional; the SavedModel always ships
        log.exception("building the OpenVINO variants failed: publishing the TensorFlow model only")
        return {}, {}


def build_artifact(run_dir: Path, dest: Path, name: str, version: str | None = None,
                   fast_runtimes: bool = True, heldout_parts: tuple[str, ...] = ("val", "test")) -> artifact.ArtifactManifest:
    """Write the artifact of ``run_dir`` into the directory ``dest``: the SavedModel (runtime
    ``tf``) and, with ``fast_runtimes``, OpenVINO int8/bf16 variants beside it (their agreement
    with fp32 measured on the ``heldout_parts`` of the run's split)."""
    run_dir = Path(run_dir)
    model, run = inference_model(run_dir)
    labels = [artifact.Label.from_folder(i, folder) for i, folder in enumerate(run["classes"])]
    evaluation = json.loads((run_dir / "evaluation.json").read_text()) if (run_dir / "evaluation.json").exists() else {}
    input_size = [run["config"]["image_size"]] * 2
    fields = {
        "name": name,
        "backbone": run["backbone"],
        "weights": run["weights"],
        "input_size": input_size,
        "input_fit": run_fit(run),
        "preprocessing": run["config"]["preprocessing"],
        "metrics": {**run["metrics"], "per_breed": evaluation.get("per_breed", {})},
        "hyperparameters": run["hyperparameters"],
        "training": {"family": run["family"], "data": run["config"]["data"], "split": run["split"],
                     "phases": run["phases"], "seconds": run["seconds"], "config": run["config"]},
    }
    if version:
        fields["version"] = version
    extra = {f"plots/{p}": run_dir / p for p in PLOTS if (run_dir / p).exists()}
    extra["split.json"] = run_dir / "split.json"
    artifact._check_keras_model(model, num_classes=len(labels), input_size=input_size)
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".publish-", dir=Path(dest).parent) as tmp:
        saved = Path(tmp) / artifact.MODEL_DIR
        artifact.export_saved_model(model, saved)
        runtimes = {"tf": {"path": artifact.MODEL_DIR, "precision": "fp32"}}
        if fast_runtimes:
            files, entries = fast_runtime_variants(run_dir, run, saved, Path(tmp) / "variants", heldout_parts)
            extra.update(files)
            runtimes.update(entries)
        fields["runtimes"] = runtimes
        return artifact.write_artifact(Path(dest), model_dir=saved, labels=labels, manifest_fields=fields,
                                       model_card=model_card(run, name) + runtimes_card(runtimes), extra_files=extra)


def runtimes_card(runtimes: dict) -> str:
    rows = []
    for key, entry in runtimes.items():
        agreement = entry.get("agreement") or {}
        if key == "tf":
            rows.append(f"| `{key}` | `{entry['path']}` | {entry['precision']} | reference | |")
            continue
        verdict = "passed" if agreement.get("passed") else "FAILED (not used automatically)"
        rows.append(f"| `{key}` | `{entry['path']}` | {entry['precision']} | "
                    f"{agreement.get('top1_agreement', 0):.2%} on {agreement.get('photos', 0)} held-out photos | "
                    f"{verdict} |")
    return ("\n## Serving runtimes\n\nThe worker serves the fastest variant whose top-1 agreement with the fp32 "
            "SavedModel passed the threshold (`--runtime` / `DOGBREEDS_RUNTIME` override it).\n\n"
            "| key | path | precision | top-1 agreement with fp32 | |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def publish(run_dir: Path, destination: str, name: str, version: str | None = None, work_dir: Path | None = None,
            fast_runtimes: bool = True, signer=None) -> str:
    """Build the artifact and put it in a registry: a local folder or ``s3://bucket/prefix``.
    ``signer`` (trainer.signing): sign it (``manifest.sig``) before it leaves this machine.
    Returns where the new version lives."""
    version = version or artifact.new_version()
    staging = Path(work_dir or Path(run_dir) / "artifacts") / f"{name}-{version}"
    if not staging.exists():
        build_artifact(run_dir, staging, name, version, fast_runtimes=fast_runtimes)
    if signer is not None:
        from trainer.signing import sign_artifact

        sign_artifact(staging, signer)
    if destination.startswith("s3://"):
        return artifact.upload_artifact(staging, destination)
    return str(artifact.copy_to_local_registry(staging, Path(destination)))
