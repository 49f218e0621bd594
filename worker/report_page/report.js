/* dogbreeds report: renders the gallery and the error list from the JSON blob #items.
   Text from manifests goes into the DOM with textContent only (never innerHTML). */
(function () {
  "use strict";
  var items = JSON.parse(document.getElementById("items").textContent);
  var meta = JSON.parse(document.getElementById("meta").textContent);
  var PAGE = meta.page_size || 100;
  var KNOWN = ["ok", "error", "no_dog", "uncertain"];

  function $(id) { return document.getElementById(id); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function cssName(status) { return KNOWN.indexOf(status) >= 0 ? status : "other"; }
  function label(status) { return meta.status_labels[status] || status; }
  function fmt(score) { return score === null || score === undefined ? "" : score.toFixed(2); }

  // ---- filters
  var fBreed = $("f-breed"), fStatus = $("f-status"), fScore = $("f-score"), fText = $("f-text");
  meta.breeds.forEach(function (b) { var o = el("option", null, b); o.value = b; fBreed.appendChild(o); });
  meta.statuses.forEach(function (s) { var o = el("option", null, label(s)); o.value = s; fStatus.appendChild(o); });

  var filtered = items, page = 0;
  function matches(it, breed, status, below, text) {
    if (breed && it.breed !== breed) return false;
    if (status && it.status !== status) return false;
    if (below !== null && !(it.score !== null && it.score < below)) return false;
    if (text && it.key.toLowerCase().indexOf(text) < 0) return false;
    return true;
  }
  function apply() {
    var below = fScore.value === "" ? null : parseFloat(fScore.value);
    if (below !== null && isNaN(below)) below = null;
    var breed = fBreed.value, status = fStatus.value, text = fText.value.toLowerCase();
    filtered = items.filter(function (it) { return matches(it, breed, status, below, text); });
    page = 0;
    render();
  }
  [fBreed, fStatus].forEach(function (x) { x.addEventListener("change", apply); });
  [fScore, fText].forEach(function (x) { x.addEventListener("input", apply); });
  $("filters").addEventListener("reset", function () { setTimeout(apply, 0); });
  $("filters").addEventListener("submit", function (event) { event.preventDefault(); });

  // ---- gallery
  function card(it) {
    var fig = el("figure", "card st-" + cssName(it.status));
    fig.dataset.status = it.status;
    if (it.thumb) {
      var img = el("img");
      img.loading = "lazy";
      img.decoding = "async";
      img.alt = it.key;
      img.addEventListener("error", function () {  // a --link URL that expired or a file that is gone
        img.replaceWith(el("div", "ph", "photo did not load"));
      });
      img.src = it.thumb;
      fig.appendChild(img);
    } else {
      fig.appendChild(el("div", "ph", "no preview" + (it.thumb_problem ? " (" + it.thumb_problem + ")" : "")));
    }
    var cap = el("figcaption");
    var text = it.breed || "";
    if (it.status === "error") text = "error: " + (it.error_code || "unknown");
    else if (it.status !== "ok") text = label(it.status) + (it.breed ? " (" + it.breed + "?)" : "");
    var name = el("div", "label", text);
    name.title = text;
    cap.appendChild(name);
    if (it.score !== null) {
      var bar = el("div", "scorebar"), track = el("span", "track"), fill = el("span", "fill");
      fill.style.width = Math.max(0, Math.min(100, it.score * 100)).toFixed(1) + "%";
      fill.style.display = "block";
      track.appendChild(fill);
      bar.appendChild(track);
      bar.appendChild(el("span", "score", fmt(it.score)));
      cap.appendChild(bar);
    }
    var key = el("div", "key", it.key);
    key.title = it.photo;
    cap.appendChild(key);
    var more = el("details"), lines = el("ol");
    more.appendChild(el("summary", null, it.top_k.length ? "top " + it.top_k.length : "details"));
    it.top_k.forEach(function (t) { lines.appendChild(el("li", null, (t[0] || "?") + " " + fmt(t[1]))); });
    if (it.top_k.length) more.appendChild(lines);
    if (it.dog_score !== null) more.appendChild(el("div", null, "dog score " + fmt(it.dog_score)));
    if (it.error_message) more.appendChild(el("div", null, it.error_message));
    if (it.model) more.appendChild(el("div", "muted", it.model));
    if (it.job_id) more.appendChild(el("div", "muted", "job " + it.job_id));
    cap.appendChild(more);
    fig.appendChild(cap);
    return fig;
  }

  function pager(node, pages, current, go) {
    node.replaceChildren();
    if (pages <= 1) return;
    function button(text, target, disabled) {
      var b = el("button", null, text);
      b.type = "button";
      b.disabled = disabled;
      b.addEventListener("click", function () { go(target); });
      return b;
    }
    node.appendChild(button("\u00ab first", 0, current === 0));
    node.appendChild(button("\u2039 prev", current - 1, current === 0));
    node.appendChild(el("span", "page-of", "page " + (current + 1) + " of " + pages));
    node.appendChild(button("next \u203a", current + 1, current >= pages - 1));
    node.appendChild(button("last \u00bb", pages - 1, current >= pages - 1));
  }

  function render() {
    var pages = Math.max(1, Math.ceil(filtered.length / PAGE));
    page = Math.min(page, pages - 1);
    var start = page * PAGE, shown = filtered.slice(start, start + PAGE);
    var grid = $("gallery");
    grid.replaceChildren.apply(grid, shown.map(card));
    $("shown").textContent = filtered.length === items.length
      ? items.length + " photos"
      : filtered.length + " of " + items.length + " photos match";
    function go(p) { page = p; render(); $("gallery-section").scrollIntoView(); }
    pager($("pager"), pages, page, go);
    pager($("pager-bottom"), pages, page, go);
  }

  // ---- error list (all errors, paged)
  var errors = items.filter(function (it) { return it.status === "error"; }), errorPage = 0;
  function renderErrors() {
    var box = $("error-list");
    if (!box) return;
    var pages = Math.max(1, Math.ceil(errors.length / PAGE));
    var table = el("table", "errors"), head = el("tr");
    ["photo", "code", "message"].forEach(function (h) { head.appendChild(el("th", null, h)); });
    table.appendChild(el("thead")).appendChild(head);
    var body = el("tbody");
    errors.slice(errorPage * PAGE, (errorPage + 1) * PAGE).forEach(function (it) {
      var tr = el("tr");
      var photo = el("td", null, it.key);
      photo.title = it.photo;
      tr.appendChild(photo);
      tr.appendChild(el("td")).appendChild(el("code", null, it.error_code || "unknown"));
      tr.appendChild(el("td", "msg", it.error_message || ""));
      body.appendChild(tr);
    });
    table.appendChild(body);
    box.replaceChildren(table);
    pager($("error-pager"), pages, errorPage, function (p) { errorPage = p; renderErrors(); });
  }

  render();
  renderErrors();
  document.body.dataset.ready = "1";
})();
