"""The web console in a real browser: Debian's headless Chromium driven by Selenium, against a real
dmf-run --web playing a video of dmf-demo's symbols. Open the page (from the printed link), see the live
image change, enrol a class from an uploaded file, see it in the gallery, see it recognised, rename it,
delete it.

Skipped, saying why, where Chromium or its driver is not installed (.ci/run installs both with apt-get).

DMF_WEB_SCREENSHOT=docs/web_console.png also enrols the other symbols and writes the console's
screenshot there (how docs/web_console.png was made).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the web console needs the [web] extra")
selenium = pytest.importorskip("selenium", reason="the browser test needs selenium (the dev extra)")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from web_client import SYMBOLS, demo_clip, start_console, symbol_png  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TOKEN = "browser-token-0123456789"
WAIT_S = 20


@pytest.fixture()
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1360,1000"):
        options.add_argument(flag)
    # Given the driver's path, Selenium does not try to download one (offline CI).
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


def card(driver, name: str):
    found = driver.find_elements(By.CSS_SELECTOR, "#gallery .class-card")
    return next((c for c in found if c.get_attribute("data-name") == name), None)


def wait(driver, condition, what: str):
    def check(d):
        try:
            return condition(d)
        except StaleElementReferenceException:  # the gallery was redrawn under us: look again
            return False

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(check, message=what)


def upload(driver, name: str, files: list[Path]) -> None:
    field = driver.find_element(By.ID, "enrol-name")
    field.clear()
    field.send_keys(name)
    driver.find_element(By.ID, "upload-input").send_keys("\n".join(str(f) for f in files))
    driver.find_element(By.ID, "upload-button").click()
    wait(driver, lambda d: card(d, name) is not None, f"{name} in the gallery")


def test_the_console_in_a_real_browser(browser, tmp_path):
    clip = demo_clip(tmp_path)
    console = start_console(
        ["--source", clip, "--loop", "--bundle", "demo", "--gallery", tmp_path / "g.dmfg"], TOKEN
    )
    try:
        # The printed link logs in (the cookie) and leaves the token out of the address bar.
        browser.get(f"http://127.0.0.1:{console.port}/?token={TOKEN}")
        assert browser.current_url == f"http://127.0.0.1:{console.port}/"

        # The live image changes: two pictures of the <img> half a second apart differ.
        live = browser.find_element(By.ID, "live")
        wait(browser, lambda d: live.get_property("naturalWidth") == 480, "the live view")  # square
        first = live.screenshot_as_png
        time.sleep(0.5)
        assert live.screenshot_as_png != first

        # Enrol R from an uploaded file; it shows in the gallery with its thumbnail and shot count.
        shot = tmp_path / "R.png"
        shot.write_bytes(symbol_png("R", 1))
        upload(browser, "R", [shot])
        r_card = card(browser, "R")
        assert "1 shot" in r_card.text
        thumb = r_card.find_element(By.TAG_NAME, "img")
        wait(browser, lambda d: thumb.get_property("naturalWidth") > 0, "R's thumbnail")

        # The clip's Rs are recognised: the event stream updates the label, and the event list says so.
        wait(browser, lambda d: d.find_element(By.ID, "label").text == "R", "R recognised")
        events = browser.find_element(By.ID, "events")
        wait(browser, lambda d: "enrolled" in events.text and "recognition" in events.text, "the events")

        screenshot = os.environ.get("DMF_WEB_SCREENSHOT")
        if screenshot:
            take_screenshot(browser, tmp_path, Path(screenshot))

        # Rename R (in place: Rename, type, Enter).
        card(browser, "R").find_element(By.CLASS_NAME, "rename-button").click()
        field = card(browser, "R").find_element(By.CLASS_NAME, "rename-input")
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys("Rho", Keys.ENTER)
        wait(browser, lambda d: card(d, "Rho") is not None and card(d, "R") is None, "R renamed to Rho")

        # Delete it: it leaves the gallery, and Undo is offered until the gallery is saved.
        card(browser, "Rho").find_element(By.CLASS_NAME, "delete-button").click()
        wait(browser, lambda d: card(d, "Rho") is None, "Rho deleted")
        wait(browser, lambda d: d.find_element(By.ID, "undo").is_displayed(), "the undo button")
        assert [c["name"] for c in console.classes()] == (list(SYMBOLS[1:]) if screenshot else [])
    finally:
        assert console.stop() == 0


def take_screenshot(browser, tmp_path: Path, target: Path) -> None:
    """The other symbols enrolled too (three shots each), a symbol recognised live, then the picture."""
    for symbol in SYMBOLS[1:]:
        files = []
        for seed in (1, 2, 3):
            files.append(tmp_path / f"{symbol}{seed}.png")
            files[-1].write_bytes(symbol_png(symbol, seed))
        upload(browser, symbol, files)
    wait(browser, lambda d: d.find_element(By.ID, "label").text in SYMBOLS, "a symbol recognised")
    browser.set_window_size(1360, 1400)  # the gallery too
    wait(browser, lambda d: not d.find_element(By.ID, "toast").is_displayed(), "the last message gone")
    time.sleep(0.5)  # thumbnails and the status strip settle
    target.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(target))
