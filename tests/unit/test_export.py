"""worker.export: one row per item, CSV and Parquet, rows read back as written."""

from __future__ import annotations

import csv
import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.report_fixtures import every_status_items, manifest_document, manifest_items
from worker.export import COLUMNS, FLOAT_COLUMNS, item_row, write_csv, write_parquet
from worker.manifest_source import parse_manifest


def read_csv_rows(text: str) -> list[dict]:
    """The documented reading of the CSV: empty field = null, top_k JSON, scores float."""
    rows = []
    for row in csv.DictReader(io.StringIO(text, newline="")):
        row = {k: (v if v != "" else None) for k, v in row.items()}
        row["top_k"] = json.loads(row["top_k"]) if row["top_k"] is not None else []
        for column in FLOAT_COLUMNS:
            row[column] = float(row[column]) if row[column] is not None else None
        rows.append(row)
    return rows


@settings(max_examples=50, deadline=None)
@given(st.lists(manifest_items(), max_size=6))
def test_csv_rows_read_back_exactly(items):
    out = io.StringIO(newline="")
    assert write_csv(out, items) == len(items)
    text = out.getvalue()
    assert text.splitlines()[0] == ",".join(COLUMNS)
    assert read_csv_rows(text) == [item_row(i) for i in items]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(manifest_items(), max_size=6), st.integers(1, 4))
def test_parquet_rows_read_back_exactly_in_any_row_group_size(tmp_path, items, batch_rows):
    pq = pytest.importorskip("pyarrow.parquet", reason="the 'export' extra (pyarrow) is not installed")
    path = tmp_path / "items.parquet"
    assert write_parquet(str(path), items, batch_rows=batch_rows) == len(items)
    table = pq.read_table(path)
    assert table.column_names == list(COLUMNS)
    assert table.to_pylist() == [item_row(i) for i in items]


def test_every_status_and_awkward_key_is_one_row_with_model_job_and_manifest(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="the 'export' extra (pyarrow) is not installed")
    items = parse_manifest(manifest_document(every_status_items()), "s3://results/manifests/job-1.json")
    out = io.StringIO(newline="")
    write_csv(out, items)
    rows = read_csv_rows(out.getvalue())
    assert [r["key"] for r in rows] == [r["key"] for r in every_status_items()]
    cat = next(r for r in rows if r["key"] == "incoming/cat.jpg")
    assert (cat["status"], cat["dog_score"], cat["breed"]) == ("no_dog", 0.02, None)
    assert {(r["model_name"], r["job_id"], r["manifest"]) for r in rows} == {
        ("demo-breeds", "job-1", "s3://results/manifests/job-1.json")}
    write_parquet(str(tmp_path / "x.parquet"), items)
    table = pq.read_table(tmp_path / "x.parquet")
    assert table.schema.field("top_k").type.value_type.names == ["breed", "synset", "score"]
    assert table.column("status").to_pylist().count("ok") == 2 + 6


def test_parquet_without_pyarrow_is_a_clear_error(monkeypatch, tmp_path):
    import builtins

    from worker.export import MissingDependency

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kw):
        if name.split(".")[0] == "pyarrow":
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(MissingDependency, match=r"pip install 'dogbreeds\[export\]'"):
        write_parquet(str(tmp_path / "x.parquet"), [])
