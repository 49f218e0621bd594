"""worker.report / worker.thumbnails: the static page of a batch, XSS-safe, streaming, with
placeholders for photos that cannot be shown."""

from __future__ import annotations

import base64
import io
import json
import tracemalloc
from html.parser import HTMLParser

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import colour_photo
from tests.unit.report_fixtures import AWKWARD, every_status_items, manifest_document, manifest_items, manifest_jsonl
from worker.manifest_source import ManifestSource, parse_manifest
from worker.report import ReportSettings, build_report, item_record, write_report
from worker.thumbnails import PhotoFetcher, Thumbnail, thumbnail_jpeg

#: Every tag the page is made of; anything else in a built page was injected.
PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "script", "header", "h1", "main", "section", "h2",
             "h3", "div", "b", "span", "p", "code", "ul", "li", "details", "summary", "svg", "rect", "text", "line",
             "figure", "figcaption", "form", "label", "select", "option", "input", "button", "noscript", "table",
             "thead", "tbody", "tr", "th", "td"}


class PageParser(HTMLParser):
    """Tags, attributes and the text of each <script>, the way a browser tokenises them."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[tuple[dict, str]] = []
        self._in_script: dict | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._in_script = dict(attrs)
            self.scripts.append((self._in_script, ""))

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = None

    def handle_data(self, data):
        if self._in_script is not None:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)
        else:
            self.text.append(data)


def parse_page(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    parser.close()
    return parser


def blob(parser: PageParser, element_id: str):
    return json.loads(next(text for attrs, text in parser.scripts if attrs.get("id") == element_id))


def fake_thumbnail(item) -> Thumbnail:
    return Thumbnail(None, "not_found") if item.key.endswith(".png") else Thumbnail("data:image/jpeg;base64,AAAA")


def build_in_memory(items, thumbnail=fake_thumbnail, **settings_kw) -> tuple[str, object]:
    out = io.StringIO()
    summary = write_report(out, items, thumbnail, ReportSettings(**settings_kw))
    return out.getvalue(), summary


def assert_page_is_only_ours(parser: PageParser) -> None:
    assert {tag for tag, _ in parser.tags} <= PAGE_TAGS
    assert not [(tag, name) for tag, attrs in parser.tags for name in attrs if name.lower().startswith("on")]
    assert [attrs.get("id") or attrs.get("type") for attrs, _ in parser.scripts] == ["items", "meta", None]


# --------------------------------------------------------------------------- escaping
@settings(max_examples=60, deadline=None)
@given(st.lists(manifest_items(), min_size=1, max_size=5), st.text(max_size=30))
def test_no_manifest_text_can_add_markup_and_every_text_reaches_the_script_unchanged(items, title):
    page, _ = build_in_memory(items, title=title)
    parser = parse_page(page)
    assert_page_is_only_ours(parser)
    assert blob(parser, "items") == [json.loads(json.dumps(item_record(i, fake_thumbnail(i)))) for i in items]
    assert blob(parser, "meta")["page_size"] == 100


def test_script_breaking_keys_and_breeds_stay_data():
    items = parse_manifest(manifest_document(every_status_items()), "s3://results/manifests/job-1.json")
    page, _ = build_in_memory(items)
    assert "</script><script>alert(1)" not in page and "<img src=x onerror" not in page
    parser = parse_page(page)
    assert_page_is_only_ours(parser)
    records = {r["key"]: r for r in blob(parser, "items")}
    assert set(AWKWARD) <= set(records)
    assert records[AWKWARD[3]]["breed"] == "<img src=x onerror=alert(3)> Shih-Tzu"
    assert "<img src=x onerror=alert(3)> Shih-Tzu" in "".join(parser.text)  # the breed bar's label, as text
    assert "Ça va? ñandú 犬" in AWKWARD[1] and AWKWARD[1] in records


# --------------------------------------------------------------------------- content
def stat_counts(page: str) -> dict[str, int]:
    """The numbers of the summary cards: photos and each status (data-status)."""
    counts: dict[str, int] = {}

    class Stats(HTMLParser):
        status = None

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if "data-status" in attrs:
                self.status = attrs["data-status"]
            if attrs.get("id") == "count-photos":
                self.status = "photos"

        def handle_data(self, data):
            if self.status and data.strip():
                counts[self.status] = int(data)
                self.status = None

    Stats().feed(page)
    return counts


def test_summary_counts_every_status_models_breeds_scores_and_error_codes():
    raw = every_status_items()
    items = parse_manifest(manifest_document(raw), "m1.json") + parse_manifest(manifest_jsonl(raw[:3]), "m2.jsonl")
    page, summary = build_in_memory(items)
    assert stat_counts(page) == {"photos": len(raw) + 3, "ok": 2 + 6 + 2, "error": 1 + 1, "no_dog": 1,
                                 "uncertain": 1, "reviewed_by_a_human": 1}
    assert summary.models == {("demo-breeds", "20261130T000000Z", "openvino-int8"): len(raw),
                              (None, None, None): 3}
    assert "demo-breeds" in page and "unknown model" in page
    assert summary.breeds["dingo"] == {"uncertain": 1}
    assert sum(summary.score_bins) == sum(1 for i in items if i.score is not None)
    assert summary.dog_score_bins[0] == 1 and summary.dog_score_bins[7] == 1  # 0.02 and 0.7
    assert summary.error_codes == {"not_an_image": 2}
    assert "The bytes are not an image" in page  # the code's meaning, from worker.images
    assert summary.placeholders == {"not_found": 1}  # the one .png key (fake_thumbnail)
    meta = blob(parse_page(page), "meta")
    assert meta["statuses"][:4] == ["ok", "error", "no_dog", "uncertain"] and "reviewed_by_a_human" in meta["statuses"]
    assert meta["breeds"] == sorted({i.breed for i in items if i.breed})


def test_an_empty_batch_is_a_page_too():
    page, summary = build_in_memory([])
    assert stat_counts(page)["photos"] == 0 and summary.photos == 0
    assert blob(parse_page(page), "items") == []


# --------------------------------------------------------------------------- thumbnails
@settings(max_examples=25, deadline=None)
@given(st.integers(1, 700), st.integers(1, 700), st.sampled_from(["JPEG", "PNG", "WEBP"]), st.integers(16, 200))
def test_a_thumbnail_is_a_small_jpeg_with_the_photo_aspect(width, height, fmt, size):
    jpeg = thumbnail_jpeg(colour_photo((200, 30, 30), size=(width, height), fmt=fmt), size=size)
    with Image.open(io.BytesIO(jpeg)) as thumb:
        assert thumb.format == "JPEG" and max(thumb.size) <= max(size, 1)
        if max(width, height) >= size:
            assert max(thumb.size) == size
            assert abs(thumb.size[0] / thumb.size[1] - width / height) <= max(1, width / height) * 2 / min(thumb.size)


def test_a_thumbnail_follows_exif_orientation():
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    Image.fromarray(np.zeros((40, 100, 3), np.uint8)).save(buffer, "JPEG", exif=exif)
    with Image.open(io.BytesIO(thumbnail_jpeg(buffer.getvalue(), size=50))) as thumb:
        assert thumb.size == (20, 50)


def test_local_photos_that_cannot_be_read_or_decoded_get_placeholders(tmp_path):
    photos = tmp_path / "photos"
    (photos / "incoming").mkdir(parents=True)
    (photos / "incoming" / "dog-1.jpg").write_bytes(colour_photo((40, 200, 60), size=(300, 200)))
    (photos / "incoming" / "dog-2.jpg").write_bytes(colour_photo((40, 200, 60))[:300])  # truncated
    (photos / "incoming" / "notes.jpg").write_text("not a photo")
    doc = json.loads(manifest_document(every_status_items()[:4], source="local-folder"))
    for item in doc["items"]:
        item["bucket"] = str(photos)
    (tmp_path / "m.json").write_text(json.dumps(doc))
    out = tmp_path / "out" / "report.html"
    summary = build_report(ManifestSource(str(tmp_path / "m.json")), out, PhotoFetcher(size=64).thumbnail,
                           show_progress=False)
    records = {r["key"]: r for r in blob(parse_page(out.read_text()), "items")}
    thumb = records["incoming/dog-1.jpg"]["thumb"]
    assert thumb.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(thumb.split(",", 1)[1]))) as image:
        assert image.size == (64, 43)
    assert records["incoming/dog-2.jpg"]["thumb"] is None
    assert records["incoming/dog-2.jpg"]["thumb_problem"] in ("truncated", "corrupt")
    assert records["incoming/notes.jpg"]["thumb_problem"] == "not_an_image"
    assert records["incoming/cat.jpg"]["thumb_problem"] == "unreadable_file"  # no such file
    assert summary.placeholders["unreadable_file"] == 1 and sum(summary.placeholders.values()) == 3
    assert not list(out.parent.glob("*.part"))


def test_s3_photos_thumbnails_links_and_missing_objects(mock_s3):
    mock_s3.create_bucket(Bucket="photos")
    mock_s3.put_object(Bucket="photos", Key="incoming/dog-1.jpg", Body=colour_photo((220, 40, 40)))
    items = {i.key: i for i in parse_manifest(manifest_document(every_status_items()), "m")}
    fetcher = PhotoFetcher(mock_s3, size=32)
    assert fetcher.thumbnail(items["incoming/dog-1.jpg"]).src.startswith("data:image/jpeg;base64,")
    assert fetcher.thumbnail(items["incoming/dog-2.jpg"]) == Thumbnail(None, "not_found")
    link = PhotoFetcher(mock_s3, link=True, link_expires=60).thumbnail(items[AWKWARD[0]]).src
    assert link.startswith("http") and "a%20photo%20with%20spaces.jpg" in link and "Expires=" in link


def test_an_exception_while_building_leaves_no_partial_page(tmp_path):
    (tmp_path / "m.json").write_text(manifest_document(every_status_items()))

    def broken(item):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        build_report(ManifestSource(str(tmp_path / "m.json")), tmp_path / "r.html", broken, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


# --------------------------------------------------------------------------- scale
@pytest.mark.slow
def test_ten_thousand_photos_build_streaming_in_bounded_memory(tmp_path):
    """Not a timing: the page of 10,000 photos with ~4 KB thumbnails is ~40 MB, and building it
    must never hold them all (peak traced memory stays a fraction of the page)."""
    folder = tmp_path / "manifests"
    folder.mkdir()
    for m in range(10):
        items = [dict(every_status_items()[n % 6], key=f"incoming/{m}/{n:05d}.jpg") for n in range(1000)]
        (folder / f"job-{m}.json").write_text(manifest_document(items, job_id=f"job-{m}"))
    filler = base64.b64encode(bytes(range(256)) * 12).decode()  # 4 KB, like a 128 px JPEG

    def thumbnail(item):
        return Thumbnail(f"data:image/jpeg;base64,{item.key}{filler}")

    out = tmp_path / "report.html"
    tracemalloc.start()
    try:
        summary = build_report(ManifestSource(str(folder)), out, thumbnail,
                               ReportSettings(threads=4, ahead=32), show_progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = out.stat().st_size
    assert summary.photos == 10_000 and summary.manifests == 10
    assert size > 40_000_000
    assert peak < size / 4, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB page"
    page = out.read_text()
    parser = parse_page(page)
    assert len(blob(parser, "items")) == 10_000
    assert stat_counts(page)["photos"] == 10_000
