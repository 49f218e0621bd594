"""`make demo`: the whole product on a local S3/SQS server, end to end.

1. start moto's server on 127.0.0.1 (the local S3 and SQS) and create the stack: a bucket whose
   ``incoming/`` prefix notifies a queue (with a dead-letter queue);
2. ``dogbreeds-train fit``: a frozen-VGG16 (ImageNet weights) transfer model on the sample
   photos' official train split;
3. ``dogbreeds-train keygen``: a signing key pair in ``demo-output/`` (``signing.key``,
   ``signing.pub``), then ``dogbreeds-train publish --sign-key`` the artifact, signed, to
   ``s3://<bucket>/models/``;
4. drop the held-out sample photos (official test split) into ``incoming/``, and a cat photo and
   an object photo from the held-out part of ``samples/photos/not-dogs/`` (never fitted on);
5. ``dogbreeds-worker run --until-empty`` serves the published version, pinned, and only if its
   signature verifies with ``signing.pub`` (``--trusted-key``); it drains the queue and writes one
   manifest per photo (its JSON logs, which say the model was verified, go to
   ``demo-output/worker.log``; the terminal shows a progress bar);
6. ``dogbreeds-worker report`` writes ``demo-output/report.html`` (one static page: summary,
   breeds, scores, every photo with its label) and ``export`` writes ``demo-output/labels.csv``;
   stop the server;
7. print the manifests as a table, true breed beside prediction (the cat and the object must be
   answered ``no_dog``), and the report's path.

It runs the same console commands a user would."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent

from infra.local_stack import MotoServer, create_stack  # noqa: E402


def run(*args: str, env: dict) -> None:
    print(f"\n$ {' '.join(args)}", flush=True)
    subprocess.run([str(BIN / args[0]), *args[1:]], cwd=ROOT, check=True, env=env)


def run_logged(*args: str, env: dict, log: Path, done, total: int) -> None:
    """Run a console command with its output (JSON log lines) in ``log``, showing a progress
    bar of ``done()`` out of ``total`` instead."""
    from tqdm import tqdm

    print(f"\n$ {' '.join(args)}   (logs: {log.relative_to(ROOT)})", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle, tqdm(total=total, desc=args[1], unit="photo") as bar:
        process = subprocess.Popen([str(BIN / args[0]), *args[1:]], cwd=ROOT, env=env, stdout=handle,
                                   stderr=subprocess.STDOUT)
        while True:
            try:
                process.wait(timeout=1)
                break
            except subprocess.TimeoutExpired:
                bar.update(done() - bar.n)
        bar.update(done() - bar.n)
    if process.returncode:
        print("".join(log.read_text().splitlines(keepends=True)[-20:]), file=sys.stderr)
        raise SystemExit(f"{args[0]} {args[1]} failed (exit {process.returncode}); see {log}")


def held_out_photos(photos: Path, manifest: Path) -> list[Path]:
    rows = [line.split("\t") for line in manifest.read_text().splitlines()]
    path_col, split_col = rows[0].index("relative_path"), rows[0].index("stanford_split")
    return [photos / r[path_col] for r in rows[1:] if r[split_col] == "test"]


def no_dog_photos(photos: Path) -> list[Path]:
    """The first cat and the first object photo of the not-dog folder's test part (the part
    `fit` neither trains the dog check on nor chooses its threshold with)."""
    from trainer.not_dogs import FOLDER, find_not_dogs, split_not_dogs

    root = photos / FOLDER
    test = split_not_dogs(find_not_dogs(root)).test
    return [root / next(p for p in test if p.startswith(group)) for group in ("cats/", "imagenet-objects/")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo-output", help="Working folder (recreated).")
    parser.add_argument("--model", default="vgg16_transfer", help="Model family to train.")
    parser.add_argument("--augment-copies", default="2", help="Augmented copies per training photo.")
    args = parser.parse_args()
    out = ROOT / args.out
    shutil.rmtree(out, ignore_errors=True)
    photos, split = ROOT / "samples" / "photos", ROOT / "samples" / "MANIFEST.tsv"
    started = time.perf_counter()

    with MotoServer() as server:
        env = {**os.environ, **server.environment()}
        os.environ.update(server.environment())
        import boto3

        s3, sqs = boto3.client("s3"), boto3.client("sqs")
        stack = create_stack(s3, sqs, bucket="dogbreeds-demo", queue="dogbreeds-demo-photos")
        print(f"local S3/SQS at {server.endpoint}: bucket {stack.bucket}, queue {stack.queue_url}")

        run("dogbreeds-train", "fit", str(photos), "--model", args.model, "--image-size", "224", "--split-file", str(split),
            "--run-dir", str(out / "run"), "--augment-copies", args.augment_copies, "--epochs", "60",
            "--cache-dir", str(out / "cache"), env=env)
        run("dogbreeds-train", "keygen", str(out / "signing"), env=env)
        run("dogbreeds-train", "publish", str(out / "run"), "--to", f"s3://{stack.bucket}/models",
            "--name", "demo-breeds", "--sign-key", str(out / "signing.key"), env=env)
        version = s3.get_object(Bucket=stack.bucket, Key="models/demo-breeds/latest")["Body"].read().decode()

        test_photos = held_out_photos(photos, split)
        for path in test_photos:
            s3.upload_file(str(path), stack.bucket, f"incoming/{path.parent.name}/{path.name}")
        without_dog = no_dog_photos(photos)
        for path in without_dog:
            s3.upload_file(str(path), stack.bucket, f"incoming/no-dog/{path.name}")
        print(f"\nuploaded {len(test_photos)} held-out dog photos and {len(without_dog)} photos without a dog "
              f"({', '.join(p.name for p in without_dog)}) to s3://{stack.bucket}/incoming/")

        def manifests_written() -> int:  # one S3 event, so one message and one manifest, per photo
            return s3.list_objects_v2(Bucket=stack.bucket, Prefix="manifests/").get("KeyCount", 0)

        run_logged("dogbreeds-worker", "run", "--model", f"s3://{stack.bucket}/models/demo-breeds/{version}",
                   "--trusted-key", str(out / "signing.pub"), "--queue-url", stack.queue_url, "--until-empty",
                   "--wait-seconds", "2", env=env, log=out / "worker.log", done=manifests_written,
                   total=len(test_photos) + len(without_dog))
        verified = "model signature verified" in (out / "worker.log").read_text(errors="replace")
        print(f"worker served demo-breeds/{version}: "
              + ("signature verified with signing.pub" if verified else "NOT verified (see worker.log)"))

        items = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket, Prefix="manifests/"):
            for obj in page.get("Contents", []):
                items += json.loads(s3.get_object(Bucket=stack.bucket, Key=obj["Key"])["Body"].read())["items"]
        dead = sqs.get_queue_attributes(QueueUrl=stack.dlq_url, AttributeNames=["ApproximateNumberOfMessages"])

        manifests = f"s3://{stack.bucket}/manifests/"
        run("dogbreeds-worker", "report", manifests, "--out", str(out / "report.html"),
            "--title", "dogbreeds demo: held-out sample photos", env=env)
        run("dogbreeds-worker", "export", manifests, "--out", str(out / "labels.csv"), env=env)

    print(f"\n{'photo (s3://' + stack.bucket + '/incoming/...)':<40} {'true breed':<22} {'predicted':<22} score")
    correct = no_dog = 0
    for item in sorted(items, key=lambda i: i["key"]):
        folder = item["key"].split("/")[1]
        true = "no_dog" if folder == "no-dog" else folder.split("-", 1)[1].replace("_", " ")
        predicted = {"ok": item["breed"], "no_dog": "no_dog"}.get(item["status"]) or \
            f"{item['status'].upper()} {item.get('error_code') or ''}"
        correct += predicted == true and true != "no_dog"
        no_dog += predicted == true == "no_dog"
        mark = "" if predicted == true else "  <- wrong"
        score = item.get("score") if item["status"] == "ok" else item.get("dog_score")
        print(f"{item['key'].split('/')[-1]:<40} {true:<22} {predicted:<22} {score or 0:.2f}{mark}")
    print(f"\n{len(items)} photos in manifests ({len(test_photos) + len(without_dog)} uploaded), "
          f"dead-lettered messages: {dead['Attributes']['ApproximateNumberOfMessages']}")
    print(f"held-out accuracy: {correct}/{len(test_photos)} = {correct / max(1, len(test_photos)):.1%}; "
          f"photos without a dog answered no_dog: {no_dog}/{len(without_dog)} (score column: the dog score); "
          f"demo took {time.perf_counter() - started:.0f}s")
    print(f"worker logs: {out / 'worker.log'}; labels: {out / 'labels.csv'}\nreport: {out / 'report.html'}")


if __name__ == "__main__":
    main()
