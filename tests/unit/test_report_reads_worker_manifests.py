"""The report and the export read what the worker writes: manifests of the current schema
(built by worker.manifests, JSON and JSON Lines), with every status the worker answers
(ok, no_dog, uncertain, error), dog scores and job-level lines."""

from __future__ import annotations

import csv
import io
import json

import pytest

from tests.unit.test_report import build_in_memory, stat_counts
from worker.export import COLUMNS, write_csv, write_parquet
from worker.manifest_source import parse_manifest
from worker.manifests import MANIFEST_SCHEMA_VERSION, Continuation, ItemResult, TopK, build_manifest

MODEL = {"name": "demo-breeds", "version": "20261201T000000Z", "runtime": "openvino-int8"}
TOP = [TopK("n02111889", "Samoyed", 0.81), TopK("n02115641", "dingo", 0.12)]


def worker_items() -> list[ItemResult]:
    return [
        ItemResult.classified("photos", "dog.jpg", status="ok", top_k=TOP, dog_score=0.97, etag="a"),
        ItemResult.classified("photos", "cat.jpg", status="no_dog", top_k=TOP, dog_score=0.03, etag="b"),
        ItemResult.classified("photos", "chair.jpg", status="no_dog", top_k=TOP, dog_score=0.11, etag="c"),
        ItemResult.classified("photos", "blurry.jpg", status="uncertain", top_k=TOP, dog_score=0.64, etag="d"),
        ItemResult.classified("photos", "old-model.jpg", status="ok", top_k=TOP, dog_score=None, etag="e"),
        ItemResult.failure("photos", "notes.jpg", error_code="not_an_image", error_message="text", etag="f"),
    ]


@pytest.fixture(params=["json", "jsonl"])
def worker_manifest(request) -> tuple[str, str]:
    page = Continuation("job.p0001-00000000", "s3://out/manifests/job.p0001-00000000.json", 1, "a", "a")
    doc = build_manifest("job", "prefix-job", MODEL, worker_items(), continuations=[page])
    assert doc.schema_version == MANIFEST_SCHEMA_VERSION
    return (doc.to_json(), "s3://out/manifests/job.json") if request.param == "json" else \
        (doc.to_jsonl(), "s3://out/manifests/job.jsonl")


def test_the_report_counts_every_status_and_bins_the_dog_scores(worker_manifest):
    items = parse_manifest(*worker_manifest)
    page, summary = build_in_memory(items)
    assert stat_counts(page) == {"photos": 6, "ok": 2, "no_dog": 2, "uncertain": 1, "error": 1}
    assert summary.dog_score_bins == [1, 1, 0, 0, 0, 0, 1, 0, 0, 1]  # 0.03 / 0.11 / 0.64 / 0.97; None not binned
    assert sum(summary.score_bins) == 2  # only ok items name a breed with its score
    assert summary.breeds == {"Samoyed": {"ok": 2}}  # no_dog / uncertain carry no breed, only a hint


def test_the_export_has_one_row_per_item_with_status_breed_and_dog_score(worker_manifest, tmp_path):
    items = parse_manifest(*worker_manifest)
    out = io.StringIO(newline="")
    assert write_csv(out, items) == 6
    rows = {r["key"]: r for r in csv.DictReader(io.StringIO(out.getvalue(), newline=""))}
    assert list(next(iter(rows.values()))) == list(COLUMNS)
    assert (rows["cat.jpg"]["status"], rows["cat.jpg"]["breed"], rows["cat.jpg"]["dog_score"]) == ("no_dog", "", "0.03")
    assert json.loads(rows["cat.jpg"]["top_k"])[0]["breed"] == "Samoyed"  # the hint is kept
    assert (rows["dog.jpg"]["breed"], rows["dog.jpg"]["score"], rows["dog.jpg"]["dog_score"]) == ("Samoyed", "0.81",
                                                                                                  "0.97")
    assert rows["old-model.jpg"]["dog_score"] == "" and rows["notes.jpg"]["error_code"] == "not_an_image"
    pq = pytest.importorskip("pyarrow.parquet", reason="the 'export' extra (pyarrow) is not installed")
    write_parquet(str(tmp_path / "items.parquet"), items)
    table = {r["key"]: r for r in pq.read_table(tmp_path / "items.parquet").to_pylist()}
    assert table["chair.jpg"]["dog_score"] == pytest.approx(0.11) and table["chair.jpg"]["breed"] is None
    assert table["blurry.jpg"]["status"] == "uncertain" and table["notes.jpg"]["dog_score"] is None
