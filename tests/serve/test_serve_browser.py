"""The search page in a real browser: headless Debian chromium driven by Selenium against a real
uvicorn server. Skipped (with the reason) where chromium or chromedriver is not installed; under
``CI=true`` that fails instead (``.ci/run`` installs them)."""
from __future__ import annotations

import os
import shutil

import pytest

from tests.conftest import require, require_module

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1200,900"]


@pytest.fixture()
def browser(tmp_path, monkeypatch):
    require(os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK),
            f"needs chromium and chromedriver ({CHROMIUM}, {CHROMEDRIVER}): apt-get install chromium chromium-driver")
    webdriver = require_module("selenium.webdriver", "the dev extra")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_AVOID_STATS", "true")  # selenium's telemetry: no network
    options = Options()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()  # ends chromium and chromedriver


def test_upload_in_the_page_shows_result_cards(browser, live_server, image_folder, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(live_server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "images" in d.find_element(By.ID, "index-info").text)
    assert "20 images" in browser.find_element(By.ID, "index-info").text

    Select(browser.find_element(By.ID, "topk")).select_by_visible_text("5")
    query = sorted(image_folder.glob("class_02/*.jpg"))[1]
    browser.find_element(By.ID, "file").send_keys(str(query))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result-card")) == 5)
    cards = browser.find_elements(By.CSS_SELECTOR, ".result-card")
    first = cards[0].text
    assert "#1 class_02" in first and "similarity 1.0000" in first and query.name in first
    assert all("similarity" in c.text for c in cards)
    # the gallery pictures come from /images/{id} and actually load
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('.result-card img')].every(i => i.complete && i.naturalWidth > 0)"))
    assert "5 results" in browser.find_element(By.ID, "status").text

    # a file that is not an image: the page shows the server's message, the old results are cleared
    fake = tmp_path / "notes.jpg"
    fake.write_text("not an image")
    browser.find_element(By.ID, "file").send_keys(str(fake))
    wait.until(lambda d: "error" in d.find_element(By.ID, "status").get_attribute("class"))
    assert "415" in browser.find_element(By.ID, "status").text
    assert browser.find_elements(By.CSS_SELECTOR, ".result-card") == []


def _non_loopback_address():
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 9))  # no packet is sent: this only picks the outgoing interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


@pytest.fixture()
def keyed_server(predictor_and_index, serve):
    """A server with an API key on this machine's non-loopback address, so the browser is a remote client."""
    from deepmetric.serve import create_app

    address = _non_loopback_address()
    if address is None:
        pytest.skip("needs a non-loopback IPv4 address to be a client beyond loopback")
    with serve(create_app(*predictor_and_index, api_key="s3cret"), address) as url:
        yield url


def test_page_asks_for_the_api_key_beyond_loopback(browser, keyed_server, image_folder):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(keyed_server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "key-form").is_displayed())
    assert "needs an API key" in browser.find_element(By.ID, "index-info").text
    browser.find_element(By.ID, "key").send_keys("s3cret")
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait.until(lambda d: "images" in d.find_element(By.ID, "index-info").text)
    browser.find_element(By.ID, "file").send_keys(str(sorted(image_folder.glob("class_02/*.jpg"))[1]))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result-card")) == 10)
    assert "#1 class_02" in browser.find_elements(By.CSS_SELECTOR, ".result-card")[0].text
    # the gallery pictures are fetched with the key too, and load
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('.result-card img')].every(i => i.complete && i.naturalWidth > 0)"))
