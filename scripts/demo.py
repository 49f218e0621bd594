"""`make demo`: train a frozen-VGG16 transfer model on the sample photos, publish it as an
artifact, and classify the held-out sample photos, showing true breeds beside predictions.

Runs the same console commands a user would (dogbreeds-train, dogbreeds-worker)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*args: str, capture: bool = False) -> str:
    print(f"\n$ {' '.join(args)}", flush=True)
    done = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=ROOT, check=True, text=True,
                          stdout=subprocess.PIPE if capture else None)
    return done.stdout or ""


def held_out_photos(photos: Path, manifest: Path) -> list[Path]:
    rows = [line.split("\t") for line in manifest.read_text().splitlines()]
    header = rows[0]
    path_col, split_col = header.index("relative_path"), header.index("stanford_split")
    return [photos / r[path_col] for r in rows[1:] if r[split_col] == "test"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo-output", help="Working folder (recreated).")
    parser.add_argument("--model", default="vgg16_transfer")
    args = parser.parse_args()
    out = ROOT / args.out
    shutil.rmtree(out, ignore_errors=True)
    photos, manifest = ROOT / "samples" / "photos", ROOT / "samples" / "MANIFEST.tsv"
    started = time.perf_counter()

    run("dogbreeds-train", "fit", str(photos), "--model", args.model, "--split-file", str(manifest),
        "--run-dir", str(out / "run"), "--augment-copies", "2", "--epochs", "60", "--patience", "8",
        "--cache-dir", str(out / "cache"))
    run("dogbreeds-train", "publish", str(out / "run"), "--to", str(out / "models"), "--name", "demo-breeds")
    lines = run("dogbreeds-worker", "predict", "--model", str(out / "models" / "demo-breeds"), "--json",
                *map(str, held_out_photos(photos, manifest)), capture=True)

    results = [json.loads(line) for line in lines.splitlines() if line.startswith("{")]
    print(f"\n{'held-out photo':<44} {'true breed':<22} {'predicted':<22} score")
    correct = 0
    for r in results:
        true = Path(r["path"]).parent.name.split("-", 1)[1].replace("_", " ")
        predicted = r.get("breed", f"ERROR {r.get('error_code')}")
        ok = predicted == true
        correct += ok
        print(f"{Path(r['path']).name:<44} {true:<22} {predicted:<22} {r.get('score', 0):.2f} {'' if ok else '  <- wrong'}")
    print(f"\nheld-out accuracy: {correct}/{len(results)} = {correct / max(1, len(results)):.1%}; "
          f"demo took {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
