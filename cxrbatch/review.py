"""The review page: one self-contained static HTML file for the person who reads the night's output.

Inline CSS and a few lines of inline JavaScript (table sorting, Escape closing the larger view)
only: no network, no CDN. Heatmap PNGs are linked as files beside the page. Every value that
comes from a file name, a DICOM file or a model is HTML-escaped, so a file named
`<script>…</script>.png` shows as text, and its characters that show nothing or move others
(controls, a right-to-left override, a zero-width space) are written as `\\u202e`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cxrbatch.modelspec import BUNDLED_REFERRAL, REFERRAL_FROM, SITE_REFERRAL
from cxrbatch.records import CLASSIFIED, ERROR, REJECTED, STATUSES, Record, Summary

DISCLAIMER = (
    "Screening support only: these labels come from an automated model and are not a diagnosis. "
    "Every film needs a reading by a qualified person."
)

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1b1f24;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px}
.disclaimer{background:#fff4d6;border:1px solid #e5c158;padding:8px 12px;border-radius:6px;max-width:900px}
.counts span{display:inline-block;margin:6px 14px 6px 0;padding:6px 10px;border-radius:6px;background:#eef1f5}
table{border-collapse:collapse;margin-top:6px} th,td{border-bottom:1px solid #dde2e8;padding:5px 10px;text-align:left}
th{background:#f4f6f9;cursor:pointer;user-select:none} td.num{text-align:right;font-variant-numeric:tabular-nums}
th[aria-sort=ascending]::after{content:" \\25b2"} th[aria-sort=descending]::after{content:" \\25bc"}
tr.flag td:first-child{border-left:4px solid #d9534f} .path{font-family:ui-monospace,monospace;word-break:break-all}
.cards{display:flex;flex-wrap:wrap;gap:12px} .card{width:260px;border:1px solid #dde2e8;border-radius:6px;padding:6px}
.card img{width:100%;max-height:360px;object-fit:contain;display:block;cursor:zoom-in}
.small{color:#5a6470;font-size:12px}
.zoom{display:none} .zoom:target{display:flex;position:fixed;inset:0;background:rgba(0,0,0,.85);
align-items:center;justify-content:center;z-index:10;cursor:zoom-out}
.zoom:target img{width:95vw;height:95vh;max-height:none;object-fit:contain}
@media print{body{margin:0;font-size:11px} th,td{padding:2px 4px} td.path{min-width:24ch} .card{break-inside:avoid}}
"""

_SORT_JS = """
var NUMBER = /^-?[0-9]+([.][0-9]+)?$/;  // a whole cell: a file named 1.2.840... is text
function sortBy(th, col) {
  var body = th.closest('table').tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  var dir = th.dataset.dir === 'asc' ? -1 : 1;
  th.dataset.dir = dir === 1 ? 'asc' : 'desc';
  th.parentNode.querySelectorAll('th').forEach(function (h) { h.removeAttribute('aria-sort'); });
  th.setAttribute('aria-sort', dir === 1 ? 'ascending' : 'descending');
  rows.sort(function (a, b) {
    var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
    if (NUMBER.test(x) && NUMBER.test(y)) { return (parseFloat(x) - parseFloat(y)) * dir; }
    return x.localeCompare(y, undefined, {numeric: true}) * dir;
  });
  rows.forEach(function (r) { body.appendChild(r); });
}
document.querySelectorAll('table.sortable th').forEach(function (th, col) {
  th.addEventListener('keydown', function (e) {
    if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); sortBy(th, col); }
  });
  th.addEventListener('click', function () { sortBy(th, col); });
});
document.addEventListener('keydown', function (e) {  // Escape closes the larger view, as a click does
  if (e.key === 'Escape' && document.querySelector('.zoom:target')) { location.replace('#_'); }
});
document.addEventListener('click', function (e) {  // opening and closing a view adds no history:
  var a = e.target.closest('.card a[href^="#"]');  // Back leaves the page, not reopens old views
  if (a) { e.preventDefault(); location.replace(a.getAttribute('href')); }
});
"""


def render_html(
    records: Sequence[Record],
    labels: Sequence[str],
    negative_label: str,
    models: dict[str, Any],
    summary: Summary,
    started: str,
    html_path: Path,
) -> str:
    """Render the review page for a run's report records: the films to read first, most suspicious first."""
    classified = sorted(
        (r for r in records if r.status == CLASSIFIED), key=lambda r: (not r.to_read(negative_label), *_suspicion(r))
    )
    to_read = [r for r in classified if r.to_read(negative_label)]
    unsure = [r for r in classified if r.needs_review and not r.to_read(negative_label)]
    folder = os.fsencode(html_path.parent if str(html_path.parent) else Path("."))
    here = (_as_kernel_reads(folder), os.path.realpath(folder))  # the page's folder, for every link (`_href`)
    # a night with no film classified still has the classifier's threshold (the models table says so)
    referral = any(r.refer is not None for r in classified) or any(
        m.get("referral_threshold") is not None for m in models.values()
    )
    first = "Referred to a reader" if referral else f"Flagged: not {negative_label}"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        f"<title>cxrbatch review {escape(started)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Chest X-ray screening review</h1><div class='small'>run started {escape(started)}</div>",
        f"<p class='disclaimer'><strong>Not a diagnosis.</strong> {escape(DISCLAIMER)}</p>",
        _counts(summary, len(to_read) + len(unsure)),
        _cards(f"{first} ({len(to_read)}), most suspicious first", to_read, here, "read"),
        _cards(f"{'Cleared' if referral else negative_label}, but unsure ({len(unsure)})", unsure, here, "unsure"),
        _classified_table(classified, labels, negative_label),
        _other_table(
            "Rejected by the gate (not a chest X-ray)",
            [r for r in records if r.status == REJECTED],
            "gate_score",
            "gate score",
        ),
        _other_table("Files that could not be read", [r for r in records if r.status == ERROR], "error", "error"),
        _models(models),
        f"<script>{_SORT_JS}</script></body></html>\n",
    ]
    return "\n".join(parts)


def _href(heatmap: str, here: tuple[bytes, bytes]) -> str:
    """The heatmap's link relative to the page's folder `here` (as `_as_kernel_reads` spells it,
    and its real path): each `..` taken where the kernel takes it, and the heatmap's \\xNN escapes
    (display_path) made bytes again."""
    raw = heatmap.encode("utf-8")
    if not os.path.lexists(raw):  # display_path's \xNN escapes (only ever of bytes 0x80 and up)
        raw = re.sub(rb"\\x([89a-f][0-9a-f])", lambda m: bytes([int(m[1], 16)]), raw)
    spelled = os.path.relpath(_as_kernel_reads(raw), here[0])
    real = os.path.relpath(os.path.realpath(raw), here[1])
    # maps under the page's real folder are linked beside it (a page named through a linked folder
    # or a `latest.html` link is written where it really lies: `written_at`)
    rel = real if spelled.startswith(b"../") and not real.startswith(b"../") else spelled
    return escape(quote(rel), quote=True)


def _as_kernel_reads(path: bytes) -> bytes:
    """`path` absolute with each `..` taken where the kernel takes it (after the link before it),
    every other link kept as spelled: the page and its maps stay the folders the reader opens."""
    out = b"/" if path.startswith(b"/") else os.path.abspath(b".")
    for part in path.split(b"/"):
        if part == b"..":
            out = os.path.dirname(os.path.realpath(out))
        elif part not in (b"", b"."):
            out = os.path.join(out, part)
    return out


def _suspicion(record: Record) -> tuple[float, str]:
    """Most suspicious first: the highest referral score, then the path."""
    return (-(record.referral_score or 0.0), record.path)


def _counts(summary: Summary, flagged: int) -> str:
    spans = [f"<span>{escape(s)}: <b>{summary.by_status[s]}</b></span>" for s in STATUSES]
    spans += [f"<span>{escape(k)}: <b>{v}</b></span>" for k, v in sorted(summary.by_label.items())]
    if summary.referred or summary.cleared:
        spans += [
            f"<span>referred: <b>{summary.referred}</b></span>",
            f"<span>cleared: <b>{summary.cleared}</b></span>",
        ]
    if summary.unfamiliar:
        spans.append(f"<span>unfamiliar films: <b>{summary.unfamiliar}</b></span>")
    spans.append(f"<span>for a reader's look: <b>{flagged}</b></span>")
    warning = summary.site_warning()
    note = ""
    if warning:
        title = "<strong>Unlike the reference films.</strong>"
        note = f"<p class='disclaimer' id='site-check'>{title} {escape(warning)}</p>"
    return f"<h2>Summary: {summary.files} files</h2><div class='counts'>{''.join(spans)}</div>{note}"


def _cards(title: str, rows: list[Record], here: tuple[bytes, bytes], section: str) -> str:
    cards = []
    for i, r in enumerate(rows):
        view = ""
        if r.heatmap:
            # a relative URL: quoted, so that a folder named "maps #1" or "50%" is not read as a
            # fragment or an escape; loaded lazily, so that a page of thousands of cards opens
            src = _href(r.heatmap, here)
            zoom = f"{section}-{i}"
            # each picture named by its film and result: a screen reader heard the same words on every card
            what = escape(f"{r.label} {r.confidence or 0.0:.2f}, {_shown(r.path)}", quote=True)
            view = (
                f"<a href='#{zoom}' title='larger view'><img src='{src}' loading='lazy' "
                f"alt='{what}: strongest regions marked'></a><a class='zoom' id='{zoom}' href='#_'>"
                f"<img src='{src}' loading='lazy' alt='{what}: larger view'></a>"
            )
        badges = " · ".join(b for b, on in (("needs review", r.needs_review), ("unfamiliar film", r.unfamiliar)) if on)
        score = f" · referral {r.referral_score:.3f}" if r.referral_score is not None else ""
        problem = f"<div class='small'>{escape(_shown(r.error))}</div>" if r.error else ""
        path = escape(_shown(r.path))
        cards.append(
            f"<div class='card'>{view}<div><b>{escape(str(r.label))}</b> {r.confidence or 0.0:.2f}{score}</div>"
            f"<div class='small'>{escape(badges)}</div><div class='path small'>{path}</div>{problem}</div>"
        )
    body = "".join(cards) or "<p>None.</p>"
    return f"<h2>{escape(title)}</h2><div class='cards'>{body}</div>"


def _classified_table(rows: list[Record], labels: Sequence[str], negative_label: str) -> str:
    head = ["file", "label", "confidence", "referral score", "refer", *labels, "review"]
    out = [f"<h2>Classified ({len(rows)}), most suspicious first — click a column to sort</h2>"]
    out.append("<table class='sortable'><thead><tr>")
    out += [f"<th tabindex='0' scope='col'>{escape(h)}</th>" for h in head]  # Tab and Enter sort too
    out.append("</tr></thead><tbody>")
    for r in rows:
        probs = r.probabilities or {}
        refer = "" if r.refer is None else "refer" if r.refer else "clear"
        cells = [_cell(r.path, cls="path"), _cell(r.label), _num(r.confidence), _num(r.referral_score), _cell(refer)]
        cells += [_num(probs.get(label)) for label in labels]
        cells.append(_cell("unfamiliar" if r.unfamiliar else "yes" if r.needs_review else ""))
        out.append(f"<tr class='{'flag' if r.flagged(negative_label) else ''}'>{''.join(cells)}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _other_table(title: str, rows: list[Record], key: str, heading: str) -> str:
    if not rows:
        return f"<h2>{escape(title)} (0)</h2>"
    value = _num if key == "gate_score" else _cell
    body = "".join(f"<tr>{_cell(r.path, cls='path')}{value(getattr(r, key))}</tr>" for r in rows)
    return (
        f"<h2>{escape(title)} ({len(rows)})</h2><table><thead><tr><th>file</th><th>{escape(heading)}</th></tr>"
        f"</thead><tbody>{body}</tbody></table>"
    )


def _models(models: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr>{_cell(role)}{_cell(m.get('name'))}{_cell(m.get('version'))}{_cell(_referral(m))}"
        f"{_cell(m.get('sha256'), cls='path')}</tr>"
        for role, m in models.items()
    )
    return (
        "<h2>Models</h2><table><thead><tr><th>role</th><th>name</th><th>version</th><th>referral score</th>"
        f"<th>sha256</th></tr></thead><tbody>{rows}</tbody></table>"
    )


# How the page names the referral heads that `Model.describe` reports (its `referral_from`).
_REFERRAL_SOURCE = {
    REFERRAL_FROM[SITE_REFERRAL]: "the site's own head",
    REFERRAL_FROM[BUNDLED_REFERRAL]: "the bundled referral head",
}


def _referral(model: dict[str, Any]) -> str:
    """Where a classifier's referral score comes from, and the threshold it is held against."""
    if model.get("referral_threshold") is None:
        return ""
    named = model.get("referral_from")
    source = _REFERRAL_SOURCE.get(named or "", named or "1 - p(no finding)")
    return f"{source}, refer at >= {model['referral_threshold']:.6f}"


def _shown(text: str) -> str:
    """`text` with each character that is not printable written as `\\u202e`: a name holding a
    right-to-left override showed `x\\u202egpj.exe` as `xexe.jpg`, one with a zero-width space
    looked like another film's name."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else f"\\u{ord(c):04x}" if c < "\U00010000" else f"\\U{ord(c):08x}" for c in text
    )


def _cell(value: Any, cls: str = "") -> str:
    text = "" if value is None else _shown(str(value))
    attr = f" class='{cls}'" if cls else ""
    return f"<td{attr} data-v='{escape(text, quote=True)}'>{escape(text)}</td>"


def _num(value: float | None) -> str:
    if value is None:
        return "<td class='num' data-v=''></td>"
    return f"<td class='num' data-v='{value:.6f}'>{value:.3f}</td>"
