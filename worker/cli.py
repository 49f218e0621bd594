"""``dogbreeds-worker``: classify dog photos with a published model artifact.

One click group for every command the worker offers (predict, classify, run, report, export);
each command only parses options and calls the module that does the work, so the length is
option declarations and their help text."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from worker.cli_options import EnvOption, setting_option

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-format", type=click.Choice(["auto", "json", "text"]), default="auto", show_default=True,
              envvar="DOGBREEDS_LOG_FORMAT", cls=EnvOption,
              help="Log lines: json (structured Powertools lines, what Lambda, containers and log shippers read), "
                   "text (one readable line each; also drops the CloudWatch EMF metric lines), or auto: text when "
                   "the log goes to a terminal, json otherwise. Env: DOGBREEDS_LOG_FORMAT.")
def main(log_format):
    """Label dog photos with a breed, using a model artifact published by dogbreeds-train,
    and look at the results (report, export).

    A model is a local artifact folder, a local registry folder <root>/<name> (its `latest`
    version), or s3://bucket/models/<name>[/<version>|/latest]. S3 endpoint and credentials come
    from the standard AWS environment (AWS_ENDPOINT_URL, AWS_PROFILE, ...)."""
    from worker.log_format import configure_logging

    configure_logging(log_format)


def _load_classifier(model_uri: str, top_k: int, trusted_key: str | None = None, model_digest: str | None = None,
                     **kw):
    """Load and verify the artifact (its signature against ``trusted_key`` when one is given,
    its manifest against ``model_digest``); a tampered, unsigned, re-signed or missing one is a
    one-line refusal, not a traceback."""
    from worker.artifact import ArtifactError
    from worker.classifier import Classifier
    from worker.runtimes import RuntimeSelectionError
    from worker.settings import SettingsError
    from worker.signature import TrustPolicy

    try:
        trust = TrustPolicy.from_config(trusted_key, model_digest)
        return Classifier.load(model_uri, top_k=top_k, trust=trust, **kw)
    except (ArtifactError, RuntimeSelectionError) as error:
        raise click.ClickException(f"refusing to serve {model_uri}: {type(error).__name__}: {error}") from error
    except SettingsError as error:  # a variable read as the model loads (DOGBREEDS_THREADS, ...)
        raise click.ClickException(str(error)) from error


def trust_options(command):
    """--trusted-key and --model-digest (from DOGBREEDS_TRUSTED_KEY / DOGBREEDS_MODEL_DIGEST)."""
    options = [setting_option("trusted_key", metavar="KEY"), setting_option("model_digest", metavar="SHA256")]
    for option in reversed(options):
        command = option(command)
    return command


def _logs_to_stderr() -> None:
    """predict and classify print their results on stdout: their log lines (which model, whether
    it was verified) go to stderr."""
    from worker.observability import logger

    logger.registered_handler.setStream(sys.stderr)


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


def model_options(command):
    """The options that choose and serve the model, shared by predict, run and classify."""
    options = [setting_option("runtime"), setting_option("dog_check"), setting_option("min_score", metavar="SCORE"),
               setting_option("decode_budget_pixels", metavar="PIXELS")]
    command = trust_options(command)  # listed after the options above
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@setting_option("model", "--model", "model_uri", required=True)
@click.argument("paths", nargs=-1, required=True)
@setting_option("top_k", env=False, default=3, help="Breeds shown per photo.")
@setting_option("batch_size", env=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per photo (JSON Lines) instead of a table.")
@model_options
def predict(model_uri, paths, top_k, batch_size, as_json, runtime, dog_check, min_score, decode_budget_pixels,
            trusted_key, model_digest):
    """Top-k breeds for photos or folders of photos: status ok (a breed), no_dog (no dog in the
    photo, per the model's dog check) or uncertain (below --min-score). Unreadable files are
    reported per file (with their error code) and never stop the run. Photos are read, decoded
    and classified as `classify` does (the same pipeline and limits), without writing a manifest."""
    from tqdm.auto import tqdm

    from worker.messages import ImageRef
    from worker.pipeline import LocalReader

    _logs_to_stderr()
    files, had_folder = _photo_paths(paths)
    pipeline = _pipeline(model_uri, batch_size, PREDICT_THREADS, top_k, reader=LocalReader(), runtime=runtime,
                         dog_check=dog_check, min_score=min_score, trusted_key=trusted_key, model_digest=model_digest,
                         decode_budget_pixels=decode_budget_pixels)
    results: list[dict] = []
    try:
        with tqdm(total=len(files), desc="classify", unit="img", disable=not had_folder or as_json,
                  file=sys.stderr) as bar:
            for start in range(0, len(files), PREDICT_CHUNK):  # printed chunk by chunk, in order
                chunk = files[start:start + PREDICT_CHUNK]
                items = _classified(pipeline, [ImageRef(str(path.parent), path.name) for path in chunk], bar.update)
                for path, item in zip(chunk, items):
                    results.append(_prediction(path, item))
                    if as_json:
                        click.echo(json.dumps(results[-1]))
    finally:
        pipeline.close()
    if not as_json:
        _print_table(results, top_k)
        answered = {s: sum(r["status"] == s for r in results) for s in ("no_dog", "uncertain") if any(
            r["status"] == s for r in results)}
        if answered:
            click.echo(", ".join(f"{n} {s}" for s, n in answered.items()) + f" of {len(results)} photos", err=True)
        errors = sum(r["status"] == "error" for r in results)
        if errors:
            click.echo(f"{errors} of {len(results)} photos could not be classified", err=True)


PREDICT_CHUNK = 256  # photos classified (and printed) at a time
PREDICT_THREADS = 8  # photos read and decoded at once


def _classified(pipeline, refs, progress) -> list:
    """``pipeline.classify``; a photo to retry (memory, a failed inference) is a one-line error."""
    from worker.pipeline import TransientError

    try:
        return pipeline.classify(refs, progress=progress)
    except TransientError as error:
        raise click.ClickException(f"could not classify every photo: {error}") from error


def _prediction(path: Path, item) -> dict:
    """predict's row for one photo (a manifest item, by the photo's path)."""
    if item.status == "error":
        return {"path": str(path), "status": "error", "error_code": item.error_code,
                "error_message": item.error_message}
    return {"path": str(path), "status": item.status, "breed": item.breed, "synset": item.synset,
            "score": None if item.score is None else round(item.score, 4),
            "dog_score": None if item.dog_score is None else round(item.dog_score, 4),
            "top_k": [{"breed": t.breed, "synset": t.synset, "score": round(t.score, 4)} for t in item.top_k]}


def _pipeline(model_uri: str, batch_size: int, threads: int, top_k: int, reader=None, runtime: str | None = None,
              dog_check: bool = True, min_score: float | None = None, trusted_key: str | None = None,
              model_digest: str | None = None, decode_budget_pixels: int | None = None):
    from worker.pipeline import Pipeline, PipelineSettings
    from worker.settings import client

    s3 = client("s3")
    classifier = _load_classifier(model_uri, top_k, trusted_key, model_digest, s3=s3, runtime=runtime,
                                  dog_check=dog_check, min_score=min_score)
    return Pipeline(classifier, s3, PipelineSettings(batch_size=batch_size, download_threads=threads, top_k=top_k,
                                                     decode_budget_pixels=decode_budget_pixels), reader=reader)


def worker_options(command):
    """Options shared by `run` and `classify` (defaults from the DOGBREEDS_* environment)."""
    options = [
        setting_option("model", "--model", "model_uri", required=True),
        setting_option("output_bucket"),
        setting_option("output_prefix"),
        setting_option("batch_size"),
        setting_option("download_threads"),
        setting_option("top_k"),
        setting_option("manifest_format", envvar=["DOGBREEDS_MANIFEST_FORMAT", "DOGBREEDS_JSONL"],
                       metavar="[json|jsonl]"),
    ]
    command = model_options(command)  # listed after the options above
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@worker_options
@setting_option("queue_url", required=True)
@click.option("--wait-seconds", type=int, default=20, show_default=True, help="Long-polling wait per receive.")
@click.option("--visibility-timeout", type=int, default=300, show_default=True,
              help="Seconds a received message stays hidden; renewed by a heartbeat while a batch runs.")
@click.option("--heartbeat", type=float, default=60.0, show_default=True, help="Seconds between visibility renewals.")
@click.option("--retry-delay", type=int, default=10, show_default=True,
              help="Seconds before a failed message is visible again (it reaches the DLQ after maxReceiveCount).")
@click.option("--max-messages", type=int, help="Stop after this many messages (batch runs).")
@click.option("--until-empty", is_flag=True, help="Stop when a receive finds the queue empty.")
@click.option("--pipeline/--no-pipeline", "pipelined", default=True, show_default=True,
              help="Receive the next batch (and start fetching its photos) and write the previous batch's "
                   "manifests while classifying.")
@setting_option("prefix_page_keys")
@setting_option("max_prefix_keys")
def run(model_uri, output_bucket, output_prefix, batch_size, download_threads, top_k, manifest_format, runtime,
        dog_check, min_score, decode_budget_pixels, trusted_key, model_digest, queue_url, wait_seconds,
        visibility_timeout, heartbeat, retry_delay, max_messages, until_empty, pipelined, prefix_page_keys,
        max_prefix_keys):
    """Consume the queue: S3 event notifications or job messages in, one manifest per message
    out. While one batch is classified the next is received and the previous one's manifests
    are written (a message is deleted only after its manifest is). SIGTERM/SIGINT finish the
    current batch, hand back the one received ahead, then stop. Logs follow --log-format
    (readable lines on a terminal, JSON lines otherwise); metrics are CloudWatch EMF lines (JSON only)."""
    from worker.jobs import OutputSettings
    from worker.poller import Poller, PollerSettings
    from worker.settings import client

    pipeline = _pipeline(model_uri, batch_size, download_threads, top_k, runtime=runtime, dog_check=dog_check,
                         min_score=min_score, trusted_key=trusted_key, model_digest=model_digest,
                         decode_budget_pixels=decode_budget_pixels)
    output = OutputSettings(output_bucket, output_prefix, manifest_format == "jsonl", page_keys=prefix_page_keys,
                            max_prefix_keys=max_prefix_keys)
    poller = Poller(client("sqs"), pipeline, output,
                    PollerSettings(queue_url, wait_seconds=wait_seconds, visibility_timeout=visibility_timeout,
                                   heartbeat_seconds=heartbeat, retry_delay=retry_delay, max_total=max_messages,
                                   until_empty=until_empty, pipelined=pipelined))
    poller.install_signal_handlers()
    try:
        summary = poller.run()
    finally:
        pipeline.close()
    click.echo(json.dumps({"summary": summary.__dict__}), err=True)


@main.command()
@worker_options
@click.argument("source")
@click.option("--job-id", help="Manifest name (default: derived from SOURCE, so a rerun overwrites).")
@click.option("--out", help="Where to write the manifest: a local file or s3://bucket/key "
                            "(default: s3://<bucket>/<output-prefix>/<job-id>.json for S3 sources, "
                            "./<job-id>.json for local folders).")
def classify(model_uri, output_bucket, output_prefix, batch_size, download_threads, top_k, manifest_format, runtime,
             dog_check, min_score, decode_budget_pixels, trusted_key, model_digest, source, job_id, out):
    """Classify every photo under SOURCE (a local folder or s3://bucket/prefix) and write one
    manifest, without a queue."""
    import hashlib

    from tqdm.auto import tqdm

    from worker import manifests
    from worker.messages import ImageRef, Job
    from worker.pipeline import LocalReader
    from worker.prefix_listing import expand_prefix_job
    from worker.s3uri import S3Uri

    _logs_to_stderr()
    jsonl = manifest_format == "jsonl"
    job_id = job_id or "classify-" + hashlib.sha256(source.encode()).hexdigest()[:16]
    if source.startswith("s3://"):
        uri = S3Uri.parse(source)
        pipeline = _pipeline(model_uri, batch_size, download_threads, top_k, runtime=runtime, dog_check=dog_check,
                             min_score=min_score, trusted_key=trusted_key, model_digest=model_digest,
                             decode_budget_pixels=decode_budget_pixels)
        job = expand_prefix_job(Job(job_id, (), None, "prefix-job", prefix=uri.key, bucket=uri.bucket), pipeline.s3)
    else:
        root = Path(source)
        if not root.is_dir():
            raise click.BadParameter(f"{source} is not a folder or s3:// prefix", param_hint="SOURCE")
        from worker.images import IMAGE_SUFFIXES

        keys = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        pipeline = _pipeline(model_uri, batch_size, download_threads, top_k, reader=LocalReader(), runtime=runtime,
                             dog_check=dog_check, min_score=min_score, trusted_key=trusted_key,
                             model_digest=model_digest, decode_budget_pixels=decode_budget_pixels)
        job = Job(job_id, tuple(ImageRef(str(root), k) for k in keys), None, "local-folder")
    try:
        with tqdm(total=len(job.refs), desc="classify", unit="img", file=sys.stderr) as bar:
            items = pipeline.classify(list(job.refs), progress=bar.update)
    finally:
        pipeline.close()
    document = manifests.build_manifest(job_id, job.source, pipeline.classifier.model_info, items)
    if out is None:
        out = (f"s3://{output_bucket or job.bucket}/{manifests.manifest_key(output_prefix, job_id, jsonl=jsonl)}"
               if source.startswith("s3://") else f"{job_id}.{'jsonl' if jsonl else 'json'}")
    if out.startswith("s3://"):
        target = S3Uri.parse(out)
        manifests.write_manifest(pipeline.s3, target.bucket, target.key, document, jsonl=jsonl)
    else:
        Path(out).write_text(document.to_jsonl() if jsonl else document.to_json())
    counts = document.counts
    click.echo(f"{counts['ok']} ok, {counts['no_dog']} no_dog, {counts['uncertain']} uncertain, "
               f"{counts['error']} errors -> {out}")


SOURCE_FORMS = """SOURCE is where the manifests are (JSON documents or JSON Lines, as `run` and
`classify` write them):

\b
  s3://bucket/manifests/            every *.json / *.jsonl under the prefix
  s3://bucket/manifests/job-7.json  one manifest in S3
  results/                          every *.json / *.jsonl under a local folder
  results/job-7.jsonl               one local manifest

Files under SOURCE that are not manifests are skipped and listed, never fatal."""


def _manifest_source(source: str):
    from worker.manifest_source import ManifestSource
    from worker.settings import client

    manifests = ManifestSource(source, client("s3") if source.startswith("s3://") else None)
    try:
        locations = manifests.locations()
    except FileNotFoundError as error:
        raise click.BadParameter(str(error), param_hint="SOURCE") from error
    if not locations:
        raise click.ClickException(f"no manifests (*.json, *.jsonl) under {source}")
    return manifests


@main.command(epilog=SOURCE_FORMS)
@click.argument("source")
@click.option("--out", default="report.html", show_default=True, type=click.Path(dir_okay=False),
              help="The HTML file to write (one self-contained page: inline CSS/JS, no server, no CDN).")
@click.option("--link", is_flag=True,
              help="Show photos through presigned S3 URLs (file:// for local photos) instead of embedding "
                   "thumbnails: a much smaller page that needs S3 access to look at and stops showing photos "
                   "when the links expire.")
@click.option("--link-expires", type=click.IntRange(1, 7 * 24 * 3600), default=7 * 24 * 3600, show_default=True,
              help="Seconds a --link URL stays valid (S3 allows at most 7 days).")
@click.option("--thumb-size", type=click.IntRange(16, 512), default=128, show_default=True,
              help="Longer side of an embedded thumbnail, in pixels (page size grows with its square).")
@click.option("--thumb-quality", type=click.IntRange(10, 95), default=70, show_default=True,
              help="JPEG quality of the embedded thumbnails.")
@click.option("--page-size", type=click.IntRange(10, 1000), default=100, show_default=True,
              help="Photos per gallery page (the page renders one page of cards at a time).")
@click.option("--download-threads", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Photos fetched and shrunk at once.")
@click.option("--title", help="Page title (default: 'dogbreeds report: SOURCE').")
def report(source, out, link, link_expires, thumb_size, thumb_quality, page_size, download_threads, title):
    """Write one static HTML page to look at a labelled batch: a summary (photos, counts per
    status, model name and version), photos per breed, score histograms, a gallery of
    thumbnails with breed, score bar and top-k (filters: breed, status, score below t, key)
    and the list of errors with their codes. Photos come from S3 (the worker's S3 settings)
    or from the local folder a `classify` read; one that cannot be fetched or decoded gets
    a placeholder. Built streaming, with a progress bar: fine for 10,000 photos."""
    from worker.report import ReportSettings, build_report
    from worker.settings import client
    from worker.thumbnails import PhotoFetcher

    manifests = _manifest_source(source)
    fetcher = PhotoFetcher(client("s3"), size=thumb_size, quality=thumb_quality, link=link,
                           link_expires=link_expires)
    settings = ReportSettings(title=title or f"dogbreeds report: {source}", page_size=page_size,
                              threads=download_threads, ahead=8 * download_threads)
    summary = build_report(manifests, out, fetcher.thumbnail, settings)
    for problem in summary.problems:
        click.echo(f"skipped {problem.location}: {problem.reason}", err=True)
    click.echo(f"{summary.line()}", err=True)
    click.echo(f"report written to {Path(out).resolve()}")


@main.command(epilog=SOURCE_FORMS)
@click.argument("source")
@click.option("--out", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="The file to write; '-' writes CSV to standard output.")
@click.option("--format", "fmt", type=click.Choice(["csv", "parquet"]),
              help="csv (top_k as a JSON string, null as an empty field) or parquet (typed columns, top_k a "
                   "list of structs; needs pyarrow, the 'export' extra). Default: from --out's suffix, else csv.")
def export(source, out, fmt):
    """Write every item of the manifests under SOURCE as one table, one row per photo:
    bucket, key, etag, version_id, status, error_code, error_message, breed, synset, score,
    dog_score, top_k, model_name, model_version, model_runtime, job_id, manifest (its location)."""
    from tqdm.auto import tqdm

    from worker.export import MissingDependency, write_csv, write_parquet

    fmt = fmt or ("parquet" if out.lower().endswith((".parquet", ".pq")) else "csv")
    if fmt == "parquet" and out == "-":
        raise click.BadParameter("Parquet needs a file, not standard output", param_hint="--out")
    manifests = _manifest_source(source)
    with tqdm(desc="export", unit="row", file=sys.stderr, disable=None) as bar:
        try:
            if fmt == "parquet":
                rows = write_parquet(out, manifests.items(), progress=bar.update)
            elif out == "-":
                rows = write_csv(sys.stdout, manifests.items(), progress=bar.update)
            else:
                with open(out, "w", newline="", encoding="utf-8", errors="replace") as handle:
                    rows = write_csv(handle, manifests.items(), progress=bar.update)
        except MissingDependency as error:
            raise click.ClickException(str(error)) from error
    for problem in manifests.problems:
        click.echo(f"skipped {problem.location}: {problem.reason}", err=True)
    click.echo(f"{rows} rows ({fmt}) -> {out}", err=True)


def _print_table(results: list[dict], top_k: int) -> None:
    width = max([len(r["path"]) for r in results] + [4])
    click.echo(f"{'photo'.ljust(width)}  {'breed':<28} {'score':>6}  others")
    for r in results:
        if r["status"] == "ok":
            others = ", ".join(f"{t['breed']} {t['score']:.2f}" for t in r["top_k"][1:top_k])
            click.echo(f"{r['path'].ljust(width)}  {r['breed']:<28} {r['score']:>6.2f}  {others}")
        elif r["status"] in ("no_dog", "uncertain"):
            label = "NO DOG" if r["status"] == "no_dog" else "UNCERTAIN"
            hint = ", ".join(f"{t['breed']} {t['score']:.2f}" for t in r["top_k"][:top_k])
            dog = f" (dog score {r['dog_score']:.2f})" if r.get("dog_score") is not None else ""
            click.echo(f"{r['path'].ljust(width)}  {label + dog:<35}  hint: {hint}")
        else:
            click.echo(f"{r['path'].ljust(width)}  ERROR {r['error_code']}: {r['error_message']}")


if __name__ == "__main__":
    main()
