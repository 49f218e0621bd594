"""Throughput benchmark (`make bench`): the bare model against the whole worker, per runtime.

In one run, on this machine:

1. **bare model**: images/s of ``predict`` (the worker's own loader, ``worker.artifact.load_artifact``
   with ``runtime=...``) on preprocessed float32 batches of real photos already in memory, per
   runtime/precision the artifact carries and per batch size; one fresh process per runtime.
2. **end to end**: a moto server on 127.0.0.1 (``infra.local_stack.MotoServer``) stands in for
   S3 and SQS; N real sample photos (samples/photos, Stanford size) are put in the queue as
   messages (``--mode events``: one S3 ObjectCreated notification per photo, as `make demo`
   does; ``--mode jobs``: job messages of ``--job-size`` keys); then ``dogbreeds-worker run
   --until-empty`` runs as a subprocess (started through this script so that it can time
   itself: its CLI is called unchanged, only ``Poller.classify`` and ``Poller.finish`` are
   wrapped with clocks).
   ``e2e_img_s`` = photos / (first batch received -> last manifest written);
   ``cold_start_s`` = process start -> first manifest written; ``peak_rss_mb`` = the worker
   process's peak resident memory.
3. **agreement**: each fast variant against the fp32 SavedModel (runtime ``tf``) on real
   test photos: the held-out sample photos (``stanford_split == test`` in samples/MANIFEST.tsv)
   plus, when ../shared/data/stanford-dogs-subset exists, that dataset's official test photos of
   the model's breeds (duplicates by sha256 dropped).

The artifact is ``--model`` (a folder, registry or s3:// URI); by default one is trained like
scripts/demo.py does (``dogbreeds-train fit samples/photos --split-file samples/MANIFEST.tsv``,
then ``dogbreeds-train publish`` to a local registry under ``--work``; reused on later runs).

Also reported: ``fallback_rate`` (the share of photos the int8 -> bf16 cascade ran twice in the
bare measurement), and CPU milliseconds per photo of the worker process and of the moto server
during each end-to-end run: moto shares the same cores, so its CPU (which real S3/SQS would not
take from the worker) bounds ``ratio`` on a small machine.

Prints a table; ``--json`` prints one JSON list: rows ``{"runtime", "precision", "batch",
"bare_img_s", "e2e_img_s", "ratio", "peak_rss_mb", "cold_start_s", ...}`` (runtime ``tf``,
precision ``fp32`` is the baseline; ``vs_tf_fp32`` = bare images/s over the baseline's at the
same batch size) and, per fast variant, ``{"runtime", "precision", "top1_agreement",
"fp32_top1", "top1", "photos"}``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLES = ROOT / "samples"
SUBSET = ROOT.parent / "shared" / "data" / "stanford-dogs-subset"
BIN = Path(sys.executable).parent
MODEL_NAME = "bench-breeds"
REPEATS = 3


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of this process (all threads), or of another one."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# --------------------------------------------------------------------------- photos


def _manifest_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def sample_photos(limit: int | None = None) -> list[Path]:
    """Sample photos (Stanford size), held-out ones (stanford_split == test, which the model
    never trained on, so they have the close calls that unseen photos have) first, then the
    training ones; a stable order."""
    rows = _manifest_rows(SAMPLES / "MANIFEST.tsv")
    rows = sorted(rows, key=lambda r: r.get("stanford_split") != "test")  # stable: test first
    paths = [SAMPLES / "photos" / r["relative_path"] for r in rows]
    return paths[:limit] if limit else paths


def test_photos(folders: list[str]) -> list[tuple[Path, int]]:
    """(photo, class index) of the held-out sample photos plus the subset's official test
    photos of the model's breeds, without duplicates (by sha256)."""
    index = {folder: i for i, folder in enumerate(folders)}
    seen, out = set(), []
    sources = [(SAMPLES / "photos", SAMPLES / "MANIFEST.tsv")]
    if (SUBSET / "MANIFEST.tsv").is_file():
        sources.append((SUBSET, SUBSET / "MANIFEST.tsv"))
    for root, manifest in sources:
        for row in _manifest_rows(manifest):
            folder = row["relative_path"].split("/", 1)[0]
            if row.get("stanford_split") != "test" or folder not in index:
                continue
            path = root / row["relative_path"]
            digest = row.get("sha256") or hashlib.sha256(path.read_bytes()).hexdigest()
            if digest in seen or not path.is_file():
                continue
            seen.add(digest)
            out.append((path, index[folder]))
    return out


def decode(paths, size, fit) -> "np.ndarray":  # noqa: F821
    import numpy as np

    from worker import images

    return np.stack([images.read_image_file(p, size=size, fit=fit) for p in paths])


# --------------------------------------------------------------------------- model


def default_model(work: Path) -> str:
    """Train and publish a model like scripts/demo.py (reused when already there)."""
    registry = work / "registry"
    if (registry / MODEL_NAME / "latest").is_file():
        log(f"using the model trained by an earlier run: {registry / MODEL_NAME}")
        return str(registry / MODEL_NAME)
    env = {**os.environ}
    run_dir = work / "run"
    fit = [str(BIN / "dogbreeds-train"), "fit", str(SAMPLES / "photos"), "--model", "vgg16_transfer",
           "--split-file", str(SAMPLES / "MANIFEST.tsv"), "--run-dir", str(run_dir), "--augment-copies", "2",
           "--epochs", "60", "--cache-dir", str(work / "cache")]
    publish = [str(BIN / "dogbreeds-train"), "publish", str(run_dir), "--to", str(registry), "--name", MODEL_NAME]
    for command in ([] if (run_dir / "model.keras").is_file() else [fit]) + [publish]:
        log("$ " + " ".join(command))
        subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=sys.stderr)
    return str(registry / MODEL_NAME)


# --------------------------------------------------------------------------- children


def child_bare(args) -> None:
    """One runtime in this fresh process: images/s per batch size, and the probabilities on
    the agreement photos (saved as .npy)."""
    import numpy as np

    from worker.artifact import load_artifact

    started = time.perf_counter()
    loaded = load_artifact(args.model, runtime=args.runtime)
    load_s = time.perf_counter() - started
    h, w = loaded.manifest.input_size
    batches = [int(b) for b in args.batches.split(",")]
    # 64 photos, held-out ones first: batches rotate over them, so the int8 cascade re-runs its
    # usual share of close calls instead of whatever one fixed batch holds
    pixels = decode(sample_photos(max(64, *batches)), (w, h), loaded.manifest.input_fit).astype(np.float32)
    out = {"runtime": loaded.runtime, "precision": loaded.manifest.runtimes[loaded.runtime].get("precision", "fp32"),
           "load_s": round(load_s, 2), "img_s": {}, "loadavg": loadavg()}
    inner = getattr(loaded.predict, "_inner", None)
    windows = {b: [np.take(pixels, range(i, i + b), axis=0, mode="wrap") for i in range(0, len(pixels), b)]
               for b in batches}
    for batch in batches:
        loaded.predict(windows[batch][0])  # warm-up (first-shape compilation, allocations)
        rates = []
        for _ in range(REPEATS):  # the median of a few timed stretches damps a busy neighbour
            calls, started = 0, time.perf_counter()
            while True:
                loaded.predict(windows[batch][calls % len(windows[batch])])
                calls += 1
                elapsed = time.perf_counter() - started
                if elapsed >= args.seconds / REPEATS and calls >= 2:
                    break
            rates.append(calls * batch / elapsed)
        out["img_s"][batch] = round(float(np.median(rates)), 2)
        log(f"  bare {loaded.runtime} batch {batch}: {out['img_s'][batch]} images/s "
            f"(median of {[round(r, 2) for r in rates]})")
    if hasattr(inner, "fallbacks"):
        out["fallback_rate"] = round(inner.fallbacks / max(1, inner.calls), 4)
    if args.probs and not Path(args.probs + f".{loaded.runtime}.npy").is_file():  # cached per artifact + photos
        paths = json.loads(Path(args.probs + ".json").read_text())
        probs = []
        for i in range(0, len(paths), 16):
            probs.append(loaded.predict(decode(paths[i:i + 16], (w, h), loaded.manifest.input_fit).astype(np.float32)))
        np.save(args.probs + f".{loaded.runtime}.npy", np.concatenate(probs))
    out["peak_rss_mb"] = peak_rss_mb()
    out["tensorflow_imported"] = "tensorflow" in sys.modules
    print("BENCH-RESULT " + json.dumps(out), flush=True)


def child_worker(argv: list[str]) -> None:
    """`dogbreeds-worker <argv>` with clocks around Poller.classify (a received batch starts) and
    Poller.finish (its manifests written, its messages deleted)."""
    t0 = float(os.environ.get("BENCH_T0", time.time()))
    from worker import poller

    marks: list[tuple[float, float, int, int]] = []  # (classify start, finish end, messages, photos)
    classify, finish = poller.Poller.classify, poller.Poller.finish
    starts: dict[int, float] = {}
    cpu = {}

    def timed_classify(self, received):
        starts[id(received)] = time.time()
        cpu.setdefault("first", _cpu_seconds())
        return classify(self, received)

    def timed_finish(self, received, classified):
        outcome = finish(self, received, classified)
        marks.append((starts.pop(id(received)), time.time(), len(received), outcome.images))
        cpu["last"] = _cpu_seconds()
        return outcome

    poller.Poller.classify, poller.Poller.finish = timed_classify, timed_finish
    from worker import runtimes

    cascades = []
    with_fallback = runtimes.with_fallback

    def counted_fallback(*a, **k):
        cascades.append(with_fallback(*a, **k))
        return cascades[-1]

    runtimes.with_fallback = counted_fallback
    from worker.cli import main

    try:
        main(argv, standalone_mode=False)
    finally:
        result = {"t0": t0, "marks": marks, "peak_rss_mb": peak_rss_mb(),
                  "cpu_s": round(cpu.get("last", 0) - cpu.get("first", 0), 3),
                  "fallback_rate": round(cascades[0].fallbacks / max(1, cascades[0].calls), 4) if cascades else None,
                  "tensorflow_imported": "tensorflow" in sys.modules, "openvino_imported": "openvino" in sys.modules}
        print("BENCH-RESULT " + json.dumps(result), flush=True)


def _result(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith("BENCH-RESULT "):
            return json.loads(line[len("BENCH-RESULT "):])
    raise RuntimeError("the child printed no result")


def _child(args: list[str], env: dict | None = None, timeout: float = 1800) -> dict:
    env = {**os.environ, **(env or {}), "BENCH_T0": repr(time.time())}
    process = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=timeout)
    if process.returncode != 0:
        raise RuntimeError(f"child {args[:3]} failed ({process.returncode}):\n{process.stderr[-4000:]}")
    sys.stderr.write("".join(line + "\n" for line in process.stderr.splitlines() if line.startswith("  bare")))
    return _result(process.stdout)


# --------------------------------------------------------------------------- end to end


def end_to_end(server, model: str, runtime: str, batch: int, photos: list[Path], mode: str, job_size: int,
               run_id: str, worker_args: list[str] = (), worker_endpoint: str | None = None) -> dict:
    import boto3

    from infra.local_stack import create_stack

    s3, sqs = boto3.client("s3"), boto3.client("sqs")
    stack = create_stack(s3, sqs, bucket=f"bench-{run_id}", queue=f"bench-{run_id}")
    keys = []
    if mode == "events":  # one ObjectCreated notification per photo, as S3 sends them
        for i, path in enumerate(photos):
            key = f"incoming/{path.parent.name}/{i:05d}-{path.name}"
            s3.upload_file(str(path), stack.bucket, key)
            keys.append(key)
        expected_messages = len(photos)
    else:  # job messages of job_size keys (photos outside incoming/: no notifications)
        for i, path in enumerate(photos):
            key = f"photos/{path.parent.name}/{i:05d}-{path.name}"
            s3.upload_file(str(path), stack.bucket, key)
            keys.append(key)
        chunks = [keys[i:i + job_size] for i in range(0, len(keys), job_size)]
        for n, chunk in enumerate(chunks):
            sqs.send_message(QueueUrl=stack.queue_url,
                             MessageBody=json.dumps({"job_id": f"job-{n:04d}", "bucket": stack.bucket, "keys": chunk}))
        expected_messages = len(chunks)
    deadline = time.time() + 60
    while True:
        attributes = sqs.get_queue_attributes(QueueUrl=stack.queue_url, AttributeNames=["ApproximateNumberOfMessages"])
        if int(attributes["Attributes"]["ApproximateNumberOfMessages"]) >= expected_messages:
            break
        if time.time() > deadline:
            raise RuntimeError(f"only {attributes['Attributes']} of {expected_messages} messages reached the queue")
        time.sleep(0.2)
    argv = ["run", "--model", model, "--queue-url", stack.queue_url, "--until-empty", "--wait-seconds", "1",
            "--batch-size", str(batch), "--runtime", runtime, "--output-prefix", "manifests", *worker_args]
    moto_cpu = _cpu_seconds(server.process.pid)
    env = {**server.environment(), "DOGBREEDS_RUNTIME": runtime}
    if worker_endpoint:  # the worker talks to S3/SQS through the latency proxy
        env["AWS_ENDPOINT_URL"] = worker_endpoint
    result = _child(["--_worker", *argv], env=env)
    moto_cpu = _cpu_seconds(server.process.pid) - moto_cpu
    marks = result["marks"]
    if not marks:
        raise RuntimeError("the worker handled no message")
    images = sum(m[3] for m in marks)
    manifests = sum(1 for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket, Prefix="manifests/")
                    for _ in page.get("Contents", []))
    if images != len(photos) or manifests != expected_messages:
        raise RuntimeError(f"worker classified {images}/{len(photos)} photos, wrote {manifests}/{expected_messages} manifests")
    first, last = min(m[0] for m in marks), max(m[1] for m in marks)
    return {"e2e_img_s": round(images / (last - first), 2), "cold_start_s": round(min(m[1] for m in marks) - result["t0"], 2),
            "peak_rss_mb": result["peak_rss_mb"], "tensorflow_imported": result["tensorflow_imported"],
            "messages": expected_messages, "receives": len(marks), "photos": images,
            "fallback_rate": result.get("fallback_rate"),
            # CPU per photo while the worker ran: the worker process (first receive -> last manifest,
            # inference included) and the moto server (S3 + SQS), which shares these cores
            "worker_cpu_ms_per_photo": round(1000 * result["cpu_s"] / images, 1),
            "moto_cpu_ms_per_photo": round(1000 * moto_cpu / images, 1)}


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Artifact to benchmark (folder, registry <root>/<name>, s3://...). "
                                        "Default: train and publish one like scripts/demo.py under --work.")
    parser.add_argument("--work", default=str(ROOT / ".cache" / "throughput"), help="Working folder.")
    parser.add_argument("--runtimes", help="Comma-separated runtime keys (default: every one the artifact carries).")
    parser.add_argument("--bare-batches", default="1,8,16", help="Batch sizes of the bare-model measurement.")
    parser.add_argument("--worker-batches", default="16", help="Worker --batch-size values run end to end.")
    parser.add_argument("--seconds", type=float, default=8.0, help="Minimum timed seconds per bare measurement.")
    parser.add_argument("--photos", type=int, default=192, help="Photos put through the worker per end-to-end run.")
    parser.add_argument("--mode", choices=("events", "jobs", "both"), default="both",
                        help="Queue messages: one S3 event per photo (as make demo), job messages, or both.")
    parser.add_argument("--job-size", type=int, default=16, help="Keys per job message (--mode jobs).")
    parser.add_argument("--no-e2e", action="store_true", help="Skip the end-to-end runs.")
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="Add this much latency to each of the worker's S3/SQS requests (a TCP proxy in front "
                             "of moto), as real S3/SQS round trips have.")
    parser.add_argument("--worker-args", default="", help="Extra `dogbreeds-worker run` options for the end-to-end "
                                                          "runs, e.g. --worker-args=--no-pipeline.")
    parser.add_argument("--no-agreement", action="store_true", help="Skip the agreement rows.")
    parser.add_argument("--json", action="store_true", help="Print one JSON list of rows instead of a table.")
    parser.add_argument("--_bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--runtime", help=argparse.SUPPRESS)
    parser.add_argument("--batches", help=argparse.SUPPRESS)
    parser.add_argument("--probs", help=argparse.SUPPRESS)
    if len(sys.argv) > 1 and sys.argv[1] == "--_worker":
        return child_worker(sys.argv[2:])
    args = parser.parse_args()
    if args._bare:
        return child_bare(args)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load_start = loadavg()
    log(f"load average at start: {load_start}")
    from worker.artifact import read_labels, read_manifest, resolve_artifact

    model = args.model or default_model(work)
    path = resolve_artifact(model)
    manifest = read_manifest(path)
    folders = [label.folder for label in read_labels(path)]
    keys = args.runtimes.split(",") if args.runtimes else list(manifest.runtimes)
    if "tf" in keys:  # the baseline first
        keys = ["tf"] + [k for k in keys if k != "tf"]
    for key, entry in manifest.runtimes.items():
        log(f"artifact runtime {key}: {entry.get('path')} {entry.get('precision')} "
            f"agreement at publish: {(entry.get('agreement') or {}).get('top1_agreement', 'reference')}")

    probs_base = None
    tests = []
    if not args.no_agreement:
        tests = test_photos(folders)
        listing = json.dumps([str(p) for p, _ in tests])
        digest = hashlib.sha256(f"{path}|{manifest.version}|{listing}".encode()).hexdigest()[:12]
        probs_base = str(work / f"agreement-{manifest.name}-{manifest.version}-{digest}")
        Path(probs_base + ".json").write_text(listing)
        log(f"agreement photos: {len(tests)}")

    bare = {}
    for key in keys:
        log(f"bare model: {key}")
        child_args = ["--_bare", "--model", str(path), "--runtime", key, "--batches", args.bare_batches,
                      "--seconds", str(args.seconds)]
        if probs_base:
            child_args += ["--probs", probs_base]
        bare[key] = _child(child_args)

    e2e = {}
    if not args.no_e2e:
        from infra.local_stack import MotoServer

        photos = sample_photos()
        photos = (photos * (args.photos // len(photos) + 1))[:args.photos]
        modes = ["events", "jobs"] if args.mode == "both" else [args.mode]
        from latency_proxy import LatencyProxy

        with MotoServer() as server, LatencyProxy("127.0.0.1", server.port, args.latency_ms / 1000) as proxy:
            os.environ.update(server.environment())
            worker_endpoint = proxy.endpoint if args.latency_ms > 0 else None
            for key in keys:
                for batch in (int(b) for b in args.worker_batches.split(",")):
                    for mode in modes:
                        run_id = f"{key}-{batch}-{mode}".replace("_", "-").lower()
                        log(f"end to end: {key}, batch {batch}, {mode} ({len(photos)} photos), load {loadavg()}")
                        e2e[(key, batch, mode)] = end_to_end(server, str(path), key, batch, photos, mode,
                                                             args.job_size, run_id, args.worker_args.split(),
                                                             worker_endpoint)
                        log(f"  {e2e[(key, batch, mode)]}")

    rows = []
    base = bare.get("tf", {}).get("img_s", {})
    for key in keys:
        result = bare[key]
        batches = sorted({int(b) for b in result["img_s"]} | {b for (k, b, _) in e2e if k == key})
        for batch in batches:
            for mode in (sorted({m for (k, b, m) in e2e if k == key and b == batch}) or [None]):
                bare_img_s = result["img_s"].get(str(batch), result["img_s"].get(batch))
                measured = e2e.get((key, batch, mode), {})
                row = {"runtime": key.split("-", 1)[0], "precision": result["precision"], "batch": batch,
                       "bare_img_s": bare_img_s, "e2e_img_s": measured.get("e2e_img_s"),
                       "ratio": round(measured["e2e_img_s"] / bare_img_s, 3) if measured and bare_img_s else None,
                       "peak_rss_mb": measured.get("peak_rss_mb"), "cold_start_s": measured.get("cold_start_s"),
                       "runtime_key": key, "messages": mode, "latency_ms": args.latency_ms if measured else None,
                       "vs_tf_fp32": round(bare_img_s / base[str(batch)], 2) if str(batch) in base and bare_img_s else None,
                       "bare_peak_rss_mb": result["peak_rss_mb"], "load_s": result["load_s"],
                       "fallback_rate": measured.get("fallback_rate", result.get("fallback_rate")),
                       "worker_cpu_ms_per_photo": measured.get("worker_cpu_ms_per_photo"),
                       "moto_cpu_ms_per_photo": measured.get("moto_cpu_ms_per_photo"),
                       "tensorflow_imported": measured.get("tensorflow_imported", result["tensorflow_imported"])}
                rows.append(row)

    if probs_base and "tf" in bare:
        import numpy as np

        labels = np.array([label for _, label in tests])
        reference = np.load(probs_base + ".tf.npy")
        for key in keys:
            if key == "tf":
                continue
            probs = np.load(probs_base + f".{key}.npy")
            rows.append({"runtime": key.split("-", 1)[0], "precision": bare[key]["precision"], "runtime_key": key,
                         "top1_agreement": round(float((probs.argmax(1) == reference.argmax(1)).mean()), 4),
                         "fp32_top1": round(float((reference.argmax(1) == labels).mean()), 4),
                         "top1": round(float((probs.argmax(1) == labels).mean()), 4), "photos": int(len(labels))})
    load_end = loadavg()
    log(f"load average at end: {load_end}")
    for row in rows:
        row["loadavg"] = f"start {load_start} end {load_end}"
    (work / "throughput.json").write_text(json.dumps(rows, indent=1) + "\n")  # the rows, also after a table run
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_table(rows, model=model, path=path)


def print_table(rows: list[dict], *, model: str, path: Path) -> None:
    def fmt(v, spec=""):
        return "-" if v is None else format(v, spec)

    latency = next((r["latency_ms"] for r in rows if r.get("latency_ms")), 0)
    print(f"\nmodel: {model} ({path.name}); {os.cpu_count()} CPUs; load average {rows[0]['loadavg'] if rows else ''}"
          + (f"; {latency:g} ms added to each worker request to S3/SQS" if latency else ""))
    print(f"\n{'runtime':<15} {'prec':<5} {'batch':>5} {'bare img/s':>10} {'x tf fp32':>9} {'e2e img/s':>9} "
          f"{'e2e/bare':>8} {'peak RSS MB':>11} {'cold start s':>12} {'messages':>8} {'TF loaded':>9} {'re-run':>6} "
          f"{'moto CPU ms/img':>15}")
    for r in rows:
        if "bare_img_s" not in r:
            continue
        print(f"{r['runtime_key']:<15} {r['precision']:<5} {r['batch']:>5} {fmt(r['bare_img_s'], '.2f'):>10} "
              f"{fmt(r['vs_tf_fp32'], '.2f'):>9} {fmt(r['e2e_img_s'], '.2f'):>9} {fmt(r['ratio'], '.3f'):>8} "
              f"{fmt(r['peak_rss_mb'], '.0f'):>11} {fmt(r['cold_start_s'], '.2f'):>12} {fmt(r['messages']):>8} "
              f"{str(r['tensorflow_imported']):>9} {fmt(r.get('fallback_rate'), '.1%'):>6} "
              f"{fmt(r.get('moto_cpu_ms_per_photo'), '.1f'):>15}")
    agreement = [r for r in rows if "top1_agreement" in r]
    if agreement:
        print(f"\n{'runtime':<15} {'prec':<5} {'photos':>6} {'top-1 agreement':>15} {'fp32 top-1':>10} {'top-1':>7}")
        for r in agreement:
            print(f"{r['runtime_key']:<15} {r['precision']:<5} {r['photos']:>6} {r['top1_agreement']:>15.2%} "
                  f"{r['fp32_top1']:>10.2%} {r['top1']:>7.2%}")


if __name__ == "__main__":
    main()
