"""Cost benchmark: what a million photos cost per model and runtime, beside its accuracy.

For each model (``--models``: VGG16 and EfficientNet-Lite0 transfer models at 224 and 320 px) and
each runtime its artifact carries (``--runtimes``: TF fp32, OpenVINO bf16, the OpenVINO int8 -> bf16
cascade):

1. **the model**: trained on cached backbone features as ``benchmarks/accuracy.py`` does it (the 11
   breeds of ../shared/data/stanford-dogs-subset, official Stanford split, 10% of train held out,
   default head, 1 augmented copy; the run folder is accuracy.py's own, so either script reuses the
   other's), then published with its OpenVINO variants (``trainer.publish.build_artifact``) under
   ``--work``; or ``--model LABEL=URI`` takes a published artifact instead. Each step is skipped when
   its output exists: an interrupted run resumes where it stopped.
2. **images/s per vCPU**: the moto S3/SQS server pinned to one core and, on another, the bare model
   (batch 16) and then the whole worker (``dogbreeds-worker run``, one S3 event per photo, as
   deployed) with one inference thread: the worker's images/s on one core is what Lambda and
   Fargate bill. Its peak RSS too. Cached per artifact version, runtime and settings.
3. **top-1** of that runtime on the Stanford test split (the subset's official test photos) and on
   ../shared/data/dogs-outside-stanford/ (the same breeds, photos outside Stanford Dogs), predicted
   with all CPUs. Cached.
4. **cost** (benchmarks/pricing.py, which states the rates, their date and sources): the Lambda memory
   to use (one vCPU = 1,769 MB, or 1.25 x peak RSS if larger), GB-seconds and dollars per million
   photos on x86 and Arm Lambda (Arm at the x86 images/s measured here: not measured on Graviton),
   invocations (10 one-photo messages each), a busy 1-vCPU Fargate task running the poller, the
   utilisation above which Fargate is cheaper, and the S3/SQS request charges (the same for both;
   from the request counts of the worker run).

Prints a table; ``--json`` prints one JSON list of rows; ``--markdown`` prints the README section
(the table, the rates and the template's MemorySize) to paste. Measured figures depend on this
machine's CPU: state it beside them (the output does).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import pricing  # noqa: E402
from benchmarks.common import (  # noqa: E402
    OUTSIDE,
    SHARED_DATA,
    end_to_end,
    labelled_photos,
    loadavg,
    log,
    machine_pin_plan,
    pin_process,
    pinned_environment,
    repeat_to,
    run_child,
    sample_photos,
)

#: label -> (model family, input size)
MODELS = {
    "vgg16-224": ("vgg16_transfer", 224),
    "vgg16-320": ("vgg16_transfer", 320),
    "efficientnet-lite0-224": ("efficientnet_lite0_transfer", 224),
    "efficientnet-lite0-320": ("efficientnet_lite0_transfer", 320),
}
RUNTIMES = ("tf", "openvino-bf16", "openvino-int8")
BATCH = 16
PHOTOS_PER_INVOCATION = 10  # an SQS batch of 10 one-photo S3 event messages (the template's BatchSize)


# --------------------------------------------------------------------------- models


def run_name(family: str, size: int, data_key: str) -> str:
    """benchmarks/accuracy.py's row name (so its run folders are shared): e.g. subset-vgg16_transfer-vgg-224-c1."""
    return f"{data_key}-{family}-vgg-{size}-c1"


def data_key(args) -> str:
    if args.data is None:
        return "subset"
    return "data-" + hashlib.sha256(f"{args.data}|{args.split_file}|{args.min_photos}".encode()).hexdigest()[:8]


def build_model(label: str, args) -> Path:
    """Fit (on cached features) and publish one model; each step skipped when already done."""
    family, size = MODELS[label]
    name = run_name(family, size, data_key(args))
    run_dir = Path(args.runs) / name
    dest = Path(args.work) / "artifacts" / name
    if (dest / "manifest.json").is_file():
        return dest
    if not (run_dir / "run.json").is_file():
        from trainer.experiment import RunConfig, fit_run

        subset = Path(args.data_root) / "stanford-dogs-subset"
        data = args.data or str(subset)
        split = args.split_file or (None if args.data else str(subset / "MANIFEST.tsv"))
        config = RunConfig(data=data, model=family, preprocessing="vgg", split_file=split,
                           min_photos=150 if args.min_photos is None else args.min_photos, val_fraction=0.1,
                           image_size=size, image_fit="crop", augment_copies=1, epochs=80, patience=8,
                           fine_tune_epochs=10, batch_size=64, cache_dir=args.cache_dir, seed=0, progress=True)
        log(f"{label}: training {run_dir}")
        started = time.perf_counter()
        fit_run(config, run_dir, verbose=0)
        log(f"{label}: trained in {time.perf_counter() - started:.0f} s")
    from trainer.publish import build_artifact

    log(f"{label}: publishing to {dest} (with the OpenVINO variants)")
    started = time.perf_counter()
    build_artifact(run_dir, dest, name.replace("_", "-"), version="cost")
    log(f"{label}: published in {time.perf_counter() - started:.0f} s")
    return dest


# --------------------------------------------------------------------------- measurements


def cached(path: Path, compute):
    """``compute()``'s JSON result, kept in ``path`` (written only once complete)."""
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return result


def top1_photos(folders: list[str], limit: int | None, data_root: Path) -> dict[str, list[tuple[Path, int]]]:
    """The Stanford test photos and the outside-Stanford photos of the model's breeds (every k-th
    one when ``limit`` caps a set, so every breed stays in it)."""
    outside = data_root / OUTSIDE.name
    sets = {"stanford_test": labelled_photos(data_root / "stanford-dogs-subset", folders, split="test"),
            "outside_stanford": labelled_photos(outside, folders) if (outside / "MANIFEST.tsv").is_file() else []}
    if limit:
        sets = {k: v[::max(1, -(-len(v) // limit))] for k, v in sets.items()}
    return sets


def measure_top1(artifact: Path, runtime: str, folders: list[str], args) -> dict:
    import numpy as np

    sets = top1_photos(folders, args.top1_limit, Path(args.data_root))
    listing = [str(p) for v in sets.values() for p, _ in v]
    digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:12]
    base = Path(args.work) / "top1" / f"{artifact.name}-{digest}"
    base.parent.mkdir(parents=True, exist_ok=True)
    Path(str(base) + ".json").write_text(json.dumps(listing))
    log(f"  top-1: {runtime} on {', '.join(f'{len(v)} {k}' for k, v in sets.items())} photos")
    run_child("bare", ["--model", str(artifact), "--runtime", runtime, "--batches", "", "--probs", str(base)])
    probs = np.load(f"{base}.{runtime}.npy")
    out, start = {}, 0
    for key, photos in sets.items():
        labels = np.array([label for _, label in photos], dtype=np.int64)
        predicted = probs[start:start + len(photos)].argmax(1) if photos else np.zeros(0, np.int64)
        out[key] = {"top1": round(float((predicted == labels).mean()), 4) if photos else None, "photos": len(photos)}
        start += len(photos)
    return out


def measure_speed(server, plan, artifact: Path, runtime: str, photos: list[Path], args) -> dict:
    bare = run_child("bare", ["--model", str(artifact), "--runtime", runtime, "--batches", str(BATCH),
                              "--seconds", str(args.seconds)], env=pinned_environment(plan.worker))
    run_id = f"cost-{hashlib.sha256(f'{artifact}|{runtime}|{time.time()}'.encode()).hexdigest()[:10]}"
    e2e = end_to_end(server, str(artifact), runtime, BATCH, photos, "events", BATCH, run_id,
                     worker_cpus=plan.worker)
    return {"bare_img_s": bare["img_s"][str(BATCH)], "bare_peak_rss_mb": bare["peak_rss_mb"],
            "precision": bare["precision"], "worker_img_s": e2e["e2e_img_s"], "peak_rss_mb": e2e["peak_rss_mb"],
            "requests_per_photo": {k: v / e2e["photos"] for k, v in e2e["requests"].items()},
            "worker_cpus": e2e["worker_cpus"], "server_cpus": ",".join(map(str, sorted(plan.server))),
            "photos": e2e["photos"], "worker_cpu_ms_per_photo": e2e["worker_cpu_ms_per_photo"],
            "moto_cpu_ms_per_photo": e2e["moto_cpu_ms_per_photo"], "loadavg": loadavg(),
            "measured": time.strftime("%Y-%m-%d %H:%M", time.localtime())}


class PinnedBench:
    """The moto server, started on first use with its threads pinned to the plan's server CPU, and the
    speed measurements run beside it (this script, which uploads and polls, on the server's CPU too)."""

    def __init__(self, plan):
        self.plan = plan
        self.server = None
        self.everywhere = os.sched_getaffinity(0)

    def measure(self, label: str, artifact: Path, runtime: str, photos: list[Path], args) -> dict:
        if self.server is None:
            from infra.local_stack import MotoServer

            self.server = MotoServer().__enter__()
            os.environ.update(self.server.environment())
            pin_process(self.server.process.pid, self.plan.server)
        pin_process(os.getpid(), self.plan.server)
        try:
            log(f"{label} {runtime}: images/s per vCPU ({self.plan.describe()}), load {loadavg()}")
            return measure_speed(self.server, self.plan, artifact, runtime, photos, args)
        finally:
            pin_process(os.getpid(), self.everywhere)

    def close(self) -> None:
        if self.server is not None:
            self.server.__exit__(None, None, None)


# --------------------------------------------------------------------------- cost


def cost_row(label: str, runtime: str, speed: dict, top1: dict, artifact: Path) -> dict:
    """Everything the table shows for one model and runtime, from its measurements."""
    rate = speed["worker_img_s"]
    memory = pricing.lambda_memory_mb(speed["peak_rss_mb"])
    x86 = pricing.lambda_cost_per_million(rate, memory, pricing.LAMBDA_X86, photos_per_invocation=PHOTOS_PER_INVOCATION)
    arm = pricing.lambda_cost_per_million(rate, memory, pricing.LAMBDA_ARM, photos_per_invocation=PHOTOS_PER_INVOCATION)
    vcpus, memory_gb = pricing.fargate_task(speed["peak_rss_mb"])
    fargate_x86 = pricing.fargate_usd_per_million(rate, vcpus, memory_gb, pricing.FARGATE_X86)
    fargate_arm = pricing.fargate_usd_per_million(rate, vcpus, memory_gb, pricing.FARGATE_ARM)
    family, size = MODELS.get(label, (label, None))
    return {
        "model": label, "family": family, "image_size": size, "runtime": runtime, "precision": speed["precision"],
        "artifact": str(artifact),
        "top1_stanford_test": top1["stanford_test"]["top1"], "photos_stanford_test": top1["stanford_test"]["photos"],
        "top1_outside_stanford": top1["outside_stanford"]["top1"],
        "photos_outside_stanford": top1["outside_stanford"]["photos"],
        "bare_img_s_per_vcpu": speed["bare_img_s"], "img_s_per_vcpu": rate,
        "worker_over_bare": round(rate / speed["bare_img_s"], 3) if speed["bare_img_s"] else None,
        "peak_rss_mb": speed["peak_rss_mb"],
        "lambda_memory_mb": memory, "lambda_vcpu_share": round(pricing.vcpu_share(memory), 3),
        "lambda_gb_s_per_million": round(x86.gb_seconds), "lambda_invocations_usd_per_million": round(x86.requests_usd, 4),
        "lambda_x86_usd_per_million": round(x86.usd, 2), "lambda_arm_usd_per_million": round(arm.usd, 2),
        "fargate_task": {"vcpu": vcpus, "memory_gb": memory_gb},
        "fargate_x86_usd_per_million_busy": round(fargate_x86, 2), "fargate_arm_usd_per_million_busy": round(fargate_arm, 2),
        "fargate_break_even_utilisation_x86": round(pricing.break_even_utilisation(x86.usd, fargate_x86), 3),
        "requests_usd_per_million": round(pricing.requests_usd_per_million(speed["requests_per_photo"]), 2),
        "requests_per_photo": {k: round(v, 3) for k, v in speed["requests_per_photo"].items()},
        "measured": speed["measured"], "loadavg": speed["loadavg"], "cpus": f"worker {speed['worker_cpus']}, "
                                                                            f"S3/SQS server {speed['server_cpus']}",
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def print_table(rows: list[dict]) -> None:
    print(f"\n{'model':<24} {'runtime':<14} {'top-1 test':>10} {'outside':>8} {'bare/vCPU':>9} {'img/s/vCPU':>10} "
          f"{'RSS MB':>6} {'Lambda MB':>9} {'GB-s/M':>8} {'x86 $/M':>8} {'Arm $/M':>8} {'Fargate $/M':>11} "
          f"{'break-even':>10} {'requests $/M':>12}")
    for r in rows:
        print(f"{r['model']:<24} {r['runtime']:<14} {pct(r['top1_stanford_test']):>10} {pct(r['top1_outside_stanford']):>8} "
              f"{r['bare_img_s_per_vcpu']:>9.2f} {r['img_s_per_vcpu']:>10.2f} {r['peak_rss_mb']:>6.0f} "
              f"{r['lambda_memory_mb']:>9} {r['lambda_gb_s_per_million']:>8} {r['lambda_x86_usd_per_million']:>8.2f} "
              f"{r['lambda_arm_usd_per_million']:>8.2f} {r['fargate_x86_usd_per_million_busy']:>11.2f} "
              f"{r['fargate_break_even_utilisation_x86']:>10.0%} {r['requests_usd_per_million']:>12.2f}")


def rate(usd: float) -> str:
    return f"{usd:.10f}".rstrip("0")


def even(utilisation: float) -> str:
    return f"{utilisation:.0%} utilisation" if utilisation <= 1 else "never (Lambda is cheaper even busy)"


def markdown(rows: list[dict], command: str) -> str:
    """The README section: the table, how it was measured, the rates with their date."""
    memory = max(r["lambda_memory_mb"] for r in rows)
    task = max((r["fargate_task"]["vcpu"], r["fargate_task"]["memory_gb"]) for r in rows)
    hourly_x86 = pricing.fargate_usd_per_hour(*task, pricing.FARGATE_X86)
    hourly_arm = pricing.fargate_usd_per_hour(*task, pricing.FARGATE_ARM)
    lines = [
        f"Measured by `{command}` on {cpu_name()} ({rows[0]['measured']}, load average {rows[0]['loadavg']}): "
        "images/s per vCPU is the whole worker (`dogbreeds-worker run`, one S3 event per photo) on one core "
        "with one inference thread, the local S3/SQS server pinned to another core; `bare` is the model alone on "
        "that core. Top-1: the Stanford test split (official, 11 breeds) and photos of the same breeds from "
        "outside Stanford Dogs (`../shared/data/dogs-outside-stanford/`).",
        "",
        "| model | runtime | top-1 Stanford test | top-1 outside Stanford | img/s per vCPU (bare) | img/s per vCPU "
        "(worker) | peak RSS MB | Lambda MB | GB-s per M photos | Lambda x86 $/M | Lambda Arm $/M* | Fargate x86 $/M "
        "(busy) | Fargate cheaper above |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['runtime']} | {pct(r['top1_stanford_test'])} | {pct(r['top1_outside_stanford'])} | "
            f"{r['bare_img_s_per_vcpu']:.2f} | {r['img_s_per_vcpu']:.2f} | {r['peak_rss_mb']:.0f} | "
            f"{r['lambda_memory_mb']} | {r['lambda_gb_s_per_million']:,} | {r['lambda_x86_usd_per_million']:.2f} | "
            f"{r['lambda_arm_usd_per_million']:.2f} | {r['fargate_x86_usd_per_million_busy']:.2f} | "
            f"{even(r['fargate_break_even_utilisation_x86'])} |")
    requests = sorted({r["requests_usd_per_million"] for r in rows})
    lines += [
        "",
        f"Rates (`benchmarks/pricing.py`): {pricing.REGION}, on-demand, as of {pricing.RATES_AS_OF}; "
        f"Lambda ${rate(pricing.LAMBDA_X86.usd_per_gb_second)} per GB-s (x86), ${rate(pricing.LAMBDA_ARM.usd_per_gb_second)} "
        f"(Arm), ${pricing.LAMBDA_X86.usd_per_million_requests:.2f} per million invocations "
        f"({PHOTOS_PER_INVOCATION} photos each, included); Fargate ${pricing.FARGATE_X86.usd_per_vcpu_hour} per "
        f"vCPU-hour + ${pricing.FARGATE_X86.usd_per_gb_hour} per GB-hour (x86), ${pricing.FARGATE_ARM.usd_per_vcpu_hour}"
        f" + ${pricing.FARGATE_ARM.usd_per_gb_hour} (Arm). Sources: {pricing.RATES_SOURCE}.",
        f"Lambda memory: one vCPU (1,769 MB: \"At 1,769 MB, a function has the equivalent of one vCPU\", AWS Lambda "
        "Developer Guide, *Configure Lambda function memory*), or 1.25 x peak RSS if larger; below one vCPU the "
        "GB-s per photo do not change (CPU share shrinks with memory), so more memory than the worker needs only "
        f"buys latency. The template's default `MemorySize` is the largest of the column: **{memory} MB**.",
        f"*Arm at the x86 images/s measured here (not measured on Graviton). Fargate: the poller "
        f"(`infra/poller-service.yaml`) on a {task[0]:g} vCPU / {task[1]:g} GB task, ${hourly_x86:.4f} an hour "
        f"(x86), ${hourly_arm:.4f} (Arm), busy all the time it runs; at utilisation u it costs 1/u times the busy "
        "figure, so it is cheaper than Lambda above the utilisation in the last column.",
        f"S3 and SQS requests add ${'-'.join(dict.fromkeys(f'{v:.2f}' for v in (requests[0], requests[-1])))} per million "
        "photos "
        "whichever runs the worker (a GET per photo, a manifest PUT per message at $0.005 per 1,000, SQS receives "
        "and deletes: counted in the worker runs above).",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"Comma-separated models to build and measure: {', '.join(MODELS)}.")
    parser.add_argument("--model", action="append", default=[], metavar="LABEL=URI",
                        help="Use a published artifact for LABEL (one of the models, or a new label) instead of "
                             "building it; repeatable.")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="Comma-separated runtime keys to measure.")
    parser.add_argument("--work", default=str(ROOT / ".cache" / "cost"),
                        help="Artifacts, measurements and predictions are kept here (a rerun resumes).")
    parser.add_argument("--runs", default=str(ROOT / ".cache" / "bench-runs"),
                        help="Training run folders (benchmarks/accuracy.py's --runs: shared with it).")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "features"), help="Feature cache.")
    parser.add_argument("--data-root", default=str(SHARED_DATA),
                        help="Folder holding stanford-dogs-subset/ and dogs-outside-stanford/.")
    parser.add_argument("--data", help="Train on this Stanford-layout folder instead of the shared subset.")
    parser.add_argument("--split-file", help="Split file for --data (default: a seeded split).")
    parser.add_argument("--min-photos", type=int, help="Keep breeds with this many photos (default 150: the "
                                                       "subset's 11 well-covered breeds).")
    parser.add_argument("--photos", type=int, default=96, help="Photos (one S3 event each) per worker run.")
    parser.add_argument("--seconds", type=float, default=8.0, help="Timed seconds of the bare measurement.")
    parser.add_argument("--top1-limit", type=int, help="At most this many photos per top-1 set (every k-th one).")
    parser.add_argument("--fresh", action="store_true", help="Measure again (keeps the models and predictions).")
    parser.add_argument("--json", action="store_true", help="Print one JSON list of rows.")
    parser.add_argument("--markdown", action="store_true", help="Print the README section (table and notes).")
    parser.add_argument("--_build", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._build:  # a child: build one model, so that TensorFlow's memory leaves with it
        print(build_model(args._build, args))
        return

    work = Path(args.work)
    overrides = dict(item.split("=", 1) for item in args.model)
    labels = [m for m in args.models.split(",") if m] + [k for k in overrides if k not in args.models.split(",")]
    unknown = [m for m in labels if m not in MODELS and m not in overrides]
    if unknown:
        sys.exit(f"unknown models {unknown}: choose from {', '.join(MODELS)} or give --model LABEL=URI")
    log(f"load average at start: {loadavg()}; {cpu_name()}")

    from worker.artifact import read_labels, read_manifest, resolve_artifact

    artifacts = {}
    for label in labels:
        if label in overrides:
            artifacts[label] = resolve_artifact(overrides[label])
            continue
        child = [sys.executable, str(Path(__file__).resolve()), "--_build", label, "--work", args.work,
                 "--runs", args.runs, "--cache-dir", args.cache_dir]
        for option in ("data_root", "data", "split_file", "min_photos"):
            if getattr(args, option) is not None:
                child += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
        built = subprocess.run(child, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True)
        artifacts[label] = Path(built.stdout.strip().splitlines()[-1])

    try:
        plan = machine_pin_plan()
    except ValueError as error:
        sys.exit(f"images/s per vCPU needs the worker on a CPU of its own, away from the S3/SQS server: {error}")
    log(f"pinning: {plan.describe()}")
    photos = repeat_to(sample_photos(), args.photos)
    settings = hashlib.sha256(json.dumps([args.photos, args.seconds, BATCH, sorted(plan.server),
                                          sorted(plan.worker)]).encode()).hexdigest()[:8]
    rows = []
    bench = PinnedBench(plan)
    try:
        for label, artifact in artifacts.items():
            manifest = read_manifest(artifact)
            folders = [label_.folder for label_ in read_labels(artifact)]
            for runtime in (r for r in args.runtimes.split(",") if r in manifest.runtimes):
                stem = f"{artifact.name}-{manifest.version}-{runtime}"
                speed_file = work / "measured" / f"{stem}-{settings}.json"
                if args.fresh and speed_file.is_file():
                    speed_file.unlink()
                speed = cached(speed_file, functools.partial(bench.measure, label, artifact, runtime, photos, args))
                top1 = cached(work / "top1" / f"{stem}-{args.top1_limit or 'all'}.json",
                              functools.partial(measure_top1, artifact, runtime, folders, args))
                rows.append(cost_row(label, runtime, speed, top1, artifact))
                log(f"  {label} {runtime}: {speed['worker_img_s']} img/s per vCPU (bare {speed['bare_img_s']}), "
                    f"RSS {speed['peak_rss_mb']} MB, top-1 {top1}")
    finally:
        bench.close()
    if not rows:
        sys.exit("nothing measured: no model carries the runtimes asked for")
    (work / "cost.json").write_text(json.dumps(rows, indent=1) + "\n")
    command = "python benchmarks/cost.py " + " ".join(a for a in sys.argv[1:] if a not in ("--json", "--markdown"))
    if args.json:
        print(json.dumps(rows, indent=1))
    elif args.markdown:
        print(markdown(rows, command.strip()))
    else:
        print(f"\n{cpu_name()}; {plan.describe()}; load average {loadavg()}")
        print_table(rows)
        print(f"\ntemplate MemorySize (largest Lambda MB): {max(r['lambda_memory_mb'] for r in rows)}")


if __name__ == "__main__":
    main()
