"""The web page at `/`, in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium):
upload an easy-vqa image, ask, watch both answers arrive and the kept-patch overlay appear."""

import shutil

import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")

from corematching.serve.process import ServerProcess  # noqa: E402
from corematching.zoo import data  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (`make test` installs them with apt-get when run as root)",
)


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--threads", "2", "--max-wait-ms", "5"]) as process:
        yield process


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_page_answers_an_uploaded_image_and_shows_kept_patches(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    question = data.by_image(data.questions("test"))[0][0]
    wait = WebDriverWait(browser, 90)
    browser.get(server.base_url + "/")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#examples img")) > 0  # images to pick from
    browser.find_element(By.ID, "file").send_keys(str(data.image_paths("test")[0]))
    wait.until(lambda d: d.find_element(By.ID, "ask").is_enabled())
    browser.find_element(By.ID, "question").send_keys(question.question)
    browser.find_element(By.ID, "ask").click()
    sparse_answer = "#corematching .answer"
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, sparse_answer).get_attribute("data-state") in ("done", "error"))
    assert browser.find_element(By.ID, "status").text == ""
    assert browser.find_element(By.CSS_SELECTOR, "#dense .answer").text == question.answer
    assert browser.find_element(By.CSS_SELECTOR, sparse_answer).text == question.answer
    dense_stats = browser.find_element(By.CSS_SELECTOR, "#dense .stats").text
    sparse_stats = browser.find_element(By.CSS_SELECTOR, "#corematching .stats").text
    assert "visual tokens 64/64" in dense_stats and "visual tokens 16/64" in sparse_stats
    assert "prefill" in dense_stats and "prefill" in sparse_stats
    overlay = browser.find_element(By.ID, "overlay")
    assert overlay.get_attribute("data-kept") == "16" and overlay.get_attribute("data-total") == "64"
    # the overlay really covers the removed patches: compare the canvas with the bare image drawn the same way
    changed = browser.execute_script("""
        const c = document.getElementById('overlay'), bare = document.createElement('canvas');
        bare.width = c.width; bare.height = c.height;
        const b = bare.getContext('2d'); b.imageSmoothingEnabled = false;
        b.drawImage(document.getElementById('preview'), 0, 0, c.width, c.height);
        const x = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const y = b.getImageData(0, 0, c.width, c.height).data;
        let changed = 0;
        for (let i = 0; i < x.length; i += 4) { if (Math.abs(x[i] - y[i]) > 30) changed++; }
        return changed / (c.width * c.height);""")
    assert 0.6 < changed < 0.9  # 48 of 64 patches darkened (75%), plus the kept patches' outlines
