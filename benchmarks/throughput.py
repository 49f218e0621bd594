"""Throughput benchmark (`make bench`): the bare model against the whole worker, per runtime.

In one run, on this machine:

1. **bare model**: images/s of ``predict`` (the worker's own loader, ``worker.artifact.loading.load_artifact``
   with ``runtime=...``) on preprocessed float32 batches of real photos already in memory, per
   runtime/precision the artifact carries and per batch size; one fresh process per runtime.
2. **end to end**: a moto server on 127.0.0.1 (``infra.local_stack.MotoServer``) stands in for
   S3 and SQS; N real sample photos (samples/photos, Stanford size) are put in the queue as
   messages (``--mode events``: one S3 ObjectCreated notification per photo, as `make demo`
   does; ``--mode jobs``: job messages of ``--job-size`` keys); then ``dogbreeds-worker run
   --until-empty`` runs as a subprocess, its CLI unchanged (benchmarks/common.py times its S3/SQS
   calls with botocore event hooks).
   ``e2e_img_s`` = photos / (first batch received -> last manifest written);
   ``cold_start_s`` = process start -> first manifest written; ``peak_rss_mb`` = the worker
   process's peak resident memory.
3. **agreement**: each fast variant against the fp32 SavedModel (runtime ``tf``) on real
   test photos: the held-out sample photos (``stanford_split == test`` in samples/MANIFEST.tsv)
   plus, when ../shared/data/stanford-dogs-subset exists, that dataset's official test photos of
   the model's breeds (duplicates by sha256 dropped).

**Pinned rows** (``--pin both``, the default, or ``only``): moto shares the worker's cores, and on a
small machine its CPU (which real S3/SQS would not take from the worker) is a large part of what
separates e2e from bare. So the bare model and the worker are measured again with the moto server
(and this script) pinned to one core and the worker (and the bare model) to another, with
``os.sched_setaffinity``; the worker's thread pools (TensorFlow intra/inter-op threads, OpenVINO
streams; ``DOGBREEDS_THREADS``) are sized to its one CPU. ``e2e/bare`` of a pinned row is the
worker's own overhead on the same one-core budget. Unpinned rows are kept (``--pin off``: only them).

The artifact is ``--model`` (a folder, registry or s3:// URI); by default one is trained like
scripts/demo.py does (``dogbreeds-train fit samples/photos --split-file samples/MANIFEST.tsv``,
then ``dogbreeds-train publish`` to a local registry under ``--work``; reused on later runs).

Also reported: ``fallback_rate`` (the share of photos the int8 -> bf16 cascade ran twice in the
bare measurement), and CPU milliseconds per photo of the worker process and of the moto server
during each end-to-end run.

Prints a table; ``--json`` prints one JSON list: rows ``{"runtime", "precision", "batch", "pinned",
"cpus", "bare_img_s", "e2e_img_s", "ratio", "peak_rss_mb", "cold_start_s", ...}`` (runtime ``tf``,
precision ``fp32`` is the baseline; ``vs_tf_fp32`` = bare images/s over the baseline's at the
same batch size and pinning) and, per fast variant, ``{"runtime", "precision", "top1_agreement",
"fp32_top1", "top1", "photos"}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    Column,
    end_to_end,
    loadavg,
    local_server,
    log,
    machine_pin_plan,
    pin_process,
    pinned_environment,
    print_table,
    process_cpus,
    repeat_to,
    run_child,
    sample_photos,
    test_photos,
)
from benchmarks.common import default_model as demo_model  # noqa: E402

MODEL_NAME = "bench-breeds"
PINNINGS = {"both": (False, True), "only": (True,), "off": (False,)}


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
    parser.add_argument("--pin", choices=tuple(PINNINGS), default="both",
                        help="both: unpinned rows and pinned rows (moto on one core, the worker and the bare model on "
                             "another, thread pools sized to it); only: pinned rows; off: unpinned rows.")
    parser.add_argument("--no-e2e", action="store_true", help="Skip the end-to-end runs.")
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="Add this much latency to each of the worker's S3/SQS requests (a TCP proxy in front "
                             "of moto), as real S3/SQS round trips have.")
    parser.add_argument("--worker-args", default="", help="Extra `dogbreeds-worker run` options for the end-to-end "
                                                          "runs, e.g. --worker-args=--no-pipeline.")
    parser.add_argument("--no-agreement", action="store_true", help="Skip the agreement rows.")
    parser.add_argument("--json", action="store_true", help="Print one JSON list of rows instead of a table.")
    args = parser.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load_start = loadavg()
    log(f"load average at start: {load_start}")
    from worker.artifact import read_labels, read_manifest, resolve_artifact

    model = args.model or demo_model(work, MODEL_NAME)
    path = resolve_artifact(model)
    manifest = read_manifest(path)
    folders = [label.folder for label in read_labels(path)]
    keys = args.runtimes.split(",") if args.runtimes else list(manifest.runtimes)
    if "tf" in keys:  # the baseline first
        keys = ["tf"] + [k for k in keys if k != "tf"]
    for key, entry in manifest.runtimes.items():
        log(f"artifact runtime {key}: {entry.get('path')} {entry.get('precision')} "
            f"agreement at publish: {(entry.get('agreement') or {}).get('top1_agreement', 'reference')}")
    pinnings = PINNINGS[args.pin]
    plan = None
    if True in pinnings:
        try:
            plan = machine_pin_plan()
        except ValueError as error:  # one CPU: nothing to pin apart
            log(f"no pinned rows: {error}")
            pinnings = tuple(p for p in pinnings if not p) or (False,)
    if plan:
        log(f"pinned rows: {plan.describe()}")

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
    for pinned in pinnings:
        for key in keys:
            log(f"bare model: {key}" + (" (pinned)" if pinned else ""))
            child_args = ["--model", str(path), "--runtime", key, "--batches", args.bare_batches,
                          "--seconds", str(args.seconds)]
            if probs_base and not pinned:
                child_args += ["--probs", probs_base]
            bare[(key, pinned)] = run_child("bare", child_args, env=pinned_environment(plan.worker if pinned else None))

    e2e = {}
    if not args.no_e2e:
        from latency_proxy import LatencyProxy

        photos = repeat_to(sample_photos(), args.photos)
        modes = ["events", "jobs"] if args.mode == "both" else [args.mode]
        everywhere = os.sched_getaffinity(0)
        with local_server() as server, LatencyProxy("127.0.0.1", server.port, args.latency_ms / 1000) as proxy:
            worker_endpoint = proxy.endpoint if args.latency_ms > 0 else None
            for pinned in pinnings:
                # moto, this script and its proxy threads on the server's core; the worker on its own
                pin_process(server.process.pid, plan.server if pinned else everywhere)
                pin_process(os.getpid(), plan.server if pinned else everywhere)
                for key in keys:
                    for batch in (int(b) for b in args.worker_batches.split(",")):
                        for mode in modes:
                            run_id = f"{key}-{batch}-{mode}{'-pinned' if pinned else ''}".replace("_", "-").lower()
                            log(f"end to end: {key}, batch {batch}, {mode} ({len(photos)} photos)"
                                f"{', pinned' if pinned else ''}, load {loadavg()}")
                            measured = end_to_end(server, str(path), key, batch, photos, mode, args.job_size, run_id,
                                                  args.worker_args.split(), worker_endpoint,
                                                  worker_cpus=plan.worker if pinned else None)
                            if pinned:
                                measured["moto_cpus"] = ",".join(map(str, sorted(process_cpus(server.process.pid))))
                            e2e[(key, batch, mode, pinned)] = measured
                            log(f"  {measured}")
            pin_process(os.getpid(), everywhere)

    rows = []
    for pinned in pinnings:
        base = bare.get(("tf", pinned), {}).get("img_s", {})
        for key in keys:
            result = bare[(key, pinned)]
            batches = sorted({int(b) for b in result["img_s"]} | {b for (k, b, _, p) in e2e if k == key and p == pinned})
            for batch in batches:
                for mode in (sorted({m for (k, b, m, p) in e2e if (k, b, p) == (key, batch, pinned)}) or [None]):
                    bare_img_s = result["img_s"].get(str(batch), result["img_s"].get(batch))
                    measured = e2e.get((key, batch, mode, pinned), {})
                    rows.append({
                        "runtime": key.split("-", 1)[0], "precision": result["precision"], "batch": batch,
                        "pinned": pinned, "cpus": plan.describe() if pinned else f"{os.cpu_count()} shared",
                        "bare_img_s": bare_img_s, "e2e_img_s": measured.get("e2e_img_s"),
                        "ratio": round(measured["e2e_img_s"] / bare_img_s, 3) if measured and bare_img_s else None,
                        "peak_rss_mb": measured.get("peak_rss_mb"), "cold_start_s": measured.get("cold_start_s"),
                        "runtime_key": key, "messages": mode, "latency_ms": args.latency_ms if measured else None,
                        "vs_tf_fp32": round(bare_img_s / base[str(batch)], 2) if str(batch) in base and bare_img_s else None,
                        "bare_peak_rss_mb": result["peak_rss_mb"], "load_s": result["load_s"],
                        "bare_cpus": result.get("cpus"), "worker_cpus": measured.get("worker_cpus"),
                        "moto_cpus": measured.get("moto_cpus"),
                        "fallback_rate": measured.get("fallback_rate", result.get("fallback_rate")),
                        "worker_cpu_ms_per_photo": measured.get("worker_cpu_ms_per_photo"),
                        "moto_cpu_ms_per_photo": measured.get("moto_cpu_ms_per_photo"),
                        "requests": measured.get("requests"),
                        "tensorflow_imported": measured.get("tensorflow_imported", result["tensorflow_imported"])})

    if probs_base and ("tf", False) in bare:
        import numpy as np

        labels = np.array([label for _, label in tests])
        reference = np.load(probs_base + ".tf.npy")
        for key in keys:
            if key == "tf" or (key, False) not in bare:
                continue
            probs = np.load(probs_base + f".{key}.npy")
            rows.append({"runtime": key.split("-", 1)[0], "precision": bare[(key, False)]["precision"], "runtime_key": key,
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
        print_report(rows, model=model, path=path)


def print_report(rows: list[dict], *, model: str, path: Path) -> None:
    def fmt(v, spec=""):
        return "-" if v is None else format(v, spec)

    latency = next((r["latency_ms"] for r in rows if r.get("latency_ms")), 0)
    pinned = next((r["cpus"] for r in rows if r.get("pinned")), None)
    print(f"\nmodel: {model} ({path.name}); {os.cpu_count()} CPUs; load average {rows[0]['loadavg'] if rows else ''}"
          + (f"; {latency:g} ms added to each worker request to S3/SQS" if latency else "")
          + (f"\npinned rows: {pinned}; the worker's thread pools sized to its one CPU" if pinned else ""))
    print(f"\n{'runtime':<15} {'prec':<5} {'pinned':>6} {'batch':>5} {'bare img/s':>10} {'x tf fp32':>9} "
          f"{'e2e img/s':>9} {'e2e/bare':>8} {'peak RSS MB':>11} {'cold start s':>12} {'messages':>8} {'TF loaded':>9} "
          f"{'re-run':>6} {'moto CPU ms/img':>15}")
    for r in rows:
        if "bare_img_s" not in r:
            continue
        print(f"{r['runtime_key']:<15} {r['precision']:<5} {'yes' if r['pinned'] else 'no':>6} {r['batch']:>5} "
              f"{fmt(r['bare_img_s'], '.2f'):>10} {fmt(r['vs_tf_fp32'], '.2f'):>9} {fmt(r['e2e_img_s'], '.2f'):>9} "
              f"{fmt(r['ratio'], '.3f'):>8} {fmt(r['peak_rss_mb'], '.0f'):>11} {fmt(r['cold_start_s'], '.2f'):>12} "
              f"{fmt(r['messages']):>8} {str(r['tensorflow_imported']):>9} {fmt(r.get('fallback_rate'), '.1%'):>6} "
              f"{fmt(r.get('moto_cpu_ms_per_photo'), '.1f'):>15}")
    ratios = [r for r in rows if r.get("ratio") is not None]
    if any(r["pinned"] for r in ratios):
        print(f"\n{'runtime':<15} {'messages':>8} {'e2e/bare unpinned':>17} {'e2e/bare pinned':>15}")
        for key, mode in dict.fromkeys((r["runtime_key"], r["messages"]) for r in ratios):
            by_pin = {r["pinned"]: r["ratio"] for r in ratios if (r["runtime_key"], r["messages"]) == (key, mode)}
            print(f"{key:<15} {mode:>8} {fmt(by_pin.get(False), '.3f'):>17} {fmt(by_pin.get(True), '.3f'):>15}")
        pinned_ratios = [r["ratio"] for r in ratios if r["pinned"]]
        print(f"target pinned e2e/bare >= 0.9 for every runtime and message kind: "
              f"{'met' if min(pinned_ratios) >= 0.9 else 'NOT MET'} (lowest {min(pinned_ratios):.3f})")
    agreement = [r for r in rows if "top1_agreement" in r]
    if agreement:
        print()
        print_table([Column("runtime", 15, "runtime_key", left=True), Column("prec", 5, "precision", left=True),
                     Column("photos", 6, "photos"), Column("top-1 agreement", 15, "top1_agreement", ".2%"),
                     Column("fp32 top-1", 10, "fp32_top1", ".2%"), Column("top-1", 7, "top1", ".2%")], agreement)


if __name__ == "__main__":
    main()
