"""What the benchmarks share: the photos, the default model, the local S3/SQS stack, CPU pinning, table
printing, and the child processes that measure a bare model and the whole worker.

Children (each a fresh process, so one runtime's threads and memory never leak into another's figure):

- ``python benchmarks/common.py bare --model M --runtime R --batches 1,8,16 --seconds S``: images/s of
  ``predict`` on decoded photos in memory (optionally also the probabilities of a photo listing,
  ``--probs BASE``: reads ``BASE.json``, writes ``BASE.<runtime>.npy``, the breed scores only: a
  model with a dog check has its dog score after them, which top-1 must not pick);
- ``python benchmarks/common.py worker <dogbreeds-worker argv>``: the worker's own CLI, unchanged, with
  clocks on its S3/SQS calls (botocore event hooks on boto3's default session: nothing inside the
  worker is patched), so the parent can time first receive -> last manifest and count requests.

Both print one ``BENCH-RESULT <json>`` line. ``BENCH_CPUS`` (e.g. ``"1"`` or ``"2,3"``) pins a child to
those CPUs before anything else starts a thread, and ``BENCH_GO`` makes a worker child wait, before its
first receive, until that file exists (``BENCH_READY`` is touched when it gets there): a fleet of
pollers then starts draining together, each with its model already loaded.

CPU pinning (:func:`pin_plan`): the local S3/SQS server on one core, the worker (and the bare model it
is compared with) on another, so that on a small machine ``e2e / bare`` measures the worker's own
overhead on the same core budget instead of the server's share of it.

One module (about 650 lines) so that a benchmark imports its set-up from one place; the sections
(pinning, photos, tables, the local stack, the children) do not import one another's internals.
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
SAMPLES = ROOT / "samples"
SHARED_DATA = ROOT.parent / "shared" / "data"
SUBSET = SHARED_DATA / "stanford-dogs-subset"
OUTSIDE = SHARED_DATA / "dogs-outside-stanford"
BIN = Path(sys.executable).parent
REPEATS = 3  # timed stretches per bare measurement (the median is reported)
RESULT_PREFIX = "BENCH-RESULT "


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of this process (all threads), or of another one."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# --------------------------------------------------------------------------- CPU pinning


@dataclass(frozen=True)
class PinPlan:
    """CPUs for the local S3/SQS server and for the worker; ``shared_core``: a worker CPU is an SMT
    sibling of the server's (the machine had no other physical core to give it)."""

    server: frozenset[int]
    worker: frozenset[int]
    shared_core: bool = False

    def describe(self) -> str:
        return (f"server on CPU {format_cpus(self.server)}, worker on CPU {format_cpus(self.worker)}"
                + (" (SMT siblings of one core)" if self.shared_core else ""))


def format_cpus(cpus: Iterable[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def parse_cpus(text: str) -> frozenset[int]:
    """``"0-2,5"`` -> {0, 1, 2, 5} (the kernel's cpulist format)."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return frozenset(cpus)


def pin_plan(allowed: Iterable[int], core_of: Mapping[int, object] | None = None, worker_cpus: int = 1) -> PinPlan:
    """One CPU for the server, ``worker_cpus`` others for the worker, out of ``allowed``.

    ``core_of`` maps a CPU to its physical core (any hashable; CPUs missing from it count as cores
    of their own). The server takes the lowest CPU; the worker takes CPUs on physical cores other
    than the server's, one per core first (lowest first), so that no SMT sibling of the server or of
    another worker CPU shares its core; only when the machine has too few cores does it take
    siblings (``shared_core`` says whether one of them is the server's). Raises ``ValueError`` when
    ``allowed`` has fewer than ``worker_cpus + 1`` CPUs."""
    cpus = sorted(set(allowed))
    if worker_cpus < 1:
        raise ValueError("the worker needs at least one CPU")
    if len(cpus) < worker_cpus + 1:
        raise ValueError(f"pinning needs {worker_cpus + 1} CPUs, this process may use {len(cpus)}: {cpus}")
    core_of = dict(core_of or {})

    def core(cpu: int):
        return core_of.get(cpu, ("cpu", cpu))

    server = cpus[0]
    rest = cpus[1:]
    chosen: list[int] = []
    used_cores = {core(server)}
    for cpu in rest:  # first pass: one CPU per physical core the server does not use
        if len(chosen) == worker_cpus:
            break
        if core(cpu) not in used_cores:
            chosen.append(cpu)
            used_cores.add(core(cpu))
    for cpu in rest:  # then siblings of worker cores, then of the server's core
        if len(chosen) == worker_cpus:
            break
        if cpu not in chosen and core(cpu) != core(server):
            chosen.append(cpu)
    for cpu in rest:
        if len(chosen) == worker_cpus:
            break
        if cpu not in chosen:
            chosen.append(cpu)
    shared = any(core(cpu) == core(server) for cpu in chosen)
    return PinPlan(frozenset({server}), frozenset(chosen), shared)


def cpu_topology() -> dict[int, tuple[str, str]]:
    """CPU -> (package, core id) from sysfs; empty where sysfs does not say."""
    out = {}
    for cpu in os.sched_getaffinity(0):
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            out[cpu] = ((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip())
        except OSError:
            continue
    return out


def machine_pin_plan(worker_cpus: int = 1) -> PinPlan:
    return pin_plan(os.sched_getaffinity(0), cpu_topology(), worker_cpus)


def pin_process(pid: int, cpus: Iterable[int]) -> None:
    """Pin every thread of a running process (threads it starts later inherit the mask of the
    thread that starts them)."""
    cpus = set(cpus)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except (ProcessLookupError, FileNotFoundError):  # a thread that just ended
            continue


def process_cpus(pid: int) -> frozenset[int]:
    """The union of the CPU masks of a process's threads now (to check a pinning held)."""
    cpus: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            cpus |= os.sched_getaffinity(int(task.name))
        except (ProcessLookupError, FileNotFoundError):
            continue
    return frozenset(cpus)


def pinned_environment(cpus: Iterable[int] | None) -> dict[str, str]:
    """Environment for a child pinned to ``cpus``: BENCH_CPUS, and every thread pool sized to them
    (the worker's DOGBREEDS_THREADS: TensorFlow intra/inter-op threads and OpenVINO streams; OpenMP)."""
    if cpus is None:
        return {}
    n = str(len(set(cpus)))
    return {"BENCH_CPUS": format_cpus(cpus), "DOGBREEDS_THREADS": n, "OMP_NUM_THREADS": n}


def _pin_self_from_environment() -> None:
    if os.environ.get("BENCH_CPUS"):
        os.sched_setaffinity(0, parse_cpus(os.environ["BENCH_CPUS"]))


# --------------------------------------------------------------------------- photos


def manifest_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def sample_photos(limit: int | None = None) -> list[Path]:
    """Sample photos (Stanford size), held-out ones (stanford_split == test, which the model
    never trained on, so they have the close calls that unseen photos have) first, then the
    training ones; a stable order."""
    rows = manifest_rows(SAMPLES / "MANIFEST.tsv")
    rows = sorted(rows, key=lambda r: r.get("stanford_split") != "test")  # stable: test first
    paths = [SAMPLES / "photos" / r["relative_path"] for r in rows]
    return paths[:limit] if limit else paths


def repeat_to(photos: list[Path], n: int) -> list[Path]:
    """``n`` photos, cycling through ``photos``."""
    return (photos * (n // max(1, len(photos)) + 1))[:n]


def labelled_photos(root: Path, folders: list[str], *, manifest: Path | None = None, split: str | None = None,
                    seen: set[str] | None = None) -> list[tuple[Path, int]]:
    """(photo, class index) of a Stanford-layout folder listed by a MANIFEST.tsv (``relative_path``,
    optional ``sha256`` and ``stanford_split``; default ``root/MANIFEST.tsv``), for the model's breeds
    (``folders``), optionally only one ``stanford_split``; duplicates by sha256 dropped (``seen`` is
    shared between calls)."""
    index = {folder: i for i, folder in enumerate(folders)}
    seen = set() if seen is None else seen
    out = []
    for row in manifest_rows(manifest or root / "MANIFEST.tsv"):
        folder = row["relative_path"].split("/", 1)[0]
        if folder not in index or (split is not None and row.get("stanford_split") != split):
            continue
        path = root / row["relative_path"]
        if not path.is_file():
            continue
        digest = row.get("sha256") or hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        out.append((path, index[folder]))
    return out


def test_photos(folders: list[str]) -> list[tuple[Path, int]]:
    """(photo, class index) of the held-out sample photos plus the subset's official test
    photos of the model's breeds, without duplicates (by sha256)."""
    seen: set[str] = set()
    out = labelled_photos(SAMPLES / "photos", folders, manifest=SAMPLES / "MANIFEST.tsv", split="test", seen=seen)
    if (SUBSET / "MANIFEST.tsv").is_file():
        out += labelled_photos(SUBSET, folders, split="test", seen=seen)
    return out


def decode(paths, size, fit):
    import numpy as np

    from worker import images

    return np.stack([images.read_image_file(p, size=size, fit=fit) for p in paths])


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Column:
    """One column of a printed table: ``value`` is a row key or a function of the row; ``spec`` a
    format spec; a missing value (None) prints as ``-``."""

    header: str
    width: int
    value: str | Callable[[dict], object]
    spec: str = ""
    left: bool = False

    def cell(self, text: str) -> str:
        return f"{text:<{self.width}}" if self.left else f"{text:>{self.width}}"

    def format(self, row: dict) -> str:
        value = self.value(row) if callable(self.value) else row.get(self.value)
        return self.cell("-" if value is None else format(value, self.spec))


def print_table(columns: list[Column], rows: Iterable[dict]) -> None:
    """A header line, then one line per row, the columns separated by one space."""
    print(" ".join(c.cell(c.header) for c in columns))
    for row in rows:
        print(" ".join(c.format(row) for c in columns))


# --------------------------------------------------------------------------- the local S3/SQS stack


@contextmanager
def local_server():
    """moto's S3/SQS server as a child process on 127.0.0.1 (``infra.local_stack.MotoServer``), with
    this process's AWS environment (endpoint, region, test credentials) pointed at it."""
    from infra.local_stack import MotoServer

    with MotoServer() as server:
        os.environ.update(server.environment())
        yield server


def new_stack(bucket: str, queue: str | None = None, **options):
    """A fresh bucket, queue and DLQ on the server the environment points at: ``(s3, sqs, stack)``
    (``options`` go to ``infra.local_stack.create_stack``)."""
    import boto3

    from infra.local_stack import create_stack

    s3, sqs = boto3.client("s3"), boto3.client("sqs")
    return s3, sqs, create_stack(s3, sqs, bucket=bucket, queue=queue or bucket, **options)


# --------------------------------------------------------------------------- the default model

DEFAULT_MODEL_NAME = "bench-breeds"


def default_model(work: Path, name: str = DEFAULT_MODEL_NAME) -> str:
    """Train and publish a model like scripts/demo.py (frozen VGG16, 224 px, the sample photos), under
    ``work``; reused when an earlier run made it."""
    registry = work / "registry"
    if (registry / name / "latest").is_file():
        log(f"using the model trained by an earlier run: {registry / name}")
        return str(registry / name)
    run_dir = work / "run"
    fit = [str(BIN / "dogbreeds-train"), "fit", str(SAMPLES / "photos"), "--model", "vgg16_transfer", "--image-size", "224",
           "--split-file", str(SAMPLES / "MANIFEST.tsv"), "--run-dir", str(run_dir), "--augment-copies", "2",
           "--epochs", "60", "--cache-dir", str(work / "cache")]
    publish = [str(BIN / "dogbreeds-train"), "publish", str(run_dir), "--to", str(registry), "--name", name]
    for command in ([] if (run_dir / "model.keras").is_file() else [fit]) + [publish]:
        log("$ " + " ".join(command))
        subprocess.run(command, cwd=ROOT, check=True, stdout=sys.stderr)
    return str(registry / name)


# --------------------------------------------------------------------------- children: bare model


def child_bare(argv: list[str]) -> None:
    """One runtime in this fresh process: images/s per batch size, and the probabilities on a photo
    listing (saved as .npy)."""
    parser = argparse.ArgumentParser(prog="common.py bare")
    parser.add_argument("--model", required=True)
    parser.add_argument("--runtime", required=True)
    parser.add_argument("--batches", default="16")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--probs", help="BASE: predict the photos listed in BASE.json into BASE.<runtime>.npy")
    args = parser.parse_args(argv)
    import numpy as np

    from worker.artifact.loading import load_artifact

    started = time.perf_counter()
    loaded = load_artifact(args.model, runtime=args.runtime)
    load_s = time.perf_counter() - started
    h, w = loaded.manifest.input_size
    batches = [int(b) for b in args.batches.split(",") if b]
    out = {"runtime": loaded.runtime, "precision": loaded.manifest.runtimes[loaded.runtime].get("precision", "fp32"),
           "load_s": round(load_s, 2), "img_s": {}, "loadavg": loadavg(),
           "cpus": format_cpus(os.sched_getaffinity(0)), "threads": os.environ.get("DOGBREEDS_THREADS")}
    inner = getattr(loaded.predict, "_inner", None)
    if batches:
        # 64 photos, held-out ones first: batches rotate over them, so the int8 cascade re-runs its
        # usual share of close calls instead of whatever one fixed batch holds
        pixels = decode(sample_photos(max(64, *batches)), (w, h), loaded.manifest.input_fit).astype(np.float32)
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
        log(f"  bare {loaded.runtime} batch {batch} on CPU {out['cpus']}: {out['img_s'][batch]} images/s "
            f"(median of {[round(r, 2) for r in rates]})")
    if hasattr(inner, "fallbacks"):
        out["fallback_rate"] = round(inner.fallbacks / max(1, inner.calls), 4)
    out["peak_rss_mb"] = peak_rss_mb()  # before the listing below, which holds more photos at once
    if args.probs and not Path(args.probs + f".{loaded.runtime}.npy").is_file():  # cached per artifact + photos
        paths = json.loads(Path(args.probs + ".json").read_text())
        probs = []
        for i in range(0, len(paths), 16):
            out_ = loaded.predict(decode(paths[i:i + 16], (w, h), loaded.manifest.input_fit).astype(np.float32))
            probs.append(out_[:, :len(loaded.labels)])  # the breeds: not the dog score column after them
        np.save(args.probs + f".{loaded.runtime}.npy",
                np.concatenate(probs) if probs else np.zeros((0, len(loaded.labels)), np.float32))
    out["tensorflow_imported"] = "tensorflow" in sys.modules
    print(RESULT_PREFIX + json.dumps(out), flush=True)


# --------------------------------------------------------------------------- children: the worker


class RequestClock:
    """botocore event hooks on boto3's default session: times and counts the worker's S3/SQS calls.

    ``first_receive``: wall clock when the first ReceiveMessage that returned messages came back;
    ``manifests``: (time, key, sha256 of the body) of every PutObject under ``manifest_prefix``;
    ``renewals``/``hand_backs``: ChangeMessageVisibility entries that extend a message's timeout to
    ``visibility_timeout`` (the heartbeat) or set a shorter one (a failed or unstarted message handed
    back); ``calls``: count per operation."""

    def __init__(self, manifest_prefix: str, visibility_timeout: int | None, go: Path | None = None,
                 ready: Path | None = None):
        self.manifest_prefix = manifest_prefix.rstrip("/") + "/"
        self.visibility_timeout = visibility_timeout
        self.go, self.ready = go, ready
        self.first_receive: float | None = None
        self.first_receive_cpu: float | None = None
        self.last_manifest_cpu: float | None = None
        self.manifests: list[tuple[float, str, str]] = []
        self.renewals = self.hand_backs = 0
        self.messages_received = 0
        self.calls: dict[str, int] = {}

    def install(self) -> None:
        import boto3

        boto3.setup_default_session()
        events = boto3.DEFAULT_SESSION.events
        events.register("before-parameter-build", self._before)
        events.register("after-call", self._after)

    def _before(self, params, model, context, **kwargs):
        name = model.name
        self.calls[name] = self.calls.get(name, 0) + 1
        if name == "ReceiveMessage" and self.go is not None:
            if self.ready is not None and not self.ready.exists():
                self.ready.touch()
            while not self.go.exists():
                time.sleep(0.01)
        elif name == "PutObject" and str(params.get("Key", "")).startswith(self.manifest_prefix):
            body = params.get("Body", b"")
            body = body.getvalue() if hasattr(body, "getvalue") else body  # botocore wraps bytes in a BytesIO
            body = body.encode() if isinstance(body, str) else body
            context["bench_manifest"] = (params["Key"], hashlib.sha256(body).hexdigest()
                                         if isinstance(body, (bytes, bytearray)) else None)
        elif name in ("ChangeMessageVisibility", "ChangeMessageVisibilityBatch"):
            entries = params.get("Entries") or [params]
            for entry in entries:
                if self.visibility_timeout is not None and int(entry.get("VisibilityTimeout", -1)) == self.visibility_timeout:
                    self.renewals += 1
                else:
                    self.hand_backs += 1

    def _after(self, http_response, parsed, model, context, **kwargs):
        now = time.time()
        if model.name == "ReceiveMessage" and parsed.get("Messages"):
            self.messages_received += len(parsed["Messages"])
            if self.first_receive is None:
                self.first_receive, self.first_receive_cpu = now, cpu_seconds()
        elif model.name == "PutObject" and "bench_manifest" in context and http_response.status_code < 300:
            key, digest = context["bench_manifest"]
            self.manifests.append((now, key, digest))
            self.last_manifest_cpu = cpu_seconds()

    def result(self) -> dict:
        return {"first_receive": self.first_receive, "manifests": self.manifests,
                "cpu_s": round((self.last_manifest_cpu or 0.0) - (self.first_receive_cpu or 0.0), 3),
                "renewals": self.renewals, "hand_backs": self.hand_backs, "calls": self.calls,
                "messages_received": self.messages_received}


def child_worker(argv: list[str]) -> None:
    """`dogbreeds-worker <argv>` with its S3/SQS calls timed (:class:`RequestClock`)."""
    t0 = float(os.environ.get("BENCH_T0", time.time()))
    prefix = _option(argv, "--output-prefix") or os.environ.get("DOGBREEDS_OUTPUT_PREFIX", "manifests")
    visibility = _option(argv, "--visibility-timeout")
    clock = RequestClock(prefix, int(visibility) if visibility else 300,
                         go=Path(os.environ["BENCH_GO"]) if os.environ.get("BENCH_GO") else None,
                         ready=Path(os.environ["BENCH_READY"]) if os.environ.get("BENCH_READY") else None)
    clock.install()
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
        fallback = cascades[0] if cascades else None
        result = {"t0": t0, "peak_rss_mb": peak_rss_mb(), **clock.result(),
                  "fallback_rate": round(fallback.fallbacks / max(1, fallback.calls), 4) if fallback else None,
                  "cpus": format_cpus(os.sched_getaffinity(0)), "threads": os.environ.get("DOGBREEDS_THREADS"),
                  "tensorflow_imported": "tensorflow" in sys.modules, "openvino_imported": "openvino" in sys.modules}
        print(RESULT_PREFIX + json.dumps(result), flush=True)


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def parse_result(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError("the child printed no result")


def child_command(kind: str, args: list[str]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), kind, *args]


def run_child(kind: str, args: list[str], env: dict | None = None, timeout: float = 1800) -> dict:
    """Run a child (``bare`` or ``worker``) to the end and return its result; its ``bare`` log lines
    are passed on to stderr."""
    env = {**os.environ, **(env or {}), "BENCH_T0": repr(time.time())}
    process = subprocess.run(child_command(kind, args), cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=timeout)
    if process.returncode != 0:
        raise RuntimeError(f"child {kind} {args[:3]} failed ({process.returncode}):\n{process.stderr[-4000:]}")
    sys.stderr.write("".join(line + "\n" for line in process.stderr.splitlines() if line.startswith("  bare")))
    return parse_result(process.stdout)


# --------------------------------------------------------------------------- end to end


def count_objects(s3, bucket: str, prefix: str) -> int:
    return sum(len(page.get("Contents", [])) for page in
               s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix))


def manifest_items(s3, bucket: str, prefix: str) -> list[str]:
    """The photo keys listed by every manifest under ``prefix`` (one entry per listing)."""
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            document = json.loads(s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read())
            keys += [entry["key"] for entry in document.get("items", [])]
    return keys


def wait_for_messages(sqs, queue_url: str, expected: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while True:
        attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages"])
        if int(attributes["Attributes"]["ApproximateNumberOfMessages"]) >= expected:
            return
        if time.time() > deadline:
            raise RuntimeError(f"only {attributes['Attributes']} of {expected} messages reached the queue")
        time.sleep(0.2)


def fill_queue(s3, sqs, stack, photos: list[Path], mode: str, job_size: int = 16) -> tuple[list[str], int]:
    """Put the photos in the stack's bucket and their messages in its queue: ``events``: under
    ``incoming/`` (one S3 ObjectCreated notification per photo, as S3 sends them); ``jobs``: outside
    it, with job messages of ``job_size`` keys. Returns (keys, messages), once they are all queued."""
    keys = []
    folder = "incoming" if mode == "events" else "photos"
    for i, path in enumerate(photos):
        key = f"{folder}/{path.parent.name}/{i:05d}-{path.name}"
        s3.upload_file(str(path), stack.bucket, key)
        keys.append(key)
    if mode == "events":
        expected = len(photos)
    else:
        chunks = [keys[i:i + job_size] for i in range(0, len(keys), job_size)]
        for n, chunk in enumerate(chunks):
            sqs.send_message(QueueUrl=stack.queue_url,
                             MessageBody=json.dumps({"job_id": f"job-{n:04d}", "bucket": stack.bucket, "keys": chunk}))
        expected = len(chunks)
    wait_for_messages(sqs, stack.queue_url, expected)
    return keys, expected


def end_to_end(server, model: str, runtime: str, batch: int, photos: list[Path], mode: str, job_size: int,
               run_id: str, worker_args: Iterable[str] = (), worker_endpoint: str | None = None,
               worker_cpus: Iterable[int] | None = None) -> dict:
    """``dogbreeds-worker run --until-empty`` over ``photos`` on a fresh stack of the moto ``server``;
    ``worker_cpus`` pins the worker (and sizes its thread pools) to those CPUs."""
    s3, sqs, stack = new_stack(f"bench-{run_id}")
    keys, expected_messages = fill_queue(s3, sqs, stack, photos, mode, job_size)
    argv = ["run", "--model", model, "--queue-url", stack.queue_url, "--until-empty", "--wait-seconds", "1",
            "--batch-size", str(batch), "--runtime", runtime, "--output-prefix", "manifests", *worker_args]
    moto_cpu = cpu_seconds(server.process.pid)
    env = {**server.environment(), "DOGBREEDS_RUNTIME": runtime, **pinned_environment(worker_cpus)}
    if worker_endpoint:  # the worker talks to S3/SQS through the latency proxy
        env["AWS_ENDPOINT_URL"] = worker_endpoint
    result = run_child("worker", argv, env=env)
    moto_cpu = cpu_seconds(server.process.pid) - moto_cpu
    manifests = result["manifests"]
    if not manifests or result["first_receive"] is None:
        raise RuntimeError("the worker wrote no manifest")
    written = count_objects(s3, stack.bucket, "manifests/")
    if written != expected_messages:
        raise RuntimeError(f"the worker wrote {written}/{expected_messages} manifests")
    listed = manifest_items(s3, stack.bucket, "manifests/")
    if sorted(listed) != sorted(keys):
        raise RuntimeError(f"the manifests list {len(listed)} photos for the {len(keys)} sent")
    images = len(photos)
    first, last = result["first_receive"], max(t for t, _, _ in manifests)
    return {"e2e_img_s": round(images / (last - first), 2),
            "cold_start_s": round(min(t for t, _, _ in manifests) - result["t0"], 2),
            "peak_rss_mb": result["peak_rss_mb"], "tensorflow_imported": result["tensorflow_imported"],
            "messages": expected_messages, "receives": result["calls"].get("ReceiveMessage", 0), "photos": images,
            "fallback_rate": result.get("fallback_rate"), "worker_cpus": result["cpus"],
            "worker_threads": result["threads"], "requests": result["calls"],
            # CPU per photo while the worker ran: the worker process (first receive -> last manifest,
            # inference included) and the moto server (S3 + SQS), which shares these cores unless pinned away
            "worker_cpu_ms_per_photo": round(1000 * result["cpu_s"] / images, 1),
            "moto_cpu_ms_per_photo": round(1000 * moto_cpu / images, 1)}


def main(argv: list[str]) -> None:
    _pin_self_from_environment()  # before anything starts a thread: they all inherit the mask
    kind, rest = (argv[0], argv[1:]) if argv else ("", [])
    if kind == "bare":
        return child_bare(rest)
    if kind == "worker":
        return child_worker(rest)
    sys.exit("usage: common.py bare|worker ... (a child of the benchmarks)")


if __name__ == "__main__":
    main(sys.argv[1:])
