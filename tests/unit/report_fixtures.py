"""Synthetic manifests for the report/export tests: every status, awkward keys and breeds."""

from __future__ import annotations

import json

from hypothesis import strategies as st

from worker.manifest_source import ManifestItem, TopGuess

MODEL = {"name": "demo-breeds", "version": "20261130T000000Z", "runtime": "openvino-int8"}
AWKWARD = [
    "incoming/a photo with spaces.jpg",
    "incoming/Ça va? ñandú 犬.jpg",
    "incoming/quote\"and'apostrophe.jpg",
    "incoming/</script><script>alert(1)</script>.jpg",
    "incoming/<img src=x onerror=alert(2)>&amp;.png",
    "incoming/line\u2028separator.jpg",
]


def raw_item(key: str, status: str, *, bucket: str = "photos", breed: str | None = "Samoyed",
             score: float | None = 0.9, dog_score: float | None = None, error_code: str | None = None,
             error_message: str | None = None) -> dict:
    item = {"bucket": bucket, "key": key, "etag": "e" + str(abs(hash(key)) % 1000), "version_id": None,
            "status": status, "error_code": error_code, "error_message": error_message,
            "breed": breed, "synset": "n02111889" if breed else None, "score": score,
            "top_k": [] if score is None else [{"breed": breed, "synset": "n02111889", "score": score},
                                               {"breed": "dingo", "synset": "n02115641", "score": 0.05}]}
    if dog_score is not None:
        item["dog_score"] = dog_score
    return item


def every_status_items() -> list[dict]:
    """Two ok, one error, one no_dog (with a hint), one uncertain, one unknown status, and the
    awkward keys (ok) with an XSS breed name."""
    items = [
        raw_item("incoming/dog-1.jpg", "ok", score=0.93),
        raw_item("incoming/dog-2.jpg", "ok", breed="beagle", score=0.41),
        raw_item("incoming/notes.jpg", "error", breed=None, score=None, error_code="not_an_image",
                 error_message="data is not a recognised image </script><b>bold</b>"),
        raw_item("incoming/cat.jpg", "no_dog", breed=None, score=None, dog_score=0.02),
        raw_item("incoming/blurry.jpg", "uncertain", breed="dingo", score=0.31, dog_score=0.7),
        raw_item("incoming/future.jpg", "reviewed_by_a_human", breed="beagle", score=0.5),
    ]
    items += [raw_item(key, "ok", breed="<img src=x onerror=alert(3)> Shih-Tzu", score=0.75) for key in AWKWARD]
    return items


def manifest_document(items: list[dict], job_id: str = "job-1", source: str = "job") -> str:
    counts: dict[str, int] = {}
    for item in items:
        counts[item["status"]] = counts.get(item["status"], 0) + 1
    return json.dumps({"schema_version": 1, "job_id": job_id, "source": source, "model": MODEL,
                       "counts": counts, "items": items}, ensure_ascii=False)


def manifest_jsonl(items: list[dict], job_id: str = "job-2") -> str:
    return "".join(json.dumps({**item, "job_id": job_id}, ensure_ascii=False) + "\n" for item in items)


# Text a manifest may hold: any Unicode but lone surrogates (S3 keys and JSON from the worker are UTF-8).
#: Fragments that break HTML/JS when not escaped, mixed into the generated text.
HOSTILE = ["</script>", "<script>", "<!--", "-->", "</SCRIPT ", "<img src=x onerror=alert(1)>", "&amp;", "&", "\"",
           "'", "`", "\u2028", "\u2029", "\\", "\n", "\r", "\x00", "${x}", "]}", "</style>", "</title>"]
texts = st.lists(st.sampled_from(HOSTILE) | st.text(st.characters(blacklist_categories=("Cs",)), min_size=1,
                                                  max_size=12), min_size=1, max_size=5).map("".join)
scores = st.floats(0, 1, allow_nan=False)
statuses = st.sampled_from(["ok", "error", "no_dog", "uncertain", "something_new"])


@st.composite
def manifest_items(draw, manifest: str = "s3://results/manifests/job.json") -> ManifestItem:
    optional_text = st.none() | texts
    optional_score = st.none() | scores
    return ManifestItem(
        manifest=manifest, job_id=draw(optional_text), model_name=draw(optional_text),
        model_version=draw(optional_text), model_runtime=draw(optional_text),
        bucket=draw(texts), key=draw(texts), etag=draw(optional_text), version_id=draw(optional_text),
        status=draw(statuses), error_code=draw(optional_text), error_message=draw(optional_text),
        breed=draw(optional_text), synset=draw(optional_text), score=draw(optional_score),
        dog_score=draw(optional_score),
        top_k=tuple(draw(st.lists(st.builds(TopGuess, optional_text, optional_text, optional_score), max_size=5))),
        photo_is_local=False,
    )
