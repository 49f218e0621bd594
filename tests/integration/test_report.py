"""`dogbreeds-worker report` / `export` on a small real run (the worker's `classify` with a tiny
trained model, photos and manifests in moto's S3 server), and the page in a real browser.

The browser is Debian's chromium driven by Playwright (`executable_path`, Playwright's own
browser download is not used). Without it the browser test skips and says why. Set
DOGBREEDS_REPORT_SCREENSHOT=docs/report.png to also write the screenshot there (`make
report-screenshot`: the picture in the README)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from pathlib import Path

import boto3
import pytest
from click.testing import CliRunner

from tests.conftest import COLOUR_BREEDS, colour_photo
from worker.cli import main

pytestmark = pytest.mark.integration

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
AWKWARD_KEY = "batch/Ça va </script><script>alert(1)</script> 犬.png"


@pytest.fixture
def small_run(moto_server, colour_artifact):
    """Photos in s3://photos/batch/ classified by `classify` (manifest b1.json), plus a JSON Lines
    manifest as the no-dog worker writes them (no_dog / uncertain, dog_score). Returns the
    manifests' items as an independent oracle (plain json, not worker.manifest_source)."""
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="photos")
    for name, rgb in COLOUR_BREEDS.items():
        for seed in range(3):
            s3.put_object(Bucket="photos", Key=f"batch/{name.split('-', 1)[1]} {seed}.jpg",
                          Body=colour_photo(rgb, size=(160, 120), seed=seed))
    s3.put_object(Bucket="photos", Key=AWKWARD_KEY, Body=colour_photo((220, 40, 40), fmt="PNG"))
    s3.put_object(Bucket="photos", Key="batch/broken.jpg", Body=b"\xff\xd8\xff\xe0 not really")
    s3.put_object(Bucket="photos", Key="batch/notes.jpg", Body=b"hello, not a photo")
    result = CliRunner().invoke(main, ["classify", "--model", str(colour_artifact), "--job-id", "b1",
                                       "s3://photos/batch"])
    assert result.exit_code == 0, result.output
    s3.put_object(Bucket="photos", Key="other/cat.jpg", Body=colour_photo((128, 128, 128)))
    no_dog = [
        {"bucket": "photos", "key": "other/cat.jpg", "etag": None, "version_id": None, "status": "no_dog",
         "error_code": None, "error_message": None, "breed": None, "synset": None, "score": None,
         "dog_score": 0.03, "top_k": [], "job_id": "nd1"},
        {"bucket": "photos", "key": "other/blurry.jpg", "etag": None, "version_id": None, "status": "uncertain",
         "error_code": None, "error_message": None, "breed": "beagle", "synset": "n02088364", "score": 0.35,
         "dog_score": 0.61, "top_k": [{"breed": "beagle", "synset": "n02088364", "score": 0.35}], "job_id": "nd1"},
    ]  # other/blurry.jpg is not in the bucket: its card gets a placeholder
    s3.put_object(Bucket="photos", Key="manifests/nd1.jsonl", Body="".join(json.dumps(i) + "\n" for i in no_dog))
    items = json.loads(s3.get_object(Bucket="photos", Key="manifests/b1.json")["Body"].read())["items"] + no_dog
    assert {i["status"] for i in items} == {"ok", "error", "no_dog", "uncertain"}
    return items


def counts(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item["status"]] = out.get(item["status"], 0) + 1
    return out


def test_report_and_export_of_a_small_run(small_run, tmp_path):
    out = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["report", "s3://photos/manifests/", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"report written to {out}" in result.output
    page = out.read_text()
    assert page.count("data:image/jpeg;base64,") == len(small_run) - 3  # broken, notes, blurry: placeholders
    assert "colours" in page and "v1" in page  # the model's name and version
    for fmt in ("csv", "parquet"):
        target = tmp_path / f"items.{fmt}"
        result = CliRunner().invoke(main, ["export", "s3://photos/manifests", "--out", str(target)])
        assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(target.with_suffix(".csv").open(newline="")))
    assert sorted(r["key"] for r in rows) == sorted(i["key"] for i in small_run)
    assert {r["manifest"] for r in rows} == {"s3://photos/manifests/b1.json", "s3://photos/manifests/nd1.jsonl"}
    pq = pytest.importorskip("pyarrow.parquet", reason="the 'export' extra (pyarrow) is not installed")
    table = pq.read_table(target)
    assert counts(table.select(["status"]).to_pylist()) == counts(small_run)


def test_report_and_export_help_explain_the_source_forms():
    for command in ("report", "export"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0
        assert "s3://bucket/manifests/" in result.output and "local folder" in result.output


def test_a_source_without_manifests_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 1 and "no manifests" in result.output
    result = CliRunner().invoke(main, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and "no such folder or file" in result.output


def chromium_path() -> str | None:
    """DOGBREEDS_CHROMIUM when set (only it), else chromium on the PATH."""
    path = os.environ.get("DOGBREEDS_CHROMIUM")
    if path is None:
        path = shutil.which("chromium") or shutil.which("chromium-browser")
    return path if path and os.access(path, os.X_OK) else None


def skip_without(reason: str):
    """Skip, saying why; fail instead where DOGBREEDS_REQUIRE_BROWSER=1 (.ci/run sets it)."""
    if os.environ.get("DOGBREEDS_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (DOGBREEDS_REQUIRE_BROWSER=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium() -> str:
    """The browser, checked before the (slow) small run is made."""
    browser = chromium_path()
    if browser is None:
        skip_without("no chromium to run the report in: install Debian's chromium (apt-get install chromium; "
                     ".ci/run does) or set DOGBREEDS_CHROMIUM to a Chromium binary")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        skip_without("Playwright for Python is not installed (the 'test' extra)")
    return browser


def test_the_report_in_chromium(chromium, small_run, tmp_path):
    from playwright import sync_api

    browser = chromium
    out = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["report", "s3://photos/manifests/", "--out", str(out), "--page-size", "10",
                                       "--title", "dogbreeds report: a small test run"])
    assert result.exit_code == 0, result.output
    expected = counts(small_run)
    problems: list[str] = []
    with sync_api.sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=browser, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900})
        try:
            page = context.new_page()
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
            page.on("request", lambda request: None if request.url.startswith(("file:", "data:")) else
                    problems.append(f"request: {request.url}"))
            page.goto(out.as_uri())
            page.wait_for_selector("body[data-ready='1']")

            assert page.inner_text("#count-photos") == str(len(small_run))
            for status, n in expected.items():
                assert page.inner_text(f"[data-status='{status}'] b") == str(n)
            cards = page.locator("#gallery .card")
            assert cards.count() == 10 and page.inner_text("#pager .page-of") == "page 1 of 2"
            assert page.get_attribute("#gallery img >> nth=0", "src").startswith("data:image/jpeg;base64,")
            assert page.get_attribute("#gallery img >> nth=0", "loading") == "lazy"
            first_page = page.inner_text("#gallery")
            page.click("#pager button:has-text('next')")
            assert cards.count() == len(small_run) - 10 and page.inner_text("#gallery") != first_page

            page.select_option("#f-status", "error")
            assert cards.count() == expected["error"]
            assert set(page.eval_on_selector_all("#gallery .card", "cs => cs.map(c => c.dataset.status)")) == {"error"}
            assert page.locator("#gallery .ph").count() == expected["error"]  # broken photos: placeholders
            assert page.locator("#error-list tbody tr").count() == expected["error"]

            page.select_option("#f-status", "")
            page.fill("#f-score", "0.5")
            below = [i for i in small_run if i["score"] is not None and i["score"] < 0.5]
            assert cards.count() == len(below) and len(below) < len(small_run)
            page.fill("#f-score", "")
            page.fill("#f-text", "犬")
            assert cards.count() == 1 and AWKWARD_KEY in page.inner_text("#gallery .card .key")
            page.fill("#f-text", "")
            assert cards.count() == 10

            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("DOGBREEDS_REPORT_SCREENSHOT"):
                target = Path(os.environ["DOGBREEDS_REPORT_SCREENSHOT"])
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shot, target)
        finally:
            context.close()
    assert problems == []
