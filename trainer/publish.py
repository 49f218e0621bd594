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

from trainer import artifact_writer, models, registry, sampling
from trainer import preprocessing as _registered_layers  # noqa: F401  (custom layers for keras.models.load_model)
from trainer.experiment import load_run
from worker import artifact, images

PLOTS = ("curves.png", "confusion.png", "mistakes.png", "calibration.png")
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
    return served(model, run, run_dir), run


def served(model: keras.Model, run: dict, run_dir: Path) -> keras.Model:
    """The breed model wrapped into the served model (trainer.serving): calibrated breed
    scores and, when the run has a dog check, the dog score column. A run fitted before
    either existed is served as it was (a logged note)."""
    from trainer import scoring, serving

    temperature = float((run.get("calibration") or {}).get("temperature", 1.0))
    check = run.get("dog_check") or {}
    if not run.get("calibration"):
        log.warning("run %s has no calibration: its scores are published as they are (T = 1)", run_dir)
    if not check:
        log.warning("run %s has no dog check: every photo will get a breed", run_dir)
    head = scoring.load_dog_head(run_dir) if check.get("method") == "dog-head" else None
    return serving.served_model(model, temperature=temperature, dog_method=check.get("method"), dog_head=head,
                                backbone=run.get("backbone"))


def scoring_fields(run: dict, num_classes: int) -> dict:
    """manifest.json's ``dog_check`` and ``calibration`` of a run."""
    fields = {}
    check = run.get("dog_check") or {}
    if check:
        fields["dog_check"] = {**{k: v for k, v in check.items() if k not in ("fit",)}, "score_column": num_classes}
    if run.get("calibration"):
        cal = run["calibration"]
        fields["calibration"] = {"temperature": cal["temperature"], "method": cal["method"],
                                 "fitted_on": cal["fitted_on"], "applied": "inside the served model (every runtime)",
                                 "test": {k: cal["test"][k] for k in ("photos", "ece_before", "ece_after",
                                                                      "nll_before", "nll_after", "risk_coverage")}}
    return fields


def no_dog_check_caveat(run: dict) -> str:
    """Why a model has no dog check, for its card."""
    if models.get_family(run["family"]).inputs != "features":
        return ("This model has NO dog check: it was trained from scratch, with no frozen backbone whose pooled "
                "features a dog/not-dog head could read in the same forward pass, so a photo without a dog still "
                "gets a breed. Where such photos can arrive, serve a transfer model (or the ImageNet baseline, "
                "`dogbreeds-train imagenet-baseline`), which has one.")
    return ("This model has NO dog check (fitted with `--dog-check none` or without not-dog photos): a photo "
            "without a dog still gets a breed.")


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
    caveats.append("Trained on Stanford Dogs photos (ImageNet): non-commercial research and education use.")
    if not run.get("dog_check"):
        caveats.append(no_dog_check_caveat(run))
    caveats.append("The dog score is not a calibrated probability: only its threshold was chosen (on validation "
                   "photos); the breed scores are probabilities of the breed GIVEN a dog of these breeds.")
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

{scoring_card(run)}
## Hyper-parameters

| name | value |
|---|---|
{hp}

## Caveats

{chr(10).join('- ' + c for c in caveats)}

## Breeds

{', '.join(f.split('-', 1)[1].replace('_', ' ') for f in run['classes'])}
"""


def scoring_card(run: dict) -> str:
    """The model card's calibration (ECE, risk-coverage) and dog check sections."""
    out = []
    cal = run.get("calibration") or {}
    if cal:
        test = cal["test"]
        rows = "\n".join(f"| {r['min_score']:.2f} | {r['kept']:.1%} ({r['photos_kept']}) | "
                         f"{'-' if r['top1_of_kept'] is None else format(r['top1_of_kept'], '.1%')} |"
                         for r in test["risk_coverage"])
        out.append(f"""## Calibration

The breed scores are calibrated inside the model: `softmax(log p / T)` with T = {cal['temperature']}, fitted on
the {cal['fitted_on']}. Expected calibration error ({cal.get('ece_bins', 15)} bins) on the test split
({test['photos']} photos): {test['ece_before']:.1%} before, {test['ece_after']:.1%} after
(negative log-likelihood {test['nll_before']:.3f} -> {test['nll_after']:.3f}). Reliability diagram:
`plots/calibration.png`.

Risk-coverage on the test split: with `--min-score t`, photos whose best score is below t are answered
`uncertain` (for human review); the rest keep this top-1 accuracy.

| t | photos kept | top-1 of those kept |
|---|---|---|
{rows}
""")
    check = run.get("dog_check") or {}
    if check:
        lines = []
        for part in ("val", "test"):
            if check.get(part):
                m = check[part]
                groups = ", ".join(f"{g}: {v['no_dog']:.1%} of {v['photos']}" for g, v in m["not_dogs"].items())
                lines.append(f"| {part} | {m['dogs_lost']:.1%} of {m['dogs']} | {groups or '-'} |")
        out.append(f"""## Dog check

`{check['method']}`: {check.get('description', '')}. A photo whose dog score is below {check['threshold']} is
answered `no_dog` ({check.get('threshold_rule', '')}).

| photos | dogs answered no_dog | not-dogs answered no_dog |
|---|---|---|
{chr(10).join(lines)}
""")
    return "\n".join(out)


def run_fit(run: dict) -> str:
    """The worker.images fit of a run (runs saved before image_fit existed squashed their photos)."""
    return run["config"].get("image_fit", images.LEGACY_FIT)


def _run_photos(run_dir: Path, run: dict, parts: tuple[str, ...], size: int, limit: int | None = None,
                desc: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Decoded photos (uint8) and class indices of some split parts of a run (split.json +
    the run config's data folder or S3 prefix; unreadable photos are skipped), and how they were
    drawn: with ``limit``, a sample stratified by breed (trainer.sampling), chosen before
    anything is decoded."""
    from trainer.data import DatasetIndex, Photo, load_photos

    split = json.loads((Path(run_dir) / "split.json").read_text())
    relative = [r for part in parts for r in split.get(part, [])]
    chosen = relative if limit is None else sampling.stratified_sample(relative, limit)
    dataset = DatasetIndex(source=run["config"]["data"], classes=list(run["classes"]),
                           photos=[Photo(r, r.split("/", 1)[0]) for r in chosen])
    loaded = load_photos(dataset, dataset.photos, size=(size, size), progress=desc is not None, desc=desc or "decode",
                         fit=run_fit(run))
    return loaded.pixels, loaded.labels, sampling.sample_description(len(chosen), len(relative))


def _not_dog_photos(run: dict, size: int, calibration_photos: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Not-dog photos of the run's dog check (trainer.not_dogs split): up to
    ``calibration_photos`` of the fit part for the int8 calibration, the val and test parts to
    measure the variants' no-dog decisions. Empty arrays when the folder is not there."""
    from trainer import not_dogs

    split = (run.get("dog_check") or {}).get("not_dog_split") or {}
    empty = np.zeros((0, size, size, 3), np.uint8)
    folder = Path(split.get("source", ""))
    if not split or not folder.is_dir():
        return empty, empty
    parts = not_dogs.split_not_dogs(not_dogs.find_not_dogs(folder), str(folder))
    fit = run_fit(run)
    calibration, _ = not_dogs.load_pixels(folder, sorted(parts.fit, key=not_dogs.order)[:calibration_photos], size, fit, progress=False)
    heldout, _ = not_dogs.load_pixels(folder, parts.val + parts.test, size, fit, progress=False)
    return calibration, heldout


def fast_runtime_variants(run_dir: Path, run: dict, saved_model_dir: Path, work_dir: Path,
                          heldout_parts: tuple[str, ...] = ("val", "test"),
                          dog_threshold: float | None = None,
                          max_agreement_photos: int | None = sampling.MAX_AGREEMENT_PHOTOS) -> tuple[dict, dict]:
    """OpenVINO int8/bf16 variants (trainer.fast_runtimes) of the exported SavedModel: int8
    calibrated on (at most 300 of) the run's training photos, stratified by breed; agreement
    with fp32 measured on its validation + test photos (``heldout_parts``; a stratified sample
    of ``max_agreement_photos`` when there are more, its size and error bound recorded).
    Returns (extra files, manifest runtimes entries); ({}, {}) when OpenVINO is not installed or
    the conversion fails (the artifact then serves with TensorFlow only)."""
    from trainer import fast_runtimes

    if not fast_runtimes.available():
        log.warning("openvino is not installed: publishing the TensorFlow model only")
        return {}, {}
    size = int(run["config"]["image_size"])
    try:
        extra_calibration = extra_heldout = np.zeros((0, size, size, 3), np.uint8)
        if dog_threshold is not None:  # photos without a dog: int8 must see them and keep their decision
            extra_calibration, extra_heldout = _not_dog_photos(run, size)
        calibration, _, _ = _run_photos(run_dir, run, ("train",), size,
                                        limit=fast_runtimes.MAX_CALIBRATION - len(extra_calibration),
                                        desc="decode calibration photos")
        heldout, labels, sample = _run_photos(run_dir, run, tuple(heldout_parts), size,
                                              limit=max_agreement_photos, desc="decode held-out photos")
        calibration = np.concatenate([calibration, extra_calibration])
        heldout = np.concatenate([heldout, extra_heldout])
        labels = np.concatenate([labels, np.full(len(extra_heldout), -1, labels.dtype)])
        if len(heldout) == 0:
            log.warning("no held-out photos to measure agreement on: publishing the TensorFlow model only")
            return {}, {}
        return fast_runtimes.build_openvino_variants(saved_model_dir, work_dir, calibration=calibration,
                                                     heldout=heldout, heldout_labels=labels,
                                                     heldout_split="+".join(heldout_parts),
                                                     num_classes=len(run["classes"]), dog_threshold=dog_threshold,
                                                     sample=sample)
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
    labels = [artifact_writer.label_from_folder(i, folder) for i, folder in enumerate(run["classes"])]
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
        **scoring_fields(run, len(labels)),
    }
    if version:
        fields["version"] = version
    extra = {f"plots/{p}": run_dir / p for p in PLOTS if (run_dir / p).exists()}
    extra["split.json"] = run_dir / "split.json"
    artifact_writer.check_keras_model(model, num_classes=len(labels) + (1 if fields.get("dog_check") else 0),
                                input_size=input_size)
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".publish-", dir=Path(dest).parent) as tmp:
        saved = Path(tmp) / artifact.MODEL_DIR
        artifact_writer.export_saved_model(model, saved)
        runtimes = {"tf": {"path": artifact.MODEL_DIR, "precision": "fp32"}}
        if fast_runtimes:
            files, entries = fast_runtime_variants(run_dir, run, saved, Path(tmp) / "variants", heldout_parts,
                                                   dog_threshold=(fields.get("dog_check") or {}).get("threshold"))
            extra.update(files)
            runtimes.update(entries)
        fields["runtimes"] = runtimes
        return artifact_writer.write_artifact(Path(dest), model_dir=saved, labels=labels, manifest_fields=fields,
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
    version = version or artifact_writer.new_version()
    staging = Path(work_dir or Path(run_dir) / "artifacts") / f"{name}-{version}"
    if not staging.exists():
        build_artifact(run_dir, staging, name, version, fast_runtimes=fast_runtimes)
    if signer is not None:
        from trainer.signing import sign_artifact

        sign_artifact(staging, signer)
    if destination.startswith("s3://"):
        return registry.upload_artifact(staging, destination)
    return str(registry.copy_to_local_registry(staging, Path(destination)))
