"""kiln ui in a real browser (Debian's headless Chromium driven by Selenium): a prompt typed into the
page draws the image Triton draws for it, captioned with its seed, and a refused request shows the
server's words in the page."""

import io
import shutil
import urllib.request

import numpy as np
import pytest
from PIL import Image

from kiln.clients.client import KilnClient
from kiln.serving import server

pytest.importorskip("gradio", reason="the ui extra (pip install 'kiln[ui]') is not installed")
pytest.importorskip("selenium", reason="selenium (the test extra) is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no chromium and chromedriver on PATH: make setup installs "
                       "Debian's chromium and chromium-driver when it can run apt-get as root"),
]


@pytest.fixture(scope="module")
def page(triton):
    from kiln.serving.ui import create_page

    info = triton("epsilon")
    key_file = server.admin_key_file(info.ports)
    blocks = create_page(info.http_url, key_file.read_text() if key_file.is_file() else None)
    port = server.free_port()
    blocks.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", info
    blocks.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _fill(browser, selector: str, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = browser.find_element(By.CSS_SELECTOR, selector)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(text)


def test_the_page_draws_the_served_image(page, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    url, info = page
    browser.get(url)
    wait = WebDriverWait(browser, 120)
    wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#prompt textarea")))
    _fill(browser, "#prompt textarea", "a red digit 3")
    _fill(browser, "#seed input", "41")
    _fill(browser, "#steps input", "3")
    _fill(browser, "#count input", "2")
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#gallery img")) >= 2)
    browser.save_screenshot(str(tmp_path / "page.png"))
    sources = [img.get_attribute("src") for img in browser.find_elements(By.CSS_SELECTOR, "#gallery img")][:2]
    shown = np.stack([np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(src, timeout=30).read())).convert("RGB"))
                      for src in sources])
    with KilnClient(info.http_url) as client:
        expected = client.generate("a red digit 3", seed=41, steps=3, num_images=2)
    assert np.array_equal(shown, expected.images)
    captions = browser.find_element(By.CSS_SELECTOR, "#gallery").text
    assert "seed 41" in captions and "seed 42" in captions

    # the server's refusal, in its words, in the page
    _fill(browser, "#prompt textarea", "a [cat:dog:0.5]")
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    wait.until(lambda b: "prompt editing" in b.find_element(By.TAG_NAME, "body").text)
