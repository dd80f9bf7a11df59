"""The report page opened in a real browser (headless Debian Chromium): it renders, is not blank, and
shows both plots and every candidate."""

from __future__ import annotations

import collections
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from support.chromium import run_chromium
from support.png import read_png
from support.report_sample import sample_summary

from tailor_gateway.report import render_report_html

pytestmark = pytest.mark.browser

WIDTH, HEIGHT = 1280, 1800


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("report") / "report.html"
    path.write_text(render_report_html(sample_summary()), encoding="utf-8")
    return path


def test_screenshot_shows_a_rendered_page(page, tmp_path):
    shot = tmp_path / "report.png"
    run_chromium(page.as_uri(), f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}")
    keep = Path("/tmp/tailor-report.png")  # kept for a person to look at after a failure
    shutil.copyfile(shot, keep)

    width, height, bpp, rows = read_png(shot)
    assert (width, height) == (WIDTH, HEIGHT)
    colours: collections.Counter[bytes] = collections.Counter()
    for row in rows[::3]:
        for i in range(0, len(row), bpp * 3):
            colours[row[i : i + 3]] += 1
    background, count = colours.most_common(1)[0]
    sampled = sum(colours.values())
    assert background == b"\xff\xff\xff", f"the page background is not white: see {keep}"
    assert len(colours) > 200, f"only {len(colours)} colours: the page looks blank, see {keep}"
    assert count / sampled < 0.9, f"{count / sampled:.0%} of the page is background: see {keep}"
    # The recommendation (green), the limit lines and verdicts (red) and the Pareto points (blue) are drawn.
    assert any(g > 100 and g > r + 50 and g > b + 40 for r, g, b in colours), f"no green: see {keep}"
    assert any(r > 180 and g < 90 and b < 90 for r, g, b in colours), f"no red: see {keep}"
    assert any(b > 180 and r < 80 and g < 140 for r, g, b in colours), f"no blue: see {keep}"


class _Dom(HTMLParser):
    """Collects the ids of svg elements, their circles, and the first cell of every table row."""

    def __init__(self):
        super().__init__()
        self.svgs: dict[str, int] = {}
        self.scripts = 0
        self.rows: list[str] = []
        self._svg = ""
        self._cell = 0
        self._in_first_cell = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "svg" and attrs.get("id"):
            self._svg = attrs["id"]
            self.svgs[self._svg] = 0
        elif tag == "circle" and self._svg and "pt" in (attrs.get("class") or "").split():
            self.svgs[self._svg] += 1
        elif tag == "script":
            self.scripts += 1
        elif tag == "tr":
            self._cell = 0
        elif tag == "td":
            self._cell += 1
            self._in_first_cell = self._cell == 1
            if self._in_first_cell:
                self.rows.append("")

    def handle_endtag(self, tag):
        if tag == "svg":
            self._svg = ""
        elif tag == "td":
            self._in_first_cell = False

    def handle_data(self, data):
        if self._in_first_cell:
            self.rows[-1] += data


def test_dom_has_both_plots_and_every_candidate(page):
    dom_text = run_chromium(page.as_uri(), "--dump-dom").stdout
    dom = _Dom()
    dom.feed(dom_text)
    summary = sample_summary()
    names = [c["name"] for c in summary["candidates"]]

    assert dom.svgs.get("plot-size") == len(names)
    assert dom.svgs.get("plot-latency") == len(names)
    assert [row.split()[0] for row in dom.rows] == names
    # The method name "<script>..." stayed text: no element was injected, and it shows as written.
    assert dom.scripts == 0
    assert "rtn &lt;script&gt;alert(1)&lt;/script&gt;" in dom_text
    assert "measured on" in dom_text
    assert "Recommended" in dom_text and summary["rationale"] in dom_text
