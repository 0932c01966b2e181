"""The web page in a real browser: Debian's chromium, driven headless by Playwright, against the live service.

Skips with the reason when chromium or Playwright is missing (.ci/run installs chromium with apt-get).
Set CHESTCT_SCREENSHOT_DIR to keep screenshots of the page with a result (the documentation's pictures:
`python scripts/docs_figures.py screenshots`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.serving_support import phantom_images, png_bytes

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without these flags chromium keeps trying to reach Google's hosts, which a closed network refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium installed (Debian: apt-get install chromium); .ci/run installs it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, live_server):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.goto(live_server)
    page.wait_for_selector("#status[data-model=ready]")
    yield page
    context.close()


def test_upload_a_scan_and_see_the_diagnosis_and_the_overlay(page, tmp_path):
    scan = tmp_path / "phantom.png"
    scan.write_bytes(png_bytes(phantom_images(count=2)[1][1]))
    page.locator("#file-input").set_input_files(str(scan))
    page.wait_for_selector("body[data-state=done]", timeout=60_000)

    assert page.locator("#result").is_visible()
    assert page.locator("#diagnosis").inner_text() in ("Normal", "Cancer")
    assert "threshold" in page.locator("#probability").inner_text()
    # The probability shown is the calibrated one, and the page says how it was obtained.
    assert page.locator("#calibration").inner_text() == "Calibrated (platt, fitted on 40 validation scores)."
    assert page.locator("#domain-warning").is_hidden()  # a chest slice: no warning
    image = page.locator("#result-image")
    model_input = image.get_attribute("src")
    assert model_input.startswith("data:image/png;base64,")

    assert page.locator("#lesion-toggle").is_hidden()  # this model has no lesion map: no button for one
    toggle = page.locator("#gradcam-toggle")
    assert toggle.is_enabled()
    toggle.click()
    assert toggle.get_attribute("aria-pressed") == "true"
    overlay = image.get_attribute("src")
    assert overlay.startswith("data:image/png;base64,") and overlay != model_input
    assert page.evaluate("document.getElementById('result-image').naturalWidth") == 64

    if os.environ.get("CHESTCT_SCREENSHOT_DIR"):
        target = Path(os.environ["CHESTCT_SCREENSHOT_DIR"]) / "serve-page.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(target), full_page=True)


def test_a_text_file_shows_the_servers_error(page, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    page.locator("#file-input").set_input_files(str(notes))
    page.wait_for_selector("body[data-state=error]", timeout=30_000)
    error = page.locator("#error")
    assert error.is_visible()
    assert "notes.txt: not a recognised image" in error.inner_text()
    assert not page.locator("#result").is_visible()


def test_a_page_of_text_gets_its_answer_under_a_warning(page, tmp_path):
    from tests.test_domain import _document

    scanned = tmp_path / "letter.png"
    scanned.write_bytes(png_bytes(_document(np.random.default_rng(0))))
    page.locator("#file-input").set_input_files(str(scanned))
    page.wait_for_selector("body[data-state=done]", timeout=60_000)
    warning = page.locator("#domain-warning")
    assert warning.is_visible() and "Not what this model was made for: no lung fields found" in warning.inner_text()
    assert page.locator("#diagnosis").inner_text() in ("Normal", "Cancer")


def test_the_drop_zone_is_reachable_by_keyboard(page):
    page.keyboard.press("Tab")
    focused = page.evaluate("document.activeElement.id")
    assert focused == "drop-zone"


def test_upload_a_zipped_series_and_see_one_card_per_series(page, tmp_path):
    import zipfile

    from tests.series_factory import SeriesSpec, write_annotated_series

    written = write_annotated_series(tmp_path / "series", SeriesSpec(slices=5, tumour_slices=(2,)))
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in sorted(written.root.rglob("*")):
            if path.is_file():
                bundle.write(path, path.relative_to(written.root).as_posix())
    page.locator("#series-input").set_input_files(str(archive))
    page.wait_for_selector("body[data-state=done]", timeout=60_000)

    assert page.locator("#series-result").is_visible() and not page.locator("#result").is_visible()
    cards = page.locator(".series-card")
    assert cards.count() == 2
    assert sorted(cards.nth(index).locator("h3").inner_text() for index in range(2)) == [
        "PHANTOM-1_s2_SHARP", "PHANTOM-1_s3_SMOOTH"]
    first = cards.nth(0)
    assert first.locator(".diagnosis").inner_text() in ("Normal", "Cancer")
    assert "highest slice probability" in first.inner_text() and "Series score" in first.inner_text()
    assert page.evaluate("document.querySelector('.series-card .z-profile img').naturalWidth") > 300

    if os.environ.get("CHESTCT_SCREENSHOT_DIR"):
        target = Path(os.environ["CHESTCT_SCREENSHOT_DIR"]) / "serve-page-series.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(target), full_page=True)


def test_a_lesion_map_model_shows_its_map_on_the_page(browser, tiny_lesion_export, tmp_path):
    from tests.serving_support import running_server

    scan = tmp_path / "phantom.png"
    scan.write_bytes(png_bytes(phantom_images(count=2)[1][1]))
    with running_server(tiny_lesion_export) as url:
        context = browser.new_context(viewport={"width": 1200, "height": 900})
        page = context.new_page()
        page.goto(url)
        page.wait_for_selector("#status[data-model=ready]")
        page.locator("#file-input").set_input_files(str(scan))
        page.wait_for_selector("body[data-state=done]", timeout=60_000)
        image, lesion, gradcam = (page.locator(f"#{name}") for name in ("result-image", "lesion-toggle",
                                                                         "gradcam-toggle"))
        model_input = image.get_attribute("src")
        assert lesion.is_visible()
        lesion.click()
        assert lesion.get_attribute("aria-pressed") == "true" and gradcam.get_attribute("aria-pressed") == "false"
        assert image.get_attribute("src") != model_input
        assert "lesion map" in page.locator("#result-caption").inner_text()
        gradcam.click()  # one view at a time
        assert gradcam.get_attribute("aria-pressed") == "true" and lesion.get_attribute("aria-pressed") == "false"
        lesion.click()
        lesion.click()  # pressed again: back to the model's input
        assert image.get_attribute("src") == model_input
        context.close()
