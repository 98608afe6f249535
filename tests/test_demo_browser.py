"""The demo page in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``) driven by Selenium
loads the page from a real uvicorn server on 127.0.0.1 serving what ``python demo.py`` serves (the shipped toy model
on the CPU), starts a video, sees frames painted, switches the prompt mid-stream, downloads the mp4 and saves a
screenshot (``DEMO_SCREENSHOT=path`` keeps a copy there).

Skips with the reason when Selenium, Chromium or its driver is missing (``.ci/run`` installs them).
"""

import os
import shutil
import threading
import time

import pytest

selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
pytest.importorskip("uvicorn", reason="uvicorn is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="headless browser test needs Debian's chromium and "
                                                                  "chromium-driver (apt-get install chromium "
                                                                  "chromium-driver)")

import uvicorn  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

import demo  # noqa: E402
from app.web import session as demo_session  # noqa: E402
from app.web.server import build_app  # noqa: E402
from app.web.session import settings_for  # noqa: E402
from utils.video import read_mp4  # noqa: E402

FIRST = "a red circle moving left slowly"
SECOND = "a yellow square moving down quickly"
HOSTILE = "<img src=x onerror=window.pwned=1> a green triangle moving up slowly"
LATENT_FRAMES = 9      # 3 blocks of 3 -> 33 video frames at 8 fps, the length the toy model was trained on
LONG_FRAMES = 18       # the second video: past the trained length (sliding window), stopped early


@pytest.fixture
def server(repo_root, monkeypatch):
    """A uvicorn server on a free 127.0.0.1 port serving demo.py's default (the shipped toy model, CPU), its blocks
    made to take >= 0.4 s so that the test has time to switch the prompt."""
    monkeypatch.chdir(repo_root)   # load_pipeline moves to the repository for the toy config's relative paths
    pipe, cfg, info = demo.load_pipeline(demo.parse_args([]))
    original = demo_session.Generation._take_switch

    def slow(generation):  # the tiny model is too fast to switch in mid-stream by hand; a real one is not
        if generation.frames_done:
            time.sleep(0.4)
        return original(generation)
    monkeypatch.setattr(demo_session.Generation, "_take_switch", slow)
    app = build_app(pipe, settings_for(pipe, cfg), info=info)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", ws_per_message_deflate=False)
    srv = uvicorn.Server(config)
    sock = config.bind_socket()
    thread = threading.Thread(target=srv.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield "http://127.0.0.1:%d/" % sock.getsockname()[1]
    srv.should_exit = True
    thread.join(30)
    sock.close()


@pytest.fixture
def browser(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,800",
                "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


CANVAS_SUM = """const c = document.getElementById('canvas');
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let s = 0; for (let i = 0; i < d.length; i += 1) s = (s * 31 + d[i]) % 1000000007; return s;"""


def received(driver) -> int:
    text = driver.find_element(By.ID, "count").text
    return int(text.split("/")[0]) if "/" in text else 0


def state(driver):
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def test_page_streams_switches_and_downloads(server, browser, tmp_path):
    d = browser
    d.get(server)
    wait = WebDriverWait(d, 60, poll_frequency=0.05)
    wait.until(lambda _: state(d) == "idle")
    assert "chunk-wise" in d.find_element(By.ID, "model").text
    assert [o.text for o in d.find_elements(By.CSS_SELECTOR, "#steps option")] == ["1", "2", "4"]
    prompt, frames = d.find_element(By.ID, "prompt"), d.find_element(By.ID, "frames")
    prompt.clear()
    prompt.send_keys(FIRST)
    frames.clear()
    frames.send_keys(str(LATENT_FRAMES))
    d.find_element(By.ID, "start").click()
    wait.until(lambda _: state(d) == "generating")

    # switch mid-stream, as soon as the first block is in (later blocks take >= 0.4 s each)
    wait.until(lambda _: received(d) >= 9)
    prompt.clear()
    prompt.send_keys(SECOND)
    d.find_element(By.ID, "switch").click()

    # frames are painted as they come: the canvas keeps changing while the video plays
    sums = set()
    for _ in range(12):
        sums.add(d.execute_script(CANVAS_SUM))
        time.sleep(0.15)
    assert len(sums) >= 3, sums

    # the page marks where the switch took effect
    wait.until(lambda _: d.find_elements(By.CSS_SELECTOR, "#timeline .marker"))
    switch_line = d.find_element(By.CSS_SELECTOR, "#switches li").text
    assert switch_line.startswith("frame ") and SECOND in switch_line

    wait.until(lambda _: state(d) == "done")
    total = 1 + 4 * (LATENT_FRAMES - 1)
    assert d.find_element(By.ID, "count").text == f"{total} / {total}"
    assert float(d.find_element(By.ID, "genFps").text) > 0
    assert d.find_element(By.ID, "ttff").text.endswith(" s")
    wait.until(lambda _: d.find_element(By.ID, "playbar").get_attribute("style") == "width: 100%;")   # all played

    link = d.find_element(By.ID, "download")
    assert link.is_displayed()
    link.click()
    wait.until(lambda _: [f for f in os.listdir(d.downloads) if f.endswith(".mp4")])
    name = next(f for f in os.listdir(d.downloads) if f.endswith(".mp4"))
    assert name == FIRST + ".mp4"
    assert read_mp4(d.downloads / name).shape == (total, 64, 64, 3)

    d.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "demo.png"
    d.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("DEMO_SCREENSHOT"):
        shutil.copy(shot, os.environ["DEMO_SCREENSHOT"])

    # a second, long video: markers belong to the previous video; a hostile prompt is shown as text, never as
    # HTML; stopped early, the page offers what was made so far
    frames.clear()
    frames.send_keys(str(LONG_FRAMES))
    d.find_element(By.ID, "start").click()
    wait.until(lambda _: state(d) == "generating")
    assert d.find_element(By.CSS_SELECTOR, "#switches").text == ""
    wait.until(lambda _: received(d) >= 9)
    prompt.clear()
    prompt.send_keys(HOSTILE)
    d.find_element(By.ID, "switch").click()
    wait.until(lambda _: HOSTILE in d.find_element(By.CSS_SELECTOR, "#switches").text)
    assert d.execute_script("return window.pwned === undefined && !document.querySelector('#switches img')")
    d.find_element(By.ID, "stop").click()
    wait.until(lambda _: state(d) == "stopped")
    assert d.find_element(By.ID, "download").is_displayed() and received(d) < 1 + 4 * (LONG_FRAMES - 1)
    # nothing went wrong in the page (a blocked inline script or style would show here as a CSP error)
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors

