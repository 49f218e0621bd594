"""Manifests -> one self-contained static HTML page to look at a labelled batch.

The page has no server and no CDN: CSS and JS are inline (``worker/report_page/``), photos are
small JPEG data URIs (or presigned links with ``link=True``), and the items are one JSON blob
that the page's script renders from, 100 cards a page with ``loading="lazy"`` images, so a
10,000-photo batch stays usable. The summary, the per-breed bars, the score histograms and the
error codes are plain HTML/SVG written here (they show without JavaScript).

Building streams: manifests are read one at a time, photos are fetched and shrunk by a few
threads with a bounded number in flight, and each item's record goes to the file as soon as
its thumbnail is ready, so memory does not grow with the batch (only the counters of
:class:`ReportSummary` do). The file is written to ``<out>.part`` and renamed when complete.

Escaping: every text from a manifest (keys, breeds, error messages, model names) reaches the
page either through :func:`html.escape` (the static parts) or through :func:`script_json`
inside ``<script type="application/json">`` (``<``, ``>``, ``&`` escaped as ``\\u003c`` ...,
so a key containing ``</script>`` cannot end the block), and the script puts it in the DOM
with ``textContent``, never ``innerHTML``.
"""

from __future__ import annotations

import html
import json
import os
import sys
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

from worker.images import ERROR_CODES
from worker.manifest_source import KNOWN_STATUSES, ManifestItem, ManifestProblem, ManifestSource
from worker.thumbnails import Thumbnail

__all__ = ["ReportSettings", "ReportSummary", "build_report", "item_record", "script_json", "write_report"]

HISTOGRAM_BINS = 10
MAX_BREED_BARS = 120
STATUS_LABELS = {"ok": "ok", "error": "error", "no_dog": "no dog", "uncertain": "uncertain"}
ERROR_DESCRIPTIONS = {**ERROR_CODES, "not_found": "The photo is not in S3 (NoSuchKey).",
                      "access_denied": "S3 refused to read the photo.", "no_such_bucket": "The bucket does not exist.",
                      "unreadable_file": "The local file could not be read."}


@dataclass(frozen=True)
class ReportSettings:
    title: str = "dogbreeds report"
    page_size: int = 100  # cards per gallery page
    threads: int = 8  # photos fetched and shrunk at once
    ahead: int = 64  # items whose thumbnails may be in flight (bounds memory)


@dataclass
class ReportSummary:
    """What the static part of the page shows; counters only, never the items."""

    source: str = ""
    photos: int = 0
    statuses: Counter = field(default_factory=Counter)
    breeds: dict[str, Counter] = field(default_factory=dict)  # breed -> status -> photos
    models: Counter = field(default_factory=Counter)  # (name, version, runtime) -> photos
    score_bins: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BINS)
    dog_score_bins: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BINS)
    error_codes: Counter = field(default_factory=Counter)
    placeholders: Counter = field(default_factory=Counter)  # thumbnail problem -> photos
    manifests: int = 0
    problems: list[ManifestProblem] = field(default_factory=list)

    def add(self, item: ManifestItem, thumb: Thumbnail) -> None:
        self.photos += 1
        self.statuses[item.status] += 1
        if item.breed is not None:
            self.breeds.setdefault(item.breed, Counter())[item.status] += 1
        self.models[(item.model_name, item.model_version, item.model_runtime)] += 1
        if item.score is not None:
            self.score_bins[_bin(item.score)] += 1
        if item.dog_score is not None:
            self.dog_score_bins[_bin(item.dog_score)] += 1
        if item.status == "error":
            self.error_codes[item.error_code or "unknown"] += 1
        if thumb.src is None:
            self.placeholders[thumb.problem or "unknown"] += 1

    def status_counts(self) -> dict[str, int]:
        """Every known status (0 when absent) then any other status seen, in that order."""
        counts = {status: self.statuses.get(status, 0) for status in KNOWN_STATUSES}
        counts.update(sorted((s, n) for s, n in self.statuses.items() if s not in counts))
        return counts

    def line(self) -> str:
        counts = ", ".join(f"{n} {STATUS_LABELS.get(s, s)}" for s, n in self.status_counts().items() if n)
        extra = f"; {sum(self.placeholders.values())} without a thumbnail" if self.placeholders else ""
        skipped = f"; {_files(len(self.problems))} skipped (not manifests)" if self.problems else ""
        return f"{self.photos} photos from {self.manifests} manifests ({counts or 'none'}){extra}{skipped}"


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def _bin(score: float) -> int:
    return min(HISTOGRAM_BINS - 1, max(0, int(score * HISTOGRAM_BINS)))


def script_json(value: Any) -> str:
    """JSON that is safe inside ``<script type="application/json">``: ASCII only (so lone
    surrogates and U+2028 survive), with ``<``, ``>`` and ``&`` as unicode escapes."""
    text = json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def item_record(item: ManifestItem, thumb: Thumbnail) -> dict[str, Any]:
    """What the page's script knows of one item."""
    return {
        "photo": item.photo_uri, "key": item.key, "status": item.status, "breed": item.breed,
        "synset": item.synset, "score": item.score, "dog_score": item.dog_score,
        "error_code": item.error_code, "error_message": item.error_message,
        "top_k": [[t.breed, t.score] for t in item.top_k],
        "model": " ".join(p for p in (item.model_name, item.model_version) if p) or None,
        "job_id": item.job_id, "manifest": item.manifest,
        "thumb": thumb.src, "thumb_problem": thumb.problem,
    }


def _asset(name: str) -> str:
    return resources.files("worker").joinpath("report_page", name).read_text(encoding="utf-8")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


# --------------------------------------------------------------------------- static sections
def _summary_html(summary: ReportSummary) -> str:
    cards = [f'<div class="stat"><b id="count-photos">{summary.photos}</b><span>photos</span></div>']
    for status, n in summary.status_counts().items():
        cards.append(f'<div class="stat st-{_e(_css_name(status))}" data-status="{_e(status)}"><b>{n}</b>'
                     f'<span>{_e(STATUS_LABELS.get(status, status))}</span></div>')
    models = "".join(
        f"<li><b>{_e(name or 'unknown model')}</b> {_e(version or '')}"
        f"{' (' + _e(runtime) + ')' if runtime else ''}: {n} photos</li>"
        for (name, version, runtime), n in sorted(summary.models.items(), key=lambda kv: (-kv[1], str(kv[0]))))
    notes = []
    if summary.placeholders:
        notes.append("No thumbnail for " + ", ".join(
            f"{n} ({_e(code)})" for code, n in sorted(summary.placeholders.items())) + " photos.")
    if summary.problems:
        listed = "".join(f"<li><code>{_e(p.location)}</code>: {_e(p.reason)}</li>" for p in summary.problems[:50])
        more = f"<li>... and {len(summary.problems) - 50} more</li>" if len(summary.problems) > 50 else ""
        notes.append(f"<details><summary>{_files(len(summary.problems))} under the source skipped (not manifests)"
                     f"</summary><ul>{listed}{more}</ul></details>")
    return (f'<section id="summary"><h2>Summary</h2><div class="stats">{"".join(cards)}</div>'
            f'<p class="muted">{summary.manifests} manifests from <code>{_e(summary.source)}</code></p>'
            f'<h3>Model</h3><ul id="models">{models or "<li>none</li>"}</ul>'
            + "".join(f'<div class="note">{n}</div>' for n in notes) + "</section>")


def _css_name(status: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in status) if status in KNOWN_STATUSES else "other"


def _breeds_html(summary: ReportSummary) -> str:
    if not summary.breeds:
        return '<section id="breeds"><h2>Breeds</h2><p class="muted">No photo has a breed.</p></section>'
    rows = sorted(summary.breeds.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
    top = max(sum(c.values()) for _, c in rows)
    lines = []
    for breed, counts in rows[:MAX_BREED_BARS]:
        total = sum(counts.values())
        segments = "".join(
            f'<span class="seg st-{_e(_css_name(status))}" style="width:{100 * n / top:.3f}%" '
            f'title="{_e(STATUS_LABELS.get(status, status))}: {n}"></span>'
            for status, n in sorted(counts.items(), key=lambda kv: _status_order(kv[0])))
        lines.append(f'<div class="brow"><span class="bname" title="{_e(breed)}">{_e(breed)}</span>'
                     f'<span class="btrack">{segments}</span><span class="bcount">{total}</span></div>')
    more = (f'<p class="muted">... and {len(rows) - MAX_BREED_BARS} more breeds (use the breed filter)</p>'
            if len(rows) > MAX_BREED_BARS else "")
    return (f'<section id="breeds"><h2>Photos per breed</h2><p class="muted">Predicted breed; the colour is the '
            f'status (ok, or a hint for uncertain / no-dog photos).</p><div class="bars">{"".join(lines)}</div>'
            f"{more}</section>")


def _status_order(status: str) -> tuple[int, str]:
    return (KNOWN_STATUSES.index(status) if status in KNOWN_STATUSES else len(KNOWN_STATUSES), status)


def histogram_svg(bins: list[int], label: str) -> str:
    """An inline SVG bar chart of ``bins`` over [0, 1]."""
    width, height, pad, base = 360, 150, 28, 20
    top = max(bins) or 1
    bar = (width - 2 * pad) / len(bins)
    parts = [f'<svg class="hist" viewBox="0 0 {width} {height}" role="img" aria-label="{_e(label)}">']
    for i, n in enumerate(bins):
        h = (height - base - 18) * n / top
        x, y = pad + i * bar, height - base - h
        lo, hi = i / len(bins), (i + 1) / len(bins)
        parts.append(f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{bar - 2:.1f}" height="{h:.1f}">'
                     f"<title>{lo:.1f}-{hi:.1f}: {n}</title></rect>")
        if n:
            parts.append(f'<text x="{x + bar / 2:.1f}" y="{y - 3:.1f}" class="n">{n}</text>')
    for tick in (0, 0.5, 1):
        parts.append(f'<text x="{pad + tick * (width - 2 * pad):.1f}" y="{height - 4}" class="t">{tick:g}</text>')
    parts.append(f'<line x1="{pad}" y1="{height - base}" x2="{width - pad}" y2="{height - base}"/></svg>')
    return "".join(parts)


def _histograms_html(summary: ReportSummary) -> str:
    charts = [f'<figure><figcaption>Breed score (top-1), {sum(summary.score_bins)} photos</figcaption>'
              f'{histogram_svg(summary.score_bins, "breed score histogram")}</figure>']
    if any(summary.dog_score_bins):
        charts.append(f'<figure><figcaption>Dog score, {sum(summary.dog_score_bins)} photos</figcaption>'
                      f'{histogram_svg(summary.dog_score_bins, "dog score histogram")}</figure>')
    return f'<section id="scores"><h2>Scores</h2><div class="charts">{"".join(charts)}</div></section>'


def _errors_html(summary: ReportSummary) -> str:
    if not summary.error_codes:
        return '<section id="errors"><h2>Errors</h2><p class="muted">No photo failed.</p></section>'
    rows = "".join(f'<tr><td><code>{_e(code)}</code></td><td class="num">{n}</td>'
                   f"<td>{_e(ERROR_DESCRIPTIONS.get(code, ''))}</td></tr>"
                   for code, n in sorted(summary.error_codes.items(), key=lambda kv: (-kv[1], kv[0])))
    return (f'<section id="errors"><h2>Errors</h2><table class="codes"><thead><tr><th>code</th><th>photos</th>'
            f"<th>meaning</th></tr></thead><tbody>{rows}</tbody></table>"
            f'<div id="error-list"></div><div class="pager" id="error-pager"></div></section>')


_GALLERY = """<section id="gallery-section"><h2>Photos</h2>
<form id="filters" class="filters">
<label>breed <select id="f-breed"><option value="">all</option></select></label>
<label>status <select id="f-status"><option value="">all</option></select></label>
<label>score below <input id="f-score" type="number" min="0" max="1" step="0.05" placeholder="t"></label>
<label>key contains <input id="f-text" type="search"></label>
<button type="reset" id="f-reset">clear</button>
<span id="shown" class="muted"></span></form>
<div class="pager" id="pager"></div><div id="gallery" class="grid"></div><div class="pager" id="pager-bottom"></div>
<noscript><p>The gallery and the error list need JavaScript; the summary and charts above do not.</p></noscript>
</section>"""


# --------------------------------------------------------------------------- building
def _thumbnails(items: Iterable[ManifestItem], thumbnail: Callable[[ManifestItem], Thumbnail],
                settings: ReportSettings) -> Iterator[tuple[ManifestItem, Thumbnail]]:
    """(item, thumbnail) in input order, at most ``settings.ahead`` in flight."""
    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=max(1, settings.threads), thread_name_prefix="thumb") as pool:
        for item in items:
            pending.append((item, pool.submit(thumbnail, item)))
            if len(pending) >= max(1, settings.ahead):
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def write_report(out: IO[str], items: Iterable[ManifestItem], thumbnail: Callable[[ManifestItem], Thumbnail],
                 settings: ReportSettings = ReportSettings(), summary: ReportSummary | None = None,
                 progress: Callable[[int], Any] | None = None) -> ReportSummary:
    """Stream the page to ``out``; ``thumbnail`` must not raise (see :class:`PhotoFetcher`)."""
    summary = summary if summary is not None else ReportSummary()
    out.write(f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
              f'<meta name="viewport" content="width=device-width, initial-scale=1">'
              f"<title>{_e(settings.title)}</title><style>{_asset('report.css')}</style></head>\n<body>\n"
              '<script type="application/json" id="items">[')
    for index, (item, thumb) in enumerate(_thumbnails(items, thumbnail, settings)):
        out.write(("," if index else "") + "\n" + script_json(item_record(item, thumb)))
        summary.add(item, thumb)
        if progress:
            progress(1)
    meta = {"page_size": settings.page_size, "statuses": list(summary.status_counts()),
            "status_labels": STATUS_LABELS, "breeds": sorted(summary.breeds)}
    out.write(f'\n]</script>\n<script type="application/json" id="meta">{script_json(meta)}</script>\n'
              f'<header><h1>{_e(settings.title)}</h1></header><main>'
              f"{_summary_html(summary)}{_breeds_html(summary)}{_histograms_html(summary)}{_GALLERY}"
              f"{_errors_html(summary)}</main>\n<script>{_asset('report.js')}</script>\n</body></html>\n")
    return summary


def build_report(source: ManifestSource, out_path: str | os.PathLike, thumbnail: Callable[[ManifestItem], Thumbnail],
                 settings: ReportSettings = ReportSettings(), show_progress: bool = True) -> ReportSummary:
    """Read every manifest of ``source`` and write the page to ``out_path`` (atomically), with a
    progress bar on stderr whose total grows as manifests are read."""
    from tqdm.auto import tqdm

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".part")
    summary = ReportSummary(source=source.source, problems=source.problems)  # filled while reading
    locations = source.locations()
    with tqdm(total=0, desc="report", unit="photo", file=sys.stderr, disable=None if show_progress else True) as bar:
        def items() -> Iterator[ManifestItem]:
            for location in locations:
                skipped = len(source.problems)
                manifest_items = source.read(location)
                summary.manifests += len(source.problems) == skipped
                bar.total += len(manifest_items)
                bar.refresh()
                yield from manifest_items

        try:
            with open(partial, "w", encoding="utf-8", errors="replace") as out:
                write_report(out, items(), thumbnail, settings, summary, progress=bar.update)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    os.replace(partial, out_path)
    return summary
