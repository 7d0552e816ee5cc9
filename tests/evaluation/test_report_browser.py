"""report.html in a real browser (Debian's chromium, headless, through chromedriver): it renders,
every plot and thumbnail loads, and every number on the page is the one in report.json."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from evaluation.report_page import lookup

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        message = "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("TERRAHASH_REQUIRE_BROWSER"):  # set by .ci/run: there, a missing browser is a failure
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def shown_equals(text: str, value) -> bool:
    """Whether a cell's text shows ``value`` (report_page.number: floats rounded to the digits shown)."""
    text = text.strip()
    if value is None:
        return text == "-"
    if isinstance(value, bool):
        return text == ("yes" if value else "no")
    if isinstance(value, (int, float)):
        digits = len(text.split(".")[1]) if "." in text else 0
        return abs(float(text.replace(",", "")) - value) <= 0.5 * 10 ** -digits + 1e-12
    return text == str(value)


def test_report_page_renders_with_its_plots_and_the_json_numbers(browser, written_report):
    out, _ = written_report
    report = json.loads((out / "report.json").read_text())
    browser.get((out / "report.html").resolve().as_uri())
    assert browser.title == "TerraHash evaluation report"
    shot = out / "screenshot.png"
    height = browser.execute_script("return document.documentElement.scrollHeight;")
    browser.set_window_size(1400, min(height + 100, 30_000))  # the whole page in one screenshot
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000

    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);")
    assert len(images) >= 5 + 2 * 5  # the plots, and each example's thumbnails
    assert [alt for alt, complete, width in images if not (complete and width > 0)] == []

    cells = browser.execute_script(
        "return Array.from(document.querySelectorAll('[data-key]')).map(c => [c.dataset.key, c.textContent]);")
    assert len(cells) > 100
    wrong = [(key, text, lookup(report, key)) for key, text in cells if not shown_equals(text, lookup(report, key))]
    assert wrong == []
    for section in ("code-length", "baselines", "pareto", "fairness", "robustness", "drift", "examples", "peers"):
        assert browser.find_element("id", section).is_displayed()


def test_shown_equals_catches_a_wrong_number():
    assert shown_equals("0.8123", 0.81234) and not shown_equals("0.8123", 0.8133)
    assert shown_equals("1,234", 1234) and not shown_equals("1,234", 1235)
    assert shown_equals("-", None) and shown_equals("yes", True) and not shown_equals("no", True)
