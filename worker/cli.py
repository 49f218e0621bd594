"""``dogbreeds-worker``: classify dog photos with a published model artifact."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Label dog photos with a breed, using a model artifact published by dogbreeds-train.

    A model is a local artifact folder, a local registry folder <root>/<name> (its `latest`
    version), or s3://bucket/models/<name>[/<version>|/latest]. S3 endpoint and credentials come
    from the standard AWS environment (AWS_ENDPOINT_URL, AWS_PROFILE, ...)."""


def _photo_paths(paths: tuple[str, ...]) -> tuple[list[Path], bool]:
    from worker.images import IMAGE_SUFFIXES

    files, had_folder = [], False
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            had_folder = True
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)
    return files, had_folder


@main.command()
@click.option("--model", "model_uri", envvar="DOGBREEDS_MODEL", required=True,
              help="Model artifact: folder, local registry <root>/<name>, or s3:// URI. Env: DOGBREEDS_MODEL.")
@click.argument("paths", nargs=-1, required=True)
@click.option("--top-k", type=int, default=3, show_default=True, help="Breeds shown per photo.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per photo (JSON Lines) instead of a table.")
def predict(model_uri, paths, top_k, batch_size, as_json):
    """Top-k breeds for photos or folders of photos. Unreadable files are reported per file
    (with their error code) and never stop the run."""
    from tqdm.auto import tqdm

    from worker.classifier import Classifier
    from worker.images import ImageDecodeError, load_image

    classifier = Classifier.load(model_uri, top_k=top_k)
    files, had_folder = _photo_paths(paths)
    results = []

    def flush(batch):
        if not batch:
            return
        tops = classifier.classify([pixels for _, pixels in batch])
        for (path, _), top in zip(batch, tops):
            emit({"path": str(path), "status": "ok", "breed": top[0].breed, "synset": top[0].synset,
                  "score": round(top[0].score, 4),
                  "top_k": [{"breed": t.breed, "synset": t.synset, "score": round(t.score, 4)} for t in top]})
        batch.clear()

    def emit(result):
        results.append(result)
        if as_json:
            click.echo(json.dumps(result))

    batch = []
    for path in tqdm(files, desc="classify", unit="img", disable=not had_folder or as_json, file=sys.stderr):
        try:
            batch.append((path, load_image(path.read_bytes(), size=classifier.input_size)))
        except ImageDecodeError as error:
            emit({"path": str(path), "status": "error", "error_code": error.code, "error_message": error.message})
        except OSError as error:
            emit({"path": str(path), "status": "error", "error_code": "unreadable_file", "error_message": str(error)})
        if len(batch) >= batch_size:
            flush(batch)
    flush(batch)
    if not as_json:
        _print_table(results, top_k)
    errors = sum(r["status"] == "error" for r in results)
    if errors and not as_json:
        click.echo(f"{errors} of {len(results)} photos could not be classified", err=True)


def _print_table(results: list[dict], top_k: int) -> None:
    width = max([len(r["path"]) for r in results] + [4])
    click.echo(f"{'photo'.ljust(width)}  {'breed':<28} {'score':>6}  others")
    for r in results:
        if r["status"] == "ok":
            others = ", ".join(f"{t['breed']} {t['score']:.2f}" for t in r["top_k"][1:top_k])
            click.echo(f"{r['path'].ljust(width)}  {r['breed']:<28} {r['score']:>6.2f}  {others}")
        else:
            click.echo(f"{r['path'].ljust(width)}  ERROR {r['error_code']}: {r['error_message']}")


if __name__ == "__main__":
    main()
