"""``dogbreeds-train``: analyse a dataset, tune, fit, evaluate and publish breed classifiers."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import click

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MODEL_CHOICES = ["vgg16_transfer", "vgg16_finetune", "efficientnet_lite0_transfer", "efficientnet_lite0_finetune",
                 "efficientnet_lite0_imagenet_head", "efficientnet_lite0_vgg16_transfer",
                 "efficientnet_lite0_vgg16_imagenet_head", "vgg16_scratch_0", "vgg16_scratch_1"]
PREPROCESSING = ["vgg", "equalize+vgg", "seed"]
# what the cross-validated selection on the 11 breeds' training photos picked (benchmarks/selection.py,
# benchmarks/accuracy.py --steps; never the test split or the outside photos)
DEFAULT_MODEL = "efficientnet_lite0_imagenet_head"
DEFAULT_IMAGE_SIZE = 320


def data_options(command):
    """Options shared by every command that reads a dataset and splits it."""
    options = [
        click.argument("data"),
        click.option("--model", "model", type=click.Choice(MODEL_CHOICES), default=DEFAULT_MODEL, show_default=True,
                     help="Model family (hyper-model) to build. The default is the family 5-fold cross-validation "
                          "on the training photos picked (README, Benchmarks); it needs breed folders named after "
                          "ImageNet-1k synsets (every Stanford Dogs breed is one): use efficientnet_lite0_transfer "
                          "for other breeds."),
        click.option("--preprocessing", type=click.Choice(PREPROCESSING), default="vgg", show_default=True,
                     help="vgg: the backbone's own normalisation; equalize+vgg: histogram equalisation first; "
                          "seed: equalise + [0,1] as in the original design."),
        click.option("--weights", default="auto", show_default=True,
                     help="Backbone weights: auto (Keras ImageNet file if cached, else packaged ImageNet weights), "
                          "imagenet, none (random), or a path / s3:// URI to a weights file."),
        click.option("--split-file", type=click.Path(exists=True, dir_okay=False),
                     help="TSV/CSV with relative_path and a split column (train/val/test), or a saved split.json. "
                          "Default: a seeded stratified split."),
        click.option("--split-column", default="stanford_split", show_default=True, help="Split column of --split-file."),
        click.option("--val-fraction", type=float, default=0.15, show_default=True,
                     help="Share of the photos held out for validation (early stopping, calibration, the dog "
                          "check's threshold) when there is no --split-file."),
        click.option("--test-fraction", type=float, default=0.15, show_default=True,
                     help="Only for the stratified split."),
        click.option("--breeds", help="Comma-separated breed folders or synsets to keep (default: all)."),
        click.option("--min-photos", type=int, default=0, show_default=True,
                     help="Keep only breeds with at least this many photos."),
        click.option("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, show_default=True,
                     help="Model input size (320 chosen by cross-validation against 224 for ImageNet backbones; "
                          "smaller makes scratch models affordable)."),
        click.option("--fit", "image_fit", type=click.Choice(["crop", "squash"]), default="crop", show_default=True,
                     help="How a photo becomes image-size x image-size: crop (aspect kept, the centre cut out; the "
                          "README's accuracy benchmark compares both) or squash (the whole photo, distorted, as the "
                          "original design). Recorded in the artifact; the worker resizes the same way."),
        click.option("--augment-copies", type=int, default=2, show_default=True,
                     help="Augmented copies of each training photo (cached features) for feature families."),
        click.option("--augmentation", type=click.Choice(["default", "strong"]), default="default", show_default=True,
                     help="How the augmented copies are made: default (mild rotation, shift, zoom, contrast, flip) or "
                          "strong (larger zoom in and out, shifts and contrast)."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the split, the augmentation and the weights' initialisation."),
        click.option("--cache-dir", type=click.Path(file_okay=False), help="Feature cache (default ~/.cache/dogbreeds)."),
    ]
    return functools.reduce(lambda cmd, option: option(cmd), reversed(options), command)


def make_config(data, *, model, preprocessing, weights, split_file, split_column, val_fraction, test_fraction, breeds,
                min_photos, image_size, image_fit, augment_copies, augmentation, seed, cache_dir, **extra):
    from trainer.experiment import RunConfig

    return RunConfig(data=data, model=model, preprocessing=preprocessing, weights=weights, split_file=split_file,
                     split_column=split_column, val_fraction=val_fraction, test_fraction=test_fraction,
                     breeds=breeds.split(",") if breeds else None, min_photos=min_photos, image_size=image_size,
                     image_fit=image_fit,
                     augment_copies=augment_copies, augmentation=augmentation, seed=seed, cache_dir=cache_dir, **extra)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Train dog breed classifiers (Stanford Dogs layout: DATA/<synset>-<Breed>/*.jpg).

    Typical flow: analyze -> tune (optional) -> fit -> publish. DATA is a local folder or
    s3://bucket/prefix; S3 endpoints and credentials come from the standard AWS environment
    (AWS_ENDPOINT_URL, AWS_PROFILE, ...)."""


@main.command()
@click.argument("data")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="analysis", show_default=True,
              help="Folder for report.json and the PNG plots.")
@click.option("--seed", type=int, default=0, show_default=True, help="Which sample photos the sheets show.")
def analyze(data, out_dir, seed):
    """Count photos per breed, sizes, colour modes and unreadable files; write report.json and
    plots (sizes, per-breed counts, preprocessing and augmentation sheets)."""
    from trainer import data as datasets
    from trainer.report import write_analysis

    dataset = datasets.find_dataset(data)
    report = datasets.analyze(dataset)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = write_analysis(dataset, report, out, seed)
    (out / "report.json").write_text(json.dumps({k: v for k, v in report.items()}, indent=1))
    s = report["size_summary"]
    click.echo(f"{report['photos']} photos, {report['breeds']} breeds "
               f"({report['per_breed_summary']['min']}-{report['per_breed_summary']['max']} per breed)")
    click.echo(f"width median {s['width']['median']:.0f} (min {s['width']['min']}, max {s['width']['max']}), "
               f"height median {s['height']['median']:.0f}")
    click.echo(f"colour modes: {report['modes']}; formats: {report['formats']}")
    click.echo(f"unreadable: {len(report['unreadable'])}")
    for item in report["unreadable"][:20]:
        click.echo(f"  {item['path']}: {item['code']} ({item['message']})")
    click.echo(f"wrote {out / 'report.json'} and " + ", ".join(str(p) for p in files.values()))


@main.command()
@data_options
@click.option("--run-dir", type=click.Path(file_okay=False), default="runs/latest", show_default=True,
              help="Where the run is saved (model, split, history, curves, evaluation). Re-running resumes.")
@click.option("--hp", "hp_file", type=click.Path(exists=True, dir_okay=False),
              help="JSON of hyper-parameters (e.g. best_hyperparameters.json from `tune`); defaults otherwise.")
@click.option("--set", "hp_set", multiple=True, metavar="NAME=VALUE", help="Set one hyper-parameter (repeatable).")
@click.option("--epochs", type=int, default=60, show_default=True,
              help="Most epochs of the first phase (early stopping usually ends it sooner).")
@click.option("--fine-tune-epochs", type=int, default=20, show_default=True,
              help="Second phase (the *_finetune families).")
@click.option("--patience", type=int, default=6, show_default=True, help="Early stopping patience (epochs).")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Photos per training step.")
@click.option("--flip-tta/--no-flip-tta", default=False, show_default=True,
              help="Horizontal-flip test-time augmentation: the published model answers the mean of its answers on "
                   "the photo and on its mirror image (inside the model, so every runtime does it; twice the "
                   "compute per photo). Evaluation uses it too.")
@click.option("--not-dogs", type=click.Path(exists=True, file_okay=False),
              help="A folder of photos WITHOUT a dog (cats, objects, scenes; any depth) for the dog check. "
                   "Default: DATA/not-dogs/ when it exists. Split by file path into fit (40%), val (20%, chooses "
                   "the threshold) and test (40%, measured only).")
@click.option("--dog-check", type=click.Choice(["auto", "dog-head", "imagenet-dog-mass", "none"]), default="auto",
              show_default=True,
              help="How the served model tells whether a photo shows a dog. auto = dog-head: a logistic dog/not-dog "
                   "head on the model's own pooled features (needs not-dog photos); imagenet-dog-mass: "
                   "EfficientNet-Lite0's ImageNet head, its probability mass on the dog classes (Lite0 models); "
                   "none: every photo gets a breed.")
@click.option("--progress", type=click.Choice(["auto", "bar", "lines"]), default="auto", show_default=True,
              help="How epochs are shown: one progress bar per phase with the last loss/accuracy (bar), one "
                   "line per epoch (lines, Keras verbose=2), or auto: bar on a terminal, lines otherwise.")
def fit(run_dir, hp_file, hp_set, epochs, fine_tune_epochs, patience, batch_size, flip_tta, not_dogs, dog_check,
        progress, **options):
    """Fit a model with early stopping and the best checkpoint, then evaluate it on the test
    split (evaluation.json, confusion.png, mistakes.png, curves.png in --run-dir); calibrate
    its scores on the validation split (calibration.png) and fit its dog check."""
    from trainer.experiment import fit_run
    from trainer.models import NotImageNetBreeds

    hyperparameters = _hyperparameters(hp_file, hp_set)
    config = make_config(epochs=epochs, fine_tune_epochs=fine_tune_epochs, patience=patience, batch_size=batch_size,
                         hyperparameters=hyperparameters, flip_tta=flip_tta, not_dogs=not_dogs, dog_check=dog_check,
                         **options)
    from trainer.progress import resolve_progress

    try:
        run = fit_run(config, Path(run_dir), verbose="bar" if resolve_progress(progress) == "bar" else 2)
    except NotImageNetBreeds as error:
        raise click.UsageError(f"{error} (--model {config.model}); choose another --model, e.g. "
                               f"efficientnet_lite0_transfer") from error
    m = run["metrics"]["test"]
    click.echo(f"test: top-1 {m['top1']:.1%}, top-5 {m['top5']:.1%}, loss {m['loss']:.3f} on {m['photos']} photos "
               f"({run['seconds']})")
    cal = run.get("calibration") or {}
    if cal:
        click.echo(f"calibration: T = {cal['temperature']}, test ECE {cal['test']['ece_before']:.1%} -> "
                   f"{cal['test']['ece_after']:.1%}")
    check = run.get("dog_check") or {}
    if check:
        test = check.get("test") or check["val"]
        groups = ", ".join(f"{g} {v['no_dog']:.0%} of {v['photos']}" for g, v in test["not_dogs"].items())
        click.echo(f"dog check ({check['method']}, threshold {check['threshold']}): no_dog on not-dog photos: "
                   f"{groups}; dogs lost {test['dogs_lost']:.1%} of {test['dogs']}")
    else:
        from trainer.publish import no_dog_check_caveat

        click.echo(f"dog check: NONE. {no_dog_check_caveat(run)}")
    click.echo(f"run saved in {run_dir}")


def _hyperparameters(hp_file, hp_set) -> dict:
    values = {}
    if hp_file:
        loaded = json.loads(Path(hp_file).read_text())
        values.update(loaded.get("best_hyperparameters", loaded))
    for item in hp_set:
        name, _, raw = item.partition("=")
        try:
            values[name] = json.loads(raw)
        except json.JSONDecodeError:
            values[name] = raw
    return values


@main.command()
@data_options
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="runs/tuning", show_default=True,
              help="Folder for the search's trials (trials.jsonl) and best_hyperparameters.json; a rerun "
                   "resumes it unless --overwrite.")
@click.option("--tuner", type=click.Choice(["random", "hyperband", "bayesian"]), default="random", show_default=True,
              help="Keras Tuner search: random, hyperband (successive halving of epochs) or bayesian "
                   "(Gaussian-process guided).")
@click.option("--max-trials", type=int, default=20, show_default=True, help="Trial budget (random, bayesian).")
@click.option("--epochs", type=int, default=30, show_default=True, help="Epochs per trial (hyperband: max epochs).")
@click.option("--overwrite/--resume", default=False, show_default=True, help="Start over or resume a search.")
@click.option("--cv-folds", type=int, default=0, show_default=True,
              help="Score each trial by k-fold cross-validation on the training photos (k >= 2; feature families, "
                   "random or bayesian tuner) instead of one fit scored on the validation split.")
def tune(out_dir, tuner, max_trials, epochs, overwrite, cv_folds, **options):
    """Search hyper-parameters with Keras Tuner; writes trials.jsonl and best_hyperparameters.json
    (feed it to `fit --hp`). The test split is never looked at."""
    from trainer.experiment import prepare
    from trainer.tuning import tune as run_tune

    prepared = prepare(make_config(**options))
    summary = run_tune(prepared, Path(out_dir), kind=tuner, max_trials=max_trials, epochs=epochs, overwrite=overwrite,
                       cv_folds=cv_folds)
    click.echo(f"{summary['trials']} trials in {summary['seconds']}s; best score {summary['best_val_accuracy']} "
               f"({summary['objective']})")
    click.echo(json.dumps(summary["best_hyperparameters"], indent=1))
    click.echo(f"wrote {Path(out_dir) / 'best_hyperparameters.json'}")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--data", help="Evaluate on another dataset folder (same breeds); default: the run's test split.")
def evaluate(run_dir, data):
    """Evaluate a fitted run on its test split: loss, top-1/top-5, per-breed accuracy,
    confusion matrix and misclassified photos."""
    import keras

    from trainer.experiment import evaluate_run, load_run, prepare

    run, config = load_run(Path(run_dir))
    config.split_file = str(Path(run_dir) / "split.json") if not data else config.split_file
    if data:
        config.data = data
    prepared = prepare(config)
    model = keras.models.load_model(Path(run_dir) / "model.keras", compile=False)
    result = evaluate_run(prepared, model, Path(run_dir))
    click.echo(f"top-1 {result.top1:.1%}, top-5 {result.top5:.1%}, loss {result.loss:.3f} on {result.photos} photos")
    worst = sorted(((v["top1"], k) for k, v in result.per_breed.items() if v["top1"] is not None))[:5]
    click.echo("weakest breeds: " + ", ".join(f"{k.split('-', 1)[1]} {v:.0%}" for v, k in worst))
    click.echo(f"wrote {Path(run_dir) / 'evaluation.json'}, confusion.png, mistakes.png")


def sign_key_option(command):
    """--sign-key (publish, imagenet-baseline)."""
    return click.option("--sign-key", envvar="DOGBREEDS_SIGN_KEY", metavar="KEY",
                        help="Sign the artifact (manifest.sig beside manifest.json, which lists every file's sha256 "
                             "and the dog check and calibration the model applies): a PEM private key file (Ed25519 "
                             "or ECDSA P-256; `dogbreeds-train keygen` makes one) or kms://<key id, alias/name or "
                             "ARN> (an AWS KMS ECC_NIST_P256 SIGN_VERIFY key; needs kms:Sign and kms:GetPublicKey). "
                             "Workers given the public key (DOGBREEDS_TRUSTED_KEY) refuse anything else. "
                             "Env: DOGBREEDS_SIGN_KEY.")(command)


def _signer(sign_key: str | None):
    """The signer of --sign-key (None: unsigned); a bad key is a one-line error."""
    if not sign_key:
        return None
    from trainer.signing import signer_from
    from worker.artifact import ArtifactError

    try:
        return signer_from(sign_key)
    except ArtifactError as error:
        raise click.ClickException(str(error)) from error


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--to", "destination", required=True,
              help="A local registry folder or s3://bucket/models: the artifact lands in <to>/<name>/<version>/ "
                   "and <to>/<name>/latest names it.")
@click.option("--name", default="dogbreeds", show_default=True, help="Model name.")
@click.option("--version", help="Version (default: a UTC timestamp).")
@click.option("--fast-runtimes/--tf-only", default=True, show_default=True,
              help="Also write OpenVINO int8 (calibrated on the training photos) and bf16 variants beside the "
                   "SavedModel, with their top-1 agreement with fp32 on the held-out photos. The worker serves "
                   "these data-only variants by default; a --tf-only artifact needs DOGBREEDS_ALLOW_SAVEDMODEL=1.")
@sign_key_option
def publish(run_dir, destination, name, version, fast_runtimes, sign_key):
    """Build the model artifact of a run (inference model with its preprocessing, labels,
    manifest with checksums, model card, plots), sign it with --sign-key, and publish it: the
    version is written once (a different artifact under the same version is refused) and `latest`
    moves to it unless it already names a newer version."""
    from trainer.publish import publish as do_publish

    signer = _signer(sign_key)
    where = do_publish(Path(run_dir), destination, name, version, fast_runtimes=fast_runtimes, signer=signer)
    click.echo(f"published {where}" + (f" (signed by {signer.key_id})" if signer else " (unsigned)"))


@main.command()
@click.argument("prefix", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite an existing key pair.")
def keygen(prefix, force):
    """Make an Ed25519 signing key pair: PREFIX.key (the private key, mode 600: give it to
    `publish --sign-key`, keep it off the workers) and PREFIX.pub (the public key: give it to the
    worker, --trusted-key / DOGBREEDS_TRUSTED_KEY). For production, an AWS KMS key
    (kms://<key>) keeps the private key out of reach altogether."""
    from trainer.signing import generate_key_pair

    try:
        private, public, key_id = generate_key_pair(Path(prefix), overwrite=force)
    except FileExistsError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"private key {private} (keep it secret), public key {public}, key id {key_id}")


@main.command("imagenet-baseline")
@click.option("--breeds", "breeds_file", type=click.Path(exists=True, dir_okay=False), required=True,
              help="Breed folders, one a line (<synset>-<Breed>, e.g. samples/breeds.txt): the artifact's labels.")
@click.option("--to", "destination", required=True,
              help="A local registry folder or s3://bucket/models (the artifact lands in <to>/<name>/<version>/).")
@click.option("--name", default="imagenet-baseline", show_default=True, help="Model name.")
@click.option("--version", help="Version (default: a UTC timestamp).")
@click.option("--image-size", type=int, default=320, show_default=True, help="Model input size (centre crops).")
@click.option("--photos", type=click.Path(exists=True, file_okay=False),
              help="Photos (any layout) to calibrate the OpenVINO int8 variant on and measure the variants' agreement "
                   "(half each). Without them only the TensorFlow model is published.")
@click.option("--fast-runtimes/--tf-only", default=True, show_default=True,
              help="Also write the OpenVINO int8 and bf16 variants (needs --photos), which the worker serves by "
                   "default; without them the artifact carries only the TensorFlow SavedModel, which a worker "
                   "serves only with DOGBREEDS_ALLOW_SAVEDMODEL=1 or --runtime tf.")
@sign_key_option
def imagenet_baseline(breeds_file, destination, name, version, image_size, photos, fast_runtimes, sign_key):
    """Publish the ImageNet baseline: EfficientNet-Lite0's ImageNet head restricted to the breeds'
    synsets, no training (the baseline every trained model must beat). Its dog check is the
    ImageNet softmax's mass on the dog classes; its scores are not recalibrated (T = 1). Signed
    with --sign-key like `publish`."""
    from trainer.baseline import publish_baseline

    signer = _signer(sign_key)
    where, manifest = publish_baseline(breeds_file, destination, name, version=version, image_size=image_size,
                                       photos=photos, fast_runtimes=fast_runtimes, signer=signer)
    click.echo(f"published {where}" + (f" (signed by {signer.key_id})" if signer else " (unsigned)"))
    if not any(key != "tf" for key in manifest.runtimes):
        click.echo("note: this artifact carries only the TensorFlow SavedModel (no --photos, or --tf-only), which "
                   "workers do not serve by default (data-only): serve it with DOGBREEDS_ALLOW_SAVEDMODEL=1 or "
                   "--runtime tf, or publish it again with --photos <folder> for its OpenVINO variants", err=True)


if __name__ == "__main__":
    main()
