"""Manifests -> one table, one row per item: CSV (standard library) or Parquet (pyarrow).

Rows stream: each manifest is read, written and dropped before the next one. Columns are
:data:`COLUMNS`; ``top_k`` is a JSON array string in CSV (``[{"breed":..,"synset":..,"score":..}]``)
and a ``list<struct<breed, synset, score>>`` column in Parquet. In CSV an absent value (null)
is an empty field; scores are written with Python's ``repr`` so they read back exactly.
"""

from __future__ import annotations

import csv
import json
from typing import IO, Any, Iterable

from worker.manifest_source import ManifestItem

__all__ = ["COLUMNS", "FORMATS", "MissingDependency", "item_row", "parquet_schema", "write_csv", "write_parquet"]

COLUMNS = ("bucket", "key", "etag", "version_id", "status", "error_code", "error_message", "breed", "synset",
           "score", "dog_score", "top_k", "model_name", "model_version", "model_runtime", "job_id", "manifest")
FLOAT_COLUMNS = ("score", "dog_score")
FORMATS = ("csv", "parquet")
PARQUET_BATCH_ROWS = 4096


class MissingDependency(RuntimeError):
    """An optional package (pyarrow for Parquet) is not installed."""


def item_row(item: ManifestItem) -> dict[str, Any]:
    """One item as a row: ``top_k`` as a list of dicts (best first)."""
    return {
        "bucket": item.bucket, "key": item.key, "etag": item.etag, "version_id": item.version_id,
        "status": item.status, "error_code": item.error_code, "error_message": item.error_message,
        "breed": item.breed, "synset": item.synset, "score": item.score, "dog_score": item.dog_score,
        "top_k": [{"breed": t.breed, "synset": t.synset, "score": t.score} for t in item.top_k],
        "model_name": item.model_name, "model_version": item.model_version, "model_runtime": item.model_runtime,
        "job_id": item.job_id, "manifest": item.manifest,
    }


def _csv_value(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column == "top_k":
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if column in FLOAT_COLUMNS:
        return repr(float(value))
    return value


def write_csv(out: IO[str], items: Iterable[ManifestItem], progress=None) -> int:
    """Write the header and one row per item to ``out`` (opened with ``newline=""``); returns rows."""
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    rows = 0
    for item in items:
        row = item_row(item)
        writer.writerow([_csv_value(c, row[c]) for c in COLUMNS])
        rows += 1
        if progress:
            progress(1)
    return rows


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as error:
        raise MissingDependency("Parquet export needs pyarrow: pip install 'dogbreeds[export]' "
                                "(or pip install pyarrow), or use --format csv") from error
    return pyarrow, pyarrow.parquet


def parquet_schema():
    pa, _ = _pyarrow()
    text = pa.string()
    top = pa.struct([("breed", text), ("synset", text), ("score", pa.float64())])
    types = {"score": pa.float64(), "dog_score": pa.float64(), "top_k": pa.list_(top)}
    return pa.schema([(c, types.get(c, text)) for c in COLUMNS])


def write_parquet(path: str, items: Iterable[ManifestItem], progress=None,
                  batch_rows: int = PARQUET_BATCH_ROWS) -> int:
    """Write a Parquet file, one row group per ``batch_rows`` rows; returns rows."""
    pa, pq = _pyarrow()
    schema = parquet_schema()
    rows, batch = 0, []
    with pq.ParquetWriter(path, schema) as writer:
        def flush():
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch.clear()

        for item in items:
            batch.append(item_row(item))
            rows += 1
            if progress:
                progress(1)
            if len(batch) >= batch_rows:
                flush()
        flush()
    return rows
