"""`nextdetail view` in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`,
which .ci/run installs) driven by Selenium, against the viewer served by uvicorn on 127.0.0.1.

Each step asserts what is visible, that every picture on the page loaded, and that the browser's
console has no SEVERE entry (a failed request, a 404 picture, a blocked resource are all logged
there); a screenshot of each step is saved under the test's temp dir. Skips, saying why, where no
browser is installed."""
from __future__ import annotations

import shutil
import threading

import pytest

from view_data import chain as make_chain

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="no headless browser: install Debian's `chromium` and `chromium-driver` "
                                       "(.ci/run does, as root)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The viewer over the chain's folders, served by uvicorn in a thread; yields its base URL."""
    import uvicorn

    from nextdetail.view.app import create_app
    from nextdetail.view.serve import bind, url_of
    from nextdetail.view.sources import open_sources

    chain = make_chain(tmp_path_factory)
    sources = open_sources([chain.store, chain.tokens, chain.tokenizer, chain.samples])
    sock = bind("127.0.0.1", 0)
    app = create_app(sources, allowed_hosts=["127.0.0.1"], per_page=4)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    yield url_of(sock, "127.0.0.1").rstrip("/")
    srv.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000"):
        opts.add_argument(arg)
    opts.binary_location = CHROMIUM
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The installed driver, named: Selenium Manager never looks for (or downloads) one.
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def settled(driver, shots, name: str) -> None:
    """Wait for every picture, assert each loaded and the console holds no SEVERE entry, screenshot."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        "return Array.from(document.images).every(i => i.complete)"))
    broken = driver.execute_script(
        "return Array.from(document.images).filter(i => i.naturalWidth === 0).map(i => i.src)")
    assert not broken, f"{name}: pictures that did not load: {broken}"
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, f"{name}: console errors: {severe}"
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1280, min(max(height + 160, 600), 3000))   # + the window's own bars
    driver.save_screenshot(str(shots / f"{name}.png"))


def test_store_grid_paging_and_an_image_with_its_layers(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(f"{server}/s/0")
    tiles = browser.find_elements(By.CSS_SELECTOR, "a.tile")
    assert len(tiles) == 4 and "page 1 of 2" in browser.find_element(By.CSS_SELECTOR, ".pager").text
    settled(browser, tmp_path, "1-store-grid")
    browser.find_element(By.CSS_SELECTOR, "a[rel=next]").click()
    assert "page 2 of 2" in browser.find_element(By.CSS_SELECTOR, ".pager").text
    assert "not an image" in browser.find_element(By.CSS_SELECTOR, "a.tile.error").text
    settled(browser, tmp_path, "2-store-grid-page-2")
    browser.find_element(By.CSS_SELECTOR, "a.tile.ok").click()
    heads = [h.text for h in browser.find_elements(By.TAG_NAME, "h2")]
    assert heads[:2] == ["Bases", "Details"] and "Manifest row" in heads
    captions = [f.text for f in browser.find_elements(By.TAG_NAME, "figcaption")]
    assert captions[0] == "input I" and any(c.startswith("D_1 ±") for c in captions)
    assert len(browser.find_elements(By.CSS_SELECTOR, ".layers img")) == 7
    settled(browser, tmp_path, "3-store-image")


def test_token_usage_and_run_curves(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(f"{server}/s/1")
    maps = browser.find_elements(By.CSS_SELECTOR, ".usage .map")
    assert maps and all(m.find_element(By.CSS_SELECTOR, "svg.hist").is_displayed() for m in maps)
    assert "codes used" in maps[0].text
    settled(browser, tmp_path, "4-token-usage")
    browser.find_element(By.LINK_TEXT, "1").click()                     # row 1: its maps drawn
    assert browser.find_elements(By.CSS_SELECTOR, ".maps img")
    settled(browser, tmp_path, "5-token-row")
    browser.get(f"{server}/s/2")
    curves = browser.find_elements(By.CSS_SELECTOR, ".charts img")
    assert curves and "Curves" in browser.find_element(By.TAG_NAME, "main").text
    settled(browser, tmp_path, "6-run-curves")
    browser.get(f"{server}/s/3")
    assert "+D_1" in browser.find_element(By.CSS_SELECTOR, ".strip-parts").text
    settled(browser, tmp_path, "7-samples")
