"""The review page: escaped, self-contained, and checked in a real (headless) browser."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from urllib.parse import unquote_to_bytes, urljoin, urlparse

import numpy as np
import pytest
from helpers import REPO, grey_image
from PIL import Image
from typer.testing import CliRunner

from cxrbatch.cli import app
from cxrbatch.models import default_models_dir, load_models
from cxrbatch.records import CLASSIFIED, REJECTED, Record, Summary
from cxrbatch.review import _SORT_JS, render_html

EVIL = "<img src=x onerror=\"document.title='pwned'\">"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The review page of the bundled samples plus a photo whose file name is an HTML payload."""
    root = tmp_path_factory.mktemp("review")
    inbox = root / "in"
    shutil.copytree(REPO / "samples", inbox, ignore=shutil.ignore_patterns("*.md"))
    shutil.copy(inbox / "chelsea.png", inbox / f"{EVIL}.png")
    (inbox / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    html = root / "out" / "review.html"
    html.parent.mkdir()
    result = CliRunner().invoke(
        app,
        [
            "run",
            str(inbox),
            "--out",
            str(root / "out" / "r.csv"),
            "--heatmaps",
            str(root / "out" / "maps #1"),  # a folder name that is no URL as it stands
            "--html",
            str(html),
            "--quiet",
        ],
    )
    assert result.exit_code == 3, result.stderr  # the broken file
    return html


def test_page_is_self_contained_and_escaped(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text  # no CDN, no network
    assert EVIL not in text and "&lt;img src=x onerror=" in text
    assert "Not a diagnosis." in text
    assert "Rejected by the gate (not a chest X-ray) (4)" in text  # two photos, the payload, the CT
    assert "Files that could not be read (1)" in text
    # the shipped classifier refers the pneumonia sample and clears the normal one, sure of both
    assert "Referred to a reader (1), most suspicious first" in text and "Cleared, but unsure (0)" in text
    cards = text.split("Referred to a reader", 1)[1].split("<h2>", 1)[0]
    assert "person1947_bacteria_4876.jpeg" in cards and "NORMAL2-IM-1437-0001.jpeg" not in cards
    table = text.split("<h2>Classified (2), most suspicious first", 1)[1].split("<h2>", 1)[0]
    assert table.index("person1947_bacteria_4876.jpeg") < table.index("NORMAL2-IM-1437-0001.jpeg")  # by score
    assert "<td data-v='clear'>clear</td>" in table
    # the referred film's thumbnail and its larger view, linked relatively, quoted, loaded when shown
    assert text.count("<img src='maps%20%231/") == 2 and text.count("loading='lazy'") == 2
    assert "<a href='#read-0' title='larger view'>" in text and "<a class='zoom' id='read-0' href='#_'>" in text
    # each picture says whose it is (a screen reader heard "film with its strongest regions marked" on every card)
    assert "alt='PNEUMONIA 0." in cards and "person1947_bacteria_4876.jpeg: strongest regions marked'" in cards
    assert "person1947_bacteria_4876.jpeg: larger view'" in cards
    assert "referral score" in text and "<td data-v='refer'>refer</td>" in text
    threshold = load_models(default_models_dir(), "cpu")[1].spec.referral_threshold  # the shipped one
    assert f"the bundled referral head, refer at &gt;= {threshold:.6f}" in text  # where the score comes from


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs Debian's chromium)")
def test_page_in_headless_chromium(page: Path, tmp_path: Path) -> None:
    profile = tmp_path / "profile"
    url = page.as_uri()
    dom = subprocess.run(
        [CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "<title>cxrbatch review" in dom and "pwned" not in dom.split("</title>")[0]  # the payload never ran
    for name in ("NORMAL2-IM-1437-0001.jpeg", "person1947_bacteria_4876.jpeg", "CT_small.dcm", "broken.jpg"):
        assert name in dom
    shot = tmp_path / "review.png"
    subprocess.run(
        [CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile}", "--window-size=1200,1400", f"--screenshot={shot}", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (1400, 1200)
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert colours > 500  # text, tables and heatmap thumbnails, not a blank page
    assert (pixels < 100).all(axis=2).mean() > 0.005  # some dark text is on it


@pytest.mark.parametrize(
    ("heatmaps", "page", "opened"),
    [("out/../maps", "review.html", "review.html"), ("maps", "out/../review.html", "archive/2026/review.html")],
)
def test_heatmaps_and_a_page_named_through_link_dotdot(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, heatmaps: str, page: str, opened: str
) -> None:
    # out -> archive/2026/12: `out/..` is archive/2026 to the kernel, the current folder to
    # tempfile (the heatmaps went unwritten) and to the links
    grey_image(tmp_path / "a.png", 20)
    (tmp_path / "archive" / "2026" / "12").mkdir(parents=True)
    (tmp_path / "out").symlink_to(tmp_path / "archive" / "2026" / "12")
    monkeypatch.chdir(tmp_path)
    _run_a(tiny_models, "--heatmaps", heatmaps, "--html", page)
    row = next(csv.DictReader(open("r.csv", encoding="utf-8")))
    assert row["error"] == "" and row["heatmap"]
    srcs = _srcs(tmp_path / opened)
    assert srcs and all(_browser_opens(tmp_path / opened, s) for s in srcs), srcs


def test_heatmap_links_under_a_folder_whose_name_is_not_utf8(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = Path(os.fsdecode(os.fsencode(tmp_path) + b"/r\xf6ntgen"))
    site.mkdir()
    grey_image(site / "a.png", 20)
    monkeypatch.chdir(site)
    result = CliRunner().invoke(app, ["run", "a.png", "--models", str(tiny_models), "--out", "r.csv",
                                 "--heatmaps", "maps", "--html", "review.html"])  # fmt: skip
    assert result.exit_code == 0
    srcs = _srcs(site / "review.html")
    assert srcs and all(_browser_opens(site / "review.html", s) for s in srcs), srcs


def _row(path: str, score: float, refer: bool) -> Record:
    probs = {"COVID19": 0.0, "NORMAL": 1 - score, "PNEUMONIA": score, "TUBERCULOSIS": 0.0}
    return Record.of(path, CLASSIFIED, "g", "c", gate_score=0.9, label="NORMAL", confidence=0.9,
                     probabilities=probs, needs_review=False, referral_score=score, refer=refer)  # fmt: skip


def test_the_classified_table_puts_referred_films_first() -> None:
    # one report file's rows from before and after the site calibrated (thresholds 0.5, then 0.43)
    rows = [_row("morning.png", 0.489, False), _row("evening.png", 0.442, True)]
    page = render_html(rows, ["COVID19", "NORMAL", "PNEUMONIA", "TUBERCULOSIS"], "NORMAL", {}, Summary.of(rows),
                       "2026-12-07", Path("review.html"))  # fmt: skip
    table = page[page.index("<table class='sortable'>") :]
    refer = [re.findall(r"<td[^>]*>(.*?)</td>", tr)[4] for tr in re.findall(r"<tr class='[^']*'>(.*?)</tr>", table)]
    assert refer == ["refer", "clear"]


def _sorted_by_the_page(names: list[str]) -> list[str]:
    """The order the page's sort script gives a column of `names` after one click, run under node."""
    shim = (
        f"var values = {json.dumps(names)};"
        "function Row(v){ this.cells=[{dataset:{v:v}}]; }"
        "var body = {rows: values.map(function(v){return new Row(v);}), appendChild: function(r){"
        "  this.rows.splice(this.rows.indexOf(r),1); this.rows.push(r);}};"
        "var handlers = {}; var th = {dataset:{}, closest:function(){return {tBodies:[body]};},"
        "  setAttribute:function(){}, parentNode:{querySelectorAll:function(){return [];}},"
        "  addEventListener:function(e,f){handlers[e]=f;}};"
        "var document = {querySelectorAll:function(){return [th];}, addEventListener:function(){}};"
        f"{_SORT_JS} handlers.click();"
        "console.log(JSON.stringify(body.rows.map(function(r){return r.cells[0].dataset.v;})));"
    )
    out = subprocess.run(["node", "-e", shim], capture_output=True, text=True, check=True)
    return list(json.loads(out.stdout))


@pytest.mark.skipif(shutil.which("node") is None, reason="runs the page's sort script under node, not installed here")
def test_sorting_the_file_column_sorts_uid_named_films_and_numbered_files() -> None:
    # parseFloat read every UID-named DICOM (1.2.840...) as 1.2: all equal, never sorted; numbered
    # files (`cxrbatch run .` writes bare names) sort by their numbers
    uids = ["1.2.840.113619.2.55.30", "1.2.840.113619.2.55.10", "1.2.840.113619.2.55.20"]
    assert _sorted_by_the_page(uids) == sorted(uids)
    assert _sorted_by_the_page(["10.png", "2.png", "100.png", "9.png"]) == ["2.png", "9.png", "10.png", "100.png"]


def _srcs(page: Path) -> set[str]:
    return set(re.findall(r"<img src='([^']+)'", page.read_text(encoding="utf-8")))


def _browser_opens(page: Path, src: str) -> bool:
    """What a browser does with <img src> on the page opened as file://PAGE: a URL join, then the file."""
    url = urljoin(Path(os.path.abspath(page)).as_uri(), src)
    return os.path.exists(unquote_to_bytes(urlparse(url).path))


def _run_a(tiny_models: Path, *args: str) -> None:
    result = CliRunner().invoke(app, ["run", "a.png", "--models", str(tiny_models), "--out", "r.csv", *args])
    assert result.exit_code == 0, result.output


def test_heatmaps_in_a_symlinked_folder_beside_the_page_are_linked_beside_it(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # www/review.html, www/maps -> bigdisk/maps: served over HTTP (or copied) as one folder, a link
    # that climbs out of www reaches nothing
    grey_image(tmp_path / "a.png", 20)
    (tmp_path / "bigdisk" / "maps").mkdir(parents=True)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "maps").symlink_to(tmp_path / "bigdisk" / "maps")
    monkeypatch.chdir(tmp_path)
    _run_a(tiny_models, "--heatmaps", "www/maps", "--html", "www/review.html")
    srcs = _srcs(tmp_path / "www" / "review.html")
    assert srcs and all(s.startswith("maps/") for s in srcs), srcs


def test_a_page_in_a_symlinked_folder_links_heatmaps_the_browser_finds(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # site/reports -> data/2026/12/reports (a link to a deeper folder); heatmaps in site/maps.
    # The reader opens site/reports/review.html, as the command named it.
    grey_image(tmp_path / "a.png", 20)
    (tmp_path / "data" / "2026" / "12" / "reports").mkdir(parents=True)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "reports").symlink_to(tmp_path / "data" / "2026" / "12" / "reports")
    monkeypatch.chdir(tmp_path)
    _run_a(tiny_models, "--heatmaps", "site/maps", "--html", "site/reports/review.html")
    page = tmp_path / "site" / "reports" / "review.html"
    srcs = _srcs(page)
    assert srcs and all(_browser_opens(page, s) for s in srcs), srcs


def test_a_latest_link_beside_the_page_in_a_linked_site_folder_links_maps_beside_it(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # site -> data/site; site/latest.html -> review.html; maps in site/maps. The page is written
    # where it really lies (data/site/review.html): its links climbed out through ../../site
    grey_image(tmp_path / "a.png", 20)
    (tmp_path / "data" / "site").mkdir(parents=True)
    (tmp_path / "site").symlink_to(tmp_path / "data" / "site")
    (tmp_path / "data" / "site" / "latest.html").symlink_to("review.html")
    monkeypatch.chdir(tmp_path)
    _run_a(tiny_models, "--heatmaps", "site/maps", "--html", "site/latest.html")
    srcs = _srcs(tmp_path / "data" / "site" / "review.html")
    assert srcs and all(s.startswith("maps/") for s in srcs), srcs
    assert all(_browser_opens(tmp_path / "site" / "latest.html", s) for s in srcs)


def test_a_page_named_through_a_linked_folder_links_maps_beside_it(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # home/site -> data/site; run from there, the page named by its linked absolute path
    (tmp_path / "data" / "site").mkdir(parents=True)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "site").symlink_to(tmp_path / "data" / "site")
    monkeypatch.chdir(tmp_path / "home" / "site")
    grey_image(Path("a.png"), 20)
    _run_a(tiny_models, "--heatmaps", "maps", "--html", str(tmp_path / "home" / "site" / "review.html"))
    srcs = _srcs(tmp_path / "data" / "site" / "review.html")
    assert srcs and all(s.startswith("maps/") for s in srcs), srcs


@pytest.mark.parametrize("maps", [b"maps\\x41", b"caf\xe9/maps\\x41"])
def test_a_heatmaps_folder_whose_name_holds_a_literal_backslash_x_is_linked(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, maps: bytes
) -> None:
    # a literal backslash is no escape: the reports escape only bytes 0x80 and up, and the link
    # had taken "\x41" for one ("A"), beside a non-UTF-8 name too
    grey_image(tmp_path / "a.png", 20)
    monkeypatch.chdir(tmp_path)
    os.makedirs(os.path.dirname(maps) or b".", exist_ok=True)
    _run_a(tiny_models, "--heatmaps", os.fsdecode(maps), "--html", "review.html")
    srcs = _srcs(tmp_path / "review.html")
    assert srcs and all(_browser_opens(tmp_path / "review.html", s) for s in srcs), srcs


LABELS = ["COVID19", "NORMAL", "PNEUMONIA", "TUBERCULOSIS"]
CLASSIFIER = {"classifier": {"name": "c", "version": "1", "referral_threshold": 0.26, "sha256": "0" * 64}}


@pytest.fixture(scope="module")
def films_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A page of three referred films: a heatmap as a JPEG's reduced decode gives it (320 px wide),
    a tall one, and the rest of a night's table: long paths, as a PACS export names its files."""
    root = tmp_path_factory.mktemp("films")
    (root / "maps").mkdir()
    rows = []
    for i, size in enumerate([(320, 272), (96, 560), (320, 272)]):
        heatmap = root / "maps" / f"{i:016x}.png"
        Image.fromarray(np.tile(np.linspace(30, 220, size[0]).astype(np.uint8), (size[1], 1))).save(heatmap)
        rows.append(replace(_row(f"/srv/pacs/export/2026/12/07/night/film-{i}.png", 0.9 - i / 10, True),
                            heatmap=str(heatmap)))  # fmt: skip
    rows += [_row(f"/srv/pacs/export/2026/12/07/night/1.2.840.113619.2.55.3.6046881.{i}.png", 0.1, False)
             for i in range(30)]  # fmt: skip
    html = root / "review.html"
    html.write_text(render_html(rows, LABELS, "NORMAL", CLASSIFIER, Summary.of(rows), "2026-12-07", html), "utf-8")
    return html


def _probe(page: Path, script: str, tmp_path: Path) -> str:
    """What `script`, run in headless chromium after the page's own (1400 x 900 window, its images
    loaded), writes into the page's title."""
    probe = page.with_name(f"probe-{tmp_path.name}.html")  # beside the page: its links resolve
    probe.write_text(page.read_text("utf-8").replace("</body>", f"<script>{script}</script></body>"), "utf-8")
    dom = subprocess.run(
        [CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,900",
         "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    return re.search(r"<title>(.*?)</title>", dom, re.S)[1]  # type: ignore[index]


needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")


@needs_chromium
def test_escape_closes_the_larger_view(films_page: Path, tmp_path: Path) -> None:
    # a click on the dark overlay closed it; Escape, the key every viewer closes with, did nothing
    script = (
        "location.hash = '#read-0'; var opened = document.querySelector('.zoom:target') !== null;"
        "document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape', bubbles: true}));"
        "document.title = opened + ' ' + (document.querySelector('.zoom:target') !== null);"
    )
    assert _probe(films_page, script, tmp_path) == "true false"


@needs_chromium
def test_opening_and_closing_larger_views_leaves_no_history_for_back_to_replay(
    films_page: Path, tmp_path: Path
) -> None:
    # each open and close was a history entry: Back reopened the views one by one instead of leaving
    script = (
        "var before = history.length, thumb = document.querySelector('a[href=\"#read-0\"]');"
        "thumb.click(); var opened = document.querySelector('.zoom:target') !== null;"
        "document.querySelector('.zoom:target').click(); thumb.click();"
        "document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape', bubbles: true}));"
        "document.title = [opened, document.querySelector('.zoom:target') !== null, history.length - before].join(' ');"
    )
    assert _probe(films_page, script, tmp_path) == "true false 0"


@needs_chromium
def test_the_larger_view_fills_the_screen_and_a_tall_film_keeps_its_card_short(
    films_page: Path, tmp_path: Path
) -> None:
    # a 320 px heatmap (a JPEG's reduced decode) opened 320 px wide on a 1400 x 900 screen, hardly
    # larger than its 260 px thumbnail; a tall film's thumbnail stretched its row of cards to 1500 px
    script = (
        "location.hash = '#read-0'; var z = document.querySelector('.zoom:target img');"
        "var tall = document.querySelector('a[href=\"#read-1\"] img');"
        "function sizes() { document.title = [z.clientWidth, z.clientHeight, tall.clientHeight].join(' '); }"
        "z.complete ? sizes() : z.addEventListener('load', sizes);"
    )
    width, height, tall = map(int, _probe(films_page, script, tmp_path).split())
    assert width >= 0.9 * 1400 or height >= 0.9 * 900, (width, height)
    assert tall <= 400


@needs_chromium
def test_the_table_sorts_from_the_keyboard_and_says_which_way(films_page: Path, tmp_path: Path) -> None:
    # the column headings took clicks only: no Tab reached them, and nothing said how a column was sorted
    script = (
        "var th = document.querySelectorAll('table.sortable th')[3]; th.focus();"
        "var focused = document.activeElement === th;"
        "th.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', bubbles: true}));"
        "var first = document.querySelector('table.sortable tbody tr').cells[3].textContent;"
        "document.title = [focused, th.getAttribute('aria-sort'), first].join(' ');"
    )
    assert _probe(films_page, script, tmp_path) == "true ascending 0.100"


@needs_chromium
def test_the_printed_table_keeps_its_rows_short(films_page: Path, tmp_path: Path) -> None:
    # printed, the file column shrank to four characters: each path ran down 15 lines, 33 rows on 26 pages
    pdf = tmp_path / "review.pdf"
    subprocess.run(
        [CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--no-pdf-header-footer",
         f"--print-to-pdf={pdf}", films_page.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    pages = len(re.findall(rb"/Type\s*/Page\b", pdf.read_bytes()))
    assert 1 <= pages <= 6, pages


def test_a_night_of_rejected_and_unreadable_files_names_the_referral_sections() -> None:
    # no film classified: the headings fell back to a classifier without a referral threshold
    # ("Flagged: not NORMAL") while the models table said "refer at >= 0.260000"
    rows = [Record.of("/in/photo.jpg", REJECTED, "g", "c", gate_score=0.01)]
    page = render_html(rows, LABELS, "NORMAL", CLASSIFIER, Summary.of(rows), "2026-12-07", Path("review.html"))
    assert "Referred to a reader (0)" in page and "Cleared, but unsure (0)" in page and "Flagged" not in page


def test_a_name_that_hides_or_reorders_its_characters_is_shown_as_it_is() -> None:
    # A right-to-left override (U+202E) made `x\u202egpj.exe` read `xexe.jpg` on the page, and its
    # pop (U+202C) made `patient-\u202e4321\u202c.jpg` read as another film's `patient-1234.jpg`; a
    # zero-width space made two names look alike. The reports keep the name; the page spells them.
    names = ["/in/patient-\u202e4321\u202c.jpg", "/in/patient-12\u200b34.jpg", "/in/x\u202egpj.exe.jpg"]
    rows = [_row(names[0], 0.9, True), _row(names[1], 0.1, False)]
    rows.append(Record.of(names[2], "error", "g", "c", error="corrupt or truncated image: chunk 'a\u2067b'"))
    page = render_html(rows, LABELS, "NORMAL", CLASSIFIER, Summary.of(rows), "2026-12-07", Path("review.html"))
    assert not any(c in page for c in "\u202e\u202c\u200b\u2067")
    assert "/in/patient-\\u202e4321\\u202c.jpg" in page and "/in/patient-12\\u200b34.jpg" in page
    assert "/in/x\\u202egpj.exe.jpg" in page and "chunk &#x27;a\\u2067b&#x27;" in page
    assert "data-v='/in/patient-\\u202e4321\\u202c.jpg'" in page  # the table sorts what it shows


def test_a_heatmaps_alt_text_spells_a_name_that_reorders_its_characters(tmp_path: Path) -> None:
    # the page spelled a right-to-left override in the card's name, but its pictures' alt text (what
    # a screen reader says, and what the page shows where the heatmap is gone) kept it: `x\u202egpj.exe`
    # read `xexe.jpg` there
    row = replace(_row("/in/x\u202egpj.exe", 0.9, True), heatmap=str(tmp_path / "map.png"))
    page = render_html([row], LABELS, "NORMAL", CLASSIFIER, Summary.of([row]), "2026-12-07", tmp_path / "review.html")
    assert "\u202e" not in page and "/in/x\\u202egpj.exe: strongest regions marked'" in page
