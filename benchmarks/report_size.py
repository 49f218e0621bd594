"""How big and how fast is the report page of a large batch? Prints figures, asserts nothing.

Writes manifests of N photos (default 10,000) that point at real photos of ``samples/photos``
(cycled, as a local ``classify`` run records them: bucket = the folder), with every status,
then times ``build_report`` with real thumbnails (decode with worker.images, shrink, JPEG),
and prints the page's size, the build's wall time and the process's peak RSS. With Debian's
chromium installed, it also opens the page (file://) and prints the time until the gallery
is rendered, the JS heap, and how long a status filter takes.

    python benchmarks/report_size.py                    # 10,000 photos
    python benchmarks/report_size.py --photos 2000 --thumb-size 96
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.manifest_source import ManifestSource  # noqa: E402
from worker.report import ReportSettings, build_report  # noqa: E402
from worker.thumbnails import PhotoFetcher  # noqa: E402

STATUSES = ["ok"] * 7 + ["uncertain", "no_dog", "error"]


def write_manifests(folder: Path, photos: int, per_manifest: int = 100) -> None:
    root = ROOT / "samples" / "photos"
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    for start in range(0, photos, per_manifest):
        items = []
        for n in range(start, min(photos, start + per_manifest)):
            key, status = files[n % len(files)], STATUSES[n % len(STATUSES)]
            breed = key.split("/")[0].split("-", 1)[1]
            score = (n * 7919 % 1000) / 1000
            items.append({"bucket": str(root), "key": key, "etag": None, "version_id": None, "status": status,
                          "error_code": "corrupt" if status == "error" else None,
                          "error_message": "JPEG data could not be decoded" if status == "error" else None,
                          "breed": None if status in ("error", "no_dog") else breed,
                          "synset": key[:9], "score": None if status in ("error", "no_dog") else score,
                          "dog_score": 0.05 if status == "no_dog" else None,
                          "top_k": [] if status in ("error", "no_dog") else
                          [{"breed": breed, "synset": key[:9], "score": score}] * 3})
        doc = {"schema_version": 1, "job_id": f"bench-{start}", "source": "local-folder",
               "model": {"name": "bench", "version": "v1", "runtime": "tf"}, "counts": {}, "items": items}
        (folder / f"bench-{start:06d}.json").write_text(json.dumps(doc))


def open_in_chromium(page_path: Path) -> None:
    browser = os.environ.get("DOGBREEDS_CHROMIUM") or shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        browser = None
    if not browser:
        print("chromium: not measured (no chromium or no playwright)")
        return
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(profile, executable_path=browser, headless=True, args=flags,
                                                       viewport={"width": 1280, "height": 900})
        page = context.new_page()
        started = time.perf_counter()
        page.goto(page_path.as_uri(), timeout=300_000)
        page.wait_for_selector("body[data-ready='1']", timeout=300_000)
        loaded = time.perf_counter() - started
        cards = page.locator("#gallery .card").count()
        images = page.locator("img").count()
        heap = page.evaluate("() => performance.memory ? performance.memory.usedJSHeapSize : null")
        started = time.perf_counter()
        page.select_option("#f-status", "uncertain")
        page.wait_for_function("() => document.querySelector('#gallery .card').dataset.status === 'uncertain'")
        filtered = time.perf_counter() - started
        context.close()
    print(f"chromium: gallery rendered {loaded:.2f} s after navigation; {cards} cards, {images} <img> in the DOM; "
          f"JS heap {heap / 1e6:.0f} MB; status filter {filtered * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=10_000)
    parser.add_argument("--thumb-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--keep", help="Write the page here instead of a temporary folder.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "manifests"
        folder.mkdir()
        write_manifests(folder, args.photos)
        out = Path(args.keep) if args.keep else Path(tmp) / "report.html"
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        started = time.perf_counter()
        summary = build_report(ManifestSource(str(folder)), out, PhotoFetcher(size=args.thumb_size).thumbnail,
                               ReportSettings(threads=args.threads, ahead=8 * args.threads), show_progress=True)
        seconds = time.perf_counter() - started
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        size = out.stat().st_size
        print(f"{summary.photos} photos ({summary.line()})")
        print(f"page: {size / 1e6:.1f} MB ({size / max(1, summary.photos) / 1e3:.1f} kB a photo, "
              f"thumbnails {args.thumb_size} px); built in {seconds:.1f} s "
              f"({summary.photos / seconds:.0f} photos/s, {args.threads} threads); "
              f"peak RSS {rss_after:.0f} MB (before building: {rss_before:.0f} MB)")
        open_in_chromium(out)


if __name__ == "__main__":
    main()
