"""The report opened in a real headless browser: no console error, every image loads, nothing
requested from outside, and a wide Table II scrolls with its model column fixed.

(The card and leaderboard pages are opened the same way in tests/test_card.py.)"""

from __future__ import annotations

from advseg.report import write_report
from browser import broken_images, browser, visit  # tests/ is on sys.path
from test_report import _records, _write_run


def test_the_report_opens_cleanly_and_its_wide_table_keeps_the_model_column(tmp_path):
    _write_run(tmp_path, _records())
    report = write_report(tmp_path)
    with browser() as launched:
        seen = visit(launched, report.html, width=900)  # narrower than Table II
        page = seen.page
        assert seen.errors == [] and seen.external == []
        assert page.evaluate("document.images.length") >= 5
        assert broken_images(page) == []
        # Table II: wider than the page, so its box scrolls instead of clipping ...
        box = page.locator("div.wide").nth(1)  # 0: provenance, 1: Table II
        assert box.locator("th").first.inner_text() == "model"
        width, visible = box.evaluate("b => [b.scrollWidth, b.clientWidth]")
        assert width > visible
        left = box.evaluate("b => b.getBoundingClientRect().left")
        first = box.locator("tbody tr td").first
        # ... and after scrolling to its right edge the model column is still in view
        box.evaluate("b => { b.scrollLeft = b.scrollWidth; }")
        assert abs(first.evaluate("c => c.getBoundingClientRect().left") - left) < 2
        last = box.locator("tbody tr").first.locator("td").last
        right = last.evaluate("c => c.getBoundingClientRect().right")
        assert right <= box.evaluate("b => b.getBoundingClientRect().right") + 1
