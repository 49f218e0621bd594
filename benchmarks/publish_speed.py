"""Publish time before and after a change, measured in one run on the same training run.

``python benchmarks/publish_speed.py --run RUN_DIR --before REV``: checks out ``REV`` (default: the
commit before trainer.sampling existed, i.e. publishing that predicted every held-out photo,
decoded every training photo for a 300-photo calibration and ran the int8 cascade again) in a
temporary ``git worktree``, then builds the artifact of ``RUN_DIR`` (``trainer.publish.build_artifact``,
OpenVINO variants included) once with that code and once with this checkout's, each in a fresh
process, alternating (``--repeats`` pairs), and prints the wall-clock seconds of each, their ratio,
and what each recorded (held-out photos the agreement was measured on, calibration photos, the
variants' agreement), so a speed-up that measured less is visible beside it.

``--json`` prints the result as one JSON object. The machine's load average is printed with it:
compare only runs made on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import loadavg, log  # noqa: E402

#: the last commit whose publish predicted every held-out photo and re-ran the cascade
DEFAULT_BEFORE = "7d9b24c"

BUILD = """
import json, sys, time
from pathlib import Path
from trainer.publish import build_artifact
started = time.perf_counter()
manifest = build_artifact(Path(sys.argv[1]), Path(sys.argv[2]), "publish-speed", version="bench")
seconds = time.perf_counter() - started
runtimes = json.loads((Path(sys.argv[2]) / "manifest.json").read_text())["runtimes"]
print("PUBLISH-RESULT " + json.dumps({"seconds": seconds, "runtimes": runtimes}))
"""


def build_with(code_root: Path, run_dir: Path, dest: Path) -> dict:
    """Build the artifact of ``run_dir`` with the trainer found in ``code_root``, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(code_root), "TF_CPP_MIN_LOG_LEVEL": "2"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", BUILD, str(run_dir), str(dest)], cwd=code_root, env=env,
                          stdout=subprocess.PIPE, text=True, check=True)
    wall = time.perf_counter() - started
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("PUBLISH-RESULT "))
    result = json.loads(line.split(" ", 1)[1])
    return {"wall_s": round(wall, 1), "build_s": round(result["seconds"], 1), "runtimes": result["runtimes"]}


def summary(runtimes: dict) -> dict:
    """What a build measured: per variant, its agreement and on how many photos."""
    out = {}
    for key, entry in runtimes.items():
        agreement = entry.get("agreement") or {}
        out[key] = {"photos": agreement.get("photos"), "top1_agreement": agreement.get("top1_agreement"),
                    "calibration_photos": (entry.get("quantization") or {}).get("calibration_photos"),
                    "sample": agreement.get("sample")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="A training run folder (dogbreeds-train fit's --run-dir).")
    parser.add_argument("--before", default=DEFAULT_BEFORE, help="Git revision of the code to compare with.")
    parser.add_argument("--repeats", type=int, default=1, help="Pairs of builds (before, after), alternating.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args()
    run_dir = args.run.resolve()
    if not (run_dir / "run.json").is_file():
        sys.exit(f"{run_dir}: not a training run (no run.json)")
    log(f"load average at start: {loadavg()}")
    results: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="publish-speed-") as tmp:
        old = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(old), args.before], check=True)
        try:
            for i in range(args.repeats):
                for label, code in (("before", old), ("after", ROOT)):
                    log(f"[{i + 1}/{args.repeats}] publishing with the {label} code ({code})")
                    results[label].append(build_with(code, run_dir, Path(tmp) / f"{label}-{i}"))
                    log(f"  {results[label][-1]['wall_s']} s")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    before = statistics.median(r["wall_s"] for r in results["before"])
    after = statistics.median(r["wall_s"] for r in results["after"])
    out = {"run": str(run_dir), "before_rev": args.before, "before_s": before, "after_s": after,
           "speedup": round(before / after, 2), "repeats": args.repeats, "loadavg_end": loadavg(),
           "measured_before": summary(results["before"][-1]["runtimes"]),
           "measured_after": summary(results["after"][-1]["runtimes"])}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"\npublish {run_dir.name}: before ({args.before}) {before:.1f} s, after {after:.1f} s: "
          f"{out['speedup']:.2f}x (median of {args.repeats}; load average at the end {out['loadavg_end']})")
    for label in ("before", "after"):
        for key, entry in out[f"measured_{label}"].items():
            if key != "tf":
                print(f"  {label:<6} {key:<14} agreement {entry['top1_agreement']} on {entry['photos']} photos, "
                      f"calibration photos {entry['calibration_photos']}, sample {entry['sample']}")


if __name__ == "__main__":
    main()
