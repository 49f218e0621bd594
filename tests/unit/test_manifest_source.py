"""worker.manifest_source: manifests (JSON and JSON Lines, local and S3) back into items."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.report_fixtures import AWKWARD, MODEL, every_status_items, manifest_document, manifest_jsonl
from worker.manifest_source import ManifestError, ManifestSource, parse_manifest
from worker.manifests import ItemResult, TopK, build_manifest


def test_a_document_gives_every_item_with_its_manifest_job_and_model():
    raw = every_status_items()
    items = parse_manifest(manifest_document(raw), "s3://results/manifests/job-1.json")
    assert [i.key for i in items] == [r["key"] for r in raw]
    assert {i.status for i in items} == {"ok", "error", "no_dog", "uncertain", "reviewed_by_a_human"}
    assert all(i.job_id == "job-1" and i.manifest == "s3://results/manifests/job-1.json" for i in items)
    assert all((i.model_name, i.model_version, i.model_runtime) == tuple(MODEL.values()) for i in items)
    by_key = {i.key: i for i in items}
    assert by_key["incoming/cat.jpg"].dog_score == 0.02 and by_key["incoming/cat.jpg"].breed is None
    assert by_key["incoming/dog-1.jpg"].dog_score is None
    assert by_key["incoming/notes.jpg"].error_code == "not_an_image"
    assert [t.breed for t in by_key["incoming/dog-1.jpg"].top_k] == ["Samoyed", "dingo"]
    assert not any(i.photo_is_local for i in items)


def test_json_lines_carry_the_job_id_of_each_line_and_no_model():
    raw = every_status_items()
    items = parse_manifest(manifest_jsonl(raw).encode(), "m.jsonl")
    assert [i.key for i in items] == [r["key"] for r in raw]
    assert {i.job_id for i in items} == {"job-2"} and {i.model_name for i in items} == {None}
    single = parse_manifest(manifest_jsonl(raw[:1]), "one.jsonl")  # one line is also a JSON value
    assert [i.key for i in single] == [raw[0]["key"]]


def test_what_the_worker_writes_reads_back_field_by_field():
    results = [
        ItemResult.success("photos", "b/é 1.jpg", breed="beagle", synset="n02088364", score=0.8123456789,
                           top_k=[TopK("n02088364", "beagle", 0.8123456789)], etag="x", version_id="v1"),
        ItemResult.failure("photos", "a.jpg", error_code="truncated", error_message="ends early"),
    ]
    manifest = build_manifest("job-9", "job", MODEL, results)
    for text in (manifest.to_json(), manifest.to_jsonl()):
        items = {i.key: i for i in parse_manifest(text, "m")}
        assert items["b/é 1.jpg"].score == 0.812346 and items["b/é 1.jpg"].version_id == "v1"
        assert items["a.jpg"].status == "error" and items["a.jpg"].error_code == "truncated"
        assert {i.job_id for i in items.values()} == {"job-9"}


def test_a_local_folder_manifest_points_at_local_photos():
    doc = json.loads(manifest_document(every_status_items()[:1], source="local-folder"))
    doc["items"][0]["bucket"] = "photos"  # `classify photos` records the folder as given
    item = parse_manifest(json.dumps(doc), "m.json")[0]
    assert item.photo_is_local and item.photo_uri == "photos/incoming/dog-1.jpg"
    assert parse_manifest(manifest_jsonl([{**doc["items"][0], "bucket": "/data/photos"}]), "m")[0].photo_is_local


@pytest.mark.parametrize("text, reason", [
    ('{"hello": 1}', "not a manifest"),
    ('{"items": 3}', "not a list"),
    ('{"items": [{"key": "a.jpg"}]}', "bucket/key"),
    ('{"items": ["a.jpg"]}', "not an object"),
    ('{"bucket": "b", "key": "k"}\nnot json\n', "line 2"),
    (b"\xff\xfe\x00garbage", "UTF-8"),
])
def test_what_is_not_a_manifest_is_a_typed_error(text, reason):
    with pytest.raises(ManifestError, match=reason):
        parse_manifest(text, "x.json")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.fixed_dictionaries({
    "key": st.text(min_size=1), "status": st.text(min_size=1),
    "score": st.none() | st.floats(allow_nan=True, allow_infinity=True) | st.text() | st.booleans(),
    "top_k": st.none() | st.text() | st.lists(st.dictionaries(st.sampled_from(["breed", "score", "x"]),
                                                             st.none() | st.integers() | st.text()))}),
    max_size=5))
def test_odd_field_values_never_crash_and_numbers_stay_finite(raw):
    items = parse_manifest(json.dumps({"items": [{"bucket": "b", **r} for r in raw]}), "m")
    assert [i.key for i in items] == [r["key"] for r in raw]
    for item in items:
        assert item.score is None or (isinstance(item.score, float) and abs(item.score) != float("inf"))
        assert all(t.score is None or isinstance(t.score, float) for t in item.top_k)


def test_a_local_folder_source_lists_manifests_and_records_the_others(tmp_path):
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "a.json").write_text(manifest_document(every_status_items()[:2]))
    (tmp_path / "deep" / "er" / "b.jsonl").write_text(manifest_jsonl(every_status_items()[2:4]))
    (tmp_path / "history.json").write_text('{"loss": [1, 2]}')
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff")
    source = ManifestSource(str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in source.locations()] == ["a.json", "b.jsonl", "history.json"]
    assert len(list(source.items())) == 4
    assert [p.location.rsplit("/", 1)[1] for p in source.problems] == ["history.json"]
    assert len(list(ManifestSource(str(tmp_path / "a.json")).items())) == 2
    with pytest.raises(FileNotFoundError):
        ManifestSource(str(tmp_path / "nothing")).locations()


def test_an_s3_prefix_source_pages_through_the_listing(mock_s3):
    mock_s3.create_bucket(Bucket="results")
    for n in range(5):
        mock_s3.put_object(Bucket="results", Key=f"manifests/{n:04d}.json", Body=b"{}")
    mock_s3.put_object(Bucket="results", Key="manifests/0000.json",
                       Body=manifest_document([every_status_items()[0]]).encode())
    mock_s3.put_object(Bucket="results", Key="manifests/x.jsonl", Body=manifest_jsonl(every_status_items()).encode())
    mock_s3.put_object(Bucket="results", Key="manifests-old/y.json", Body=b"{}")  # a sibling prefix, not listed
    mock_s3.put_object(Bucket="results", Key="manifests/readme.txt", Body=b"not listed")
    calls = []
    mock_s3.meta.events.register("before-call.s3.ListObjectsV2", lambda **kw: calls.append(1))
    for uri in ("s3://results/manifests/", "s3://results/manifests"):
        source = ManifestSource(uri, mock_s3, page_size=2)
        assert len(source.locations()) == 6
    assert len(calls) == 2 * 4  # 7 keys under manifests/, 2 a page
    items = list(source.items())
    assert len(items) == 1 + len(every_status_items())
    assert {i.key for i in items} >= set(AWKWARD)
    assert len(source.problems) == 4  # the empty {} objects: JSON, but not manifests
    one = ManifestSource("s3://results/manifests/x.jsonl", mock_s3)
    assert one.locations() == ["s3://results/manifests/x.jsonl"] and len(list(one.items())) == len(every_status_items())
    gone = ManifestSource("s3://results/manifests/gone.json", mock_s3)
    assert list(gone.items()) == [] and "unreadable" in gone.problems[0].reason


def test_the_job_level_lines_of_a_split_prefix_job_or_a_job_error_are_not_items():
    from worker.manifests import Continuation, JobError

    pages = [Continuation(f"big.p000{n}-0a1b2c3d", f"s3://b/m/big.p000{n}-0a1b2c3d.json", 100, "a", "z")
             for n in (1, 2)]
    split = build_manifest("big", "prefix-job", MODEL, [], continuations=pages)
    failed = build_manifest("huge", "prefix-job", MODEL, [], error=JobError("too_many_objects", "more than 10"))
    for manifest in (split, failed):
        assert parse_manifest(manifest.to_json(), "m.json") == []
        assert parse_manifest(manifest.to_jsonl(), "m.jsonl") == []
    item = ItemResult.success("b", "a.jpg", breed="beagle", synset="n02088364", score=0.9)
    mixed = build_manifest("j", "job", MODEL, [item], continuations=pages[:1])
    assert [i.key for i in parse_manifest(mixed.to_jsonl(), "m.jsonl")] == ["a.jpg"]
