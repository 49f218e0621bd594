"""Fleet benchmark: N pollers (processes) draining one queue of S3 events on the local S3/SQS server.

For each N of ``--pollers`` (1, 2, 4 by default), on a fresh bucket (versioning on) and queue of a
moto server on 127.0.0.1:

1. ``--photos`` sample photos are uploaded under ``incoming/``: one S3 ObjectCreated event per photo
   reaches the queue (as in production);
2. N ``dogbreeds-worker run --until-empty`` processes start, each with ``DOGBREEDS_THREADS`` =
   the CPUs / N (``--threads``); each loads its model and then waits, before its first receive,
   until all are ready, so they start draining together (benchmarks/common.py: botocore event hooks,
   nothing inside the worker is patched);
3. when all have exited, the bucket and the queues are read back.

Printed per N:

- ``img/s``: photos / (all pollers released -> last manifest written);
- ``extra completions``: a message finished more than once (``message done`` log lines per SQS
  message id, across all pollers: a redelivered message that two pollers, or one poller twice,
  completed), and how many of them rewrote their manifest with **identical** bytes (every version of
  every manifest is read back from the versioned bucket and compared by sha256) or with different
  bytes (must be 0: a redelivered message must give the same manifest);
- ``lost``: photos with no entry in any manifest; ``duplicated``: photos in more than one manifest;
- ``dead-lettered`` (messages in the DLQ) and ``left`` (messages still in the queue);
- ``renewals``: visibility-timeout renewals by the pollers' heartbeats (ChangeMessageVisibility
  entries extending a message to ``--visibility-timeout``), and ``hand-backs`` (messages made
  visible again early: failed ones, or ones received ahead when a poller stopped).

``--visibility-timeout`` and ``--heartbeat`` are passed to the pollers: a heartbeat longer than the
timeout makes messages reappear while they are being classified, which exercises the duplicate
detection (``--heartbeat 30 --visibility-timeout 2``). Targets: 0 lost, every extra completion an
identical rewrite, and images/s flat (not falling) once the cores are full.

``--json`` prints one JSON list of rows; ``--model`` takes any artifact URI (default: the model
``make bench`` trains, see benchmarks/throughput.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    child_command,
    default_model,
    fill_queue,
    loadavg,
    local_server,
    log,
    manifest_items,
    new_stack,
    parse_result,
    repeat_to,
    sample_photos,
)


def completions(log_text: str) -> list[dict]:
    """The ``message done`` lines of a poller's JSON log that wrote a manifest (other lines, and the
    s3:TestEvent a new notification configuration sends, are ignored)."""
    out = []
    for line in log_text.splitlines():
        if '"message done"' not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("message") == "message done" and record.get("manifest"):  # not an ignored s3:TestEvent
            out.append(record)
    return out


def extra_completions(done: list[dict]) -> dict[str, int]:
    """Message id -> times it was completed beyond the first (only those completed twice or more)."""
    counts = Counter(record.get("message_id") for record in done)
    return {message_id: n - 1 for message_id, n in counts.items() if n > 1}


def manifest_versions(s3, bucket: str, prefix: str, evidence: Path | None = None) -> dict[str, list[str]]:
    """Manifest key -> sha256 of every stored version's bytes, oldest first. With ``evidence``, the
    versions of a manifest whose bytes differ are saved there (``<key>.<n>.json``) to be compared."""
    versions: dict[str, list[tuple[str, str, bytes]]] = {}
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        for version in page.get("Versions", []):
            body = s3.get_object(Bucket=bucket, Key=version["Key"], VersionId=version["VersionId"])["Body"].read()
            versions.setdefault(version["Key"], []).append((version["LastModified"].isoformat(),
                                                           hashlib.sha256(body).hexdigest(), body))
    out = {}
    for key, items in versions.items():
        items.sort(key=lambda item: item[0])
        out[key] = [digest for _, digest, _ in items]
        if evidence is not None and len(set(out[key])) > 1:
            evidence.mkdir(parents=True, exist_ok=True)
            for n, (_, _, body) in enumerate(items):
                (evidence / f"{key.replace('/', '_')}.{n}.json").write_bytes(body)
    return out


def manifest_entries(s3, bucket: str, prefix: str) -> Counter:
    """Photo key -> manifests (latest versions) that list it."""
    return Counter(manifest_items(s3, bucket, prefix))


def drain_count(sqs, queue_url: str) -> int:
    """Messages in a queue (received and deleted, so they are counted once)."""
    count = 0
    while True:
        messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                       VisibilityTimeout=60).get("Messages", [])
        if not messages:
            return count
        count += len(messages)
        sqs.delete_message_batch(QueueUrl=queue_url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                                                              for i, m in enumerate(messages)])


def run_fleet(server, model: str, photos: list[Path], pollers: int, threads: int, args, work: Path) -> dict:
    run_id = f"fleet-{pollers}-{int(time.time())}"
    s3, sqs, stack = new_stack(run_id, max_receive_count=args.max_receive_count)
    s3.put_bucket_versioning(Bucket=stack.bucket, VersioningConfiguration={"Status": "Enabled"})
    keys, messages = fill_queue(s3, sqs, stack, photos, "events")
    log(f"{pollers} poller(s), {threads} thread(s) each: {len(keys)} photos, {messages} messages queued; "
        f"load {loadavg()}")

    folder = Path(tempfile.mkdtemp(prefix=f"{run_id}-", dir=work))
    go = folder / "go"
    argv = ["run", "--model", model, "--queue-url", stack.queue_url, "--until-empty", "--wait-seconds", "1",
            "--batch-size", str(args.batch_size), "--output-prefix", "manifests",
            "--visibility-timeout", str(args.visibility_timeout), "--heartbeat", str(args.heartbeat),
            "--retry-delay", "1", *args.worker_args.split()]
    env = {**os.environ, **server.environment(), "BENCH_GO": str(go), "DOGBREEDS_THREADS": str(threads),
           "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    if args.runtime:
        env["DOGBREEDS_RUNTIME"] = args.runtime
    processes = []
    for i in range(pollers):
        out, err = open(folder / f"poller-{i}.out", "w"), open(folder / f"poller-{i}.err", "w")
        processes.append((subprocess.Popen(child_command("worker", argv), cwd=ROOT, stdout=out, stderr=err,
                                           env={**env, "BENCH_READY": str(folder / f"ready-{i}"),
                                                "BENCH_T0": repr(time.time())}), out, err))
    try:
        deadline = time.time() + args.timeout
        while not all((folder / f"ready-{i}").exists() for i in range(pollers)):
            if any(p.poll() is not None for p, _, _ in processes):
                break  # one died before it got ready: reported below
            if time.time() > deadline:
                raise RuntimeError("the pollers did not get ready in time")
            time.sleep(0.1)
        released = time.time()
        go.touch()
        for process, _, _ in processes:
            process.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for process, out, err in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
            out.close()
            err.close()

    results, done = [], []
    for i, (process, _, _) in enumerate(processes):
        stdout = (folder / f"poller-{i}.out").read_text()
        stderr = (folder / f"poller-{i}.err").read_text()
        if process.returncode != 0:
            raise RuntimeError(f"poller {i} exited with {process.returncode}:\n{stderr[-3000:]}")
        results.append(parse_result(stdout))
        done += completions(stdout + "\n" + stderr)  # Powertools logs to stdout; stderr in case that changes

    versions = manifest_versions(s3, stack.bucket, "manifests/", evidence=folder / "differing")
    rewrites = [digests for digests in versions.values() if len(digests) > 1]
    identical = sum(len(d) - 1 for d in rewrites if len(set(d)) == 1)
    differing = sum(len(d) - 1 for d in rewrites if len(set(d)) > 1)
    entries = manifest_entries(s3, stack.bucket, "manifests/")
    photo_keys = Counter(keys)
    lost = sum(1 for key in photo_keys if entries[key] == 0)
    duplicated = sum(1 for key in photo_keys if entries[key] > 1)
    unexpected = sum(1 for key in entries if key not in photo_keys)
    dead = drain_count(sqs, stack.dlq_url)
    left = drain_count(sqs, stack.queue_url)
    extra = extra_completions(done)
    last = max((t for r in results for t, _, _ in r["manifests"]), default=released)
    per_poller = [len(completions((folder / f"poller-{i}.out").read_text())) for i in range(pollers)]
    return {
        "pollers": pollers, "threads_per_poller": threads, "photos": len(keys), "messages": messages,
        "img_s": round(len(keys) / (last - released), 2) if last > released else None,
        "seconds": round(last - released, 2),
        "completions": len(done), "messages_completed": len({r.get("message_id") for r in done}),
        "extra_completions": sum(extra.values()), "manifest_puts": sum(len(r["manifests"]) for r in results),
        "manifest_versions": sum(len(d) for d in versions.values()), "manifests": len(versions),
        "identical_rewrites": identical, "differing_rewrites": differing,
        "lost": lost, "duplicated": duplicated, "unexpected_entries": unexpected,
        "dead_lettered": dead, "left_in_queue": left,
        "renewals": sum(r["renewals"] for r in results), "hand_backs": sum(r["hand_backs"] for r in results),
        "receives": sum(r["calls"].get("ReceiveMessage", 0) for r in results),
        "completions_per_poller": per_poller, "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
        "cpu_s_per_poller": [r["cpu_s"] for r in results], "loadavg": loadavg(), "logs": str(folder),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Artifact URI (default: the model make bench trains, under --work).")
    parser.add_argument("--work", default=str(ROOT / ".cache" / "throughput"),
                        help="Working folder (the default model is made or found here; poller logs go to fleet/).")
    parser.add_argument("--pollers", default="1,2,4", help="Comma-separated numbers of pollers to run, in turn.")
    parser.add_argument("--photos", type=int, default=384, help="Photos (one S3 event each) per run.")
    parser.add_argument("--threads", default="auto",
                        help="Inference threads per poller (DOGBREEDS_THREADS); auto: this process's CPUs / pollers, "
                             "at least 1.")
    parser.add_argument("--runtime", help="Runtime key for every poller (default: the worker's auto choice).")
    parser.add_argument("--batch-size", type=int, default=16, help="Worker --batch-size.")
    parser.add_argument("--visibility-timeout", type=int, default=30, help="Worker --visibility-timeout (seconds).")
    parser.add_argument("--heartbeat", type=float, default=10.0, help="Worker --heartbeat (seconds between renewals).")
    parser.add_argument("--max-receive-count", type=int, default=5, help="Receives before a message is dead-lettered.")
    parser.add_argument("--worker-args", default="", help="Extra `dogbreeds-worker run` options.")
    parser.add_argument("--timeout", type=float, default=1800, help="Seconds a run may take before it is stopped.")
    parser.add_argument("--json", action="store_true", help="Print one JSON list of rows instead of a table.")
    args = parser.parse_args()

    work = Path(args.work)
    (work / "fleet").mkdir(parents=True, exist_ok=True)
    load_start = loadavg()
    model = args.model or default_model(work)
    photos = repeat_to(sample_photos(), args.photos)
    cpus = len(os.sched_getaffinity(0))
    rows = []
    with local_server() as server:
        for n in (int(p) for p in args.pollers.split(",")):
            threads = max(1, cpus // n) if args.threads == "auto" else int(args.threads)
            rows.append(run_fleet(server, model, photos, n, threads, args, work / "fleet"))
            log(f"  {rows[-1]}")
    for row in rows:
        row["loadavg_start"] = load_start
    (work / "fleet.json").write_text(json.dumps(rows, indent=1) + "\n")
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"\nmodel: {model}; {cpus} CPUs; {args.photos} photos, one S3 event each; visibility timeout "
          f"{args.visibility_timeout} s, heartbeat {args.heartbeat:g} s; load average {load_start} -> {loadavg()}")
    print(f"\n{'pollers':>7} {'threads':>7} {'img/s':>7} {'extra completions':>17} {'identical':>9} {'differing':>9} "
          f"{'lost':>4} {'duplicated':>10} {'dead-lettered':>13} {'left':>4} {'renewals':>8} {'hand-backs':>10} "
          f"{'peak RSS MB':>11}")
    for r in rows:
        print(f"{r['pollers']:>7} {r['threads_per_poller']:>7} {r['img_s'] or 0:>7.2f} {r['extra_completions']:>17} "
              f"{r['identical_rewrites']:>9} {r['differing_rewrites']:>9} {r['lost']:>4} {r['duplicated']:>10} "
              f"{r['dead_lettered']:>13} {r['left_in_queue']:>4} {r['renewals']:>8} {r['hand_backs']:>10} "
              f"{r['peak_rss_mb']:>11.0f}")
    print("\n" + "\n".join(verdicts(rows, cpus)))


def verdicts(rows: list[dict], cpus: int) -> list[str]:
    """The targets, each with what was measured: nothing lost or left, every extra completion an
    identical rewrite, images/s not falling once the pollers fill the CPUs (within 10%)."""
    def mark(ok: bool) -> str:
        return "met" if ok else "NOT MET"

    lost = sum(r["lost"] + r["left_in_queue"] + r["dead_lettered"] for r in rows)
    extra = sum(r["extra_completions"] for r in rows)
    differing = sum(r["differing_rewrites"] for r in rows)
    full = [r for r in rows if r["pollers"] * r["threads_per_poller"] >= cpus and r["img_s"]]
    best = max((r["img_s"] for r in full), default=None)
    flat = all(r["img_s"] >= 0.9 * best for r in full) if best else None
    rates = ", ".join(f"{r['pollers']}: {r['img_s']:.2f}" for r in full)
    return [f"target 0 lost: {mark(lost == 0)} ({lost} lost, left in the queue or dead-lettered)",
            f"target every extra completion an identical rewrite: {mark(differing == 0)} ({extra} extra completions, "
            f"{differing} rewrote their manifest with different bytes)",
            "target images/s flat once the CPUs are full: " + ("-" if flat is None else
            f"{mark(flat)} (pollers: images/s {rates})")]


if __name__ == "__main__":
    main()
