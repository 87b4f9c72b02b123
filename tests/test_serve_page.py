"""The draw-a-digit page in a real headless Chromium (Debian's chromium and chromium-driver, via Selenium),
against a real `bnpipe serve` of a model quickly trained on the real MNIST and served from its Triton repository.
"""

from __future__ import annotations

import base64
import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bnpipe.serve.image import load_digit
from tests.conftest import real_mnist_root
from tests.serve_server import running


def browser_binaries() -> tuple[str, str]:
    """Chromium and its driver, from Debian's packages (`.ci/run` installs them)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    if shutil.which("apt-get") is None:
        pytest.skip("no chromium and no Debian apt-get to install it (the browser test runs where apt can)")
    pytest.fail("chromium or chromedriver is missing: apt-get install -y chromium chromium-driver (as .ci/run does)")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`bnpipe serve` of a model trained for one epoch on 10,000 real MNIST images (~97% test accuracy)."""
    from bnpipe.export.pipeline import export_checkpoint
    from bnpipe.train.config import TrainConfig
    from bnpipe.train.loop import train

    work = tmp_path_factory.mktemp("page")
    train(TrainConfig(data=str(real_mnist_root()), epochs=1, limit_train=10_000, out=str(work / "m.pt")),
          log=lambda line: None)
    export_checkpoint(work / "m.pt", work / "m.onnx", fold_bn=True, triton_repo=work / "repo", triton_device="cpu")
    with running("--model", str(work / "repo"), "--device", "cpu") as process:
        yield "http://" + process.url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=900,700", "--disable-extensions", "--no-first-run"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for_result(driver: Any, before: dict[str, Any] | None = None) -> dict[str, Any]:
    """Wait until the page shows an answer (a label or an error) other than ``before``; return it."""
    from selenium.webdriver.support.ui import WebDriverWait

    read = """const rows = [...document.querySelectorAll('#top li')];
      return {label: document.getElementById('label').textContent,
              status: document.getElementById('status').textContent,
              error: document.getElementById('status').classList.contains('error'),
              top: rows.map(r => [r.dataset.label, Number(r.dataset.probability)]),
              bars: rows.map(r => r.querySelector('.fill').style.width)};"""
    def answered(d: Any) -> dict[str, Any] | None:
        shown = d.execute_script(read)
        done = (shown["label"] or shown["error"]) and not shown["status"].startswith("Labelling")
        return shown if done and shown != before else None

    return WebDriverWait(driver, 20, poll_frequency=0.05).until(answered)


def seen_pixels(driver: Any) -> np.ndarray:
    """The 28x28 image the page shows as the model's input (its red channel; it is gray)."""
    rgba = driver.execute_script(
        "return Array.from(document.getElementById('seen').getContext('2d').getImageData(0, 0, 28, 28).data);")
    return np.array(rgba, np.uint8).reshape(28, 28, 4)[..., 0]


def test_drawn_one_is_labelled_one(server: str, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    browser.get(server + "/")
    pad = browser.find_element(By.ID, "pad")
    # A stroke like a "1": top to bottom through the middle, leaning slightly, in small pointer moves.
    actions = ActionChains(browser, duration=10).move_to_element_with_offset(pad, 12, -95).click_and_hold()
    for _ in range(19):
        actions.move_by_offset(-1, 10)
    actions.release().perform()
    shown = wait_for_result(browser)
    browser.save_screenshot(str(tmp_path / "page.png"))
    assert not shown["error"], shown["status"]
    assert shown["label"] == "1" and shown["top"][0][0] == "1", shown
    probs = [p for _, p in shown["top"]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-9
    assert [float(bar.rstrip("%")) for bar in shown["bars"]] == pytest.approx([100 * p for p in probs], abs=0.01)
    # The small image is exactly what predict's preprocessing makes of the pad's PNG.
    png = base64.b64decode(browser.execute_script("return document.getElementById('pad').toDataURL('image/png');")
                           .split(",", 1)[1])
    digit = load_digit(png, "pad.png")
    assert digit.max() > 0 and np.array_equal(seen_pixels(browser), digit)
    # Nothing was fetched from anywhere but the server: the page works offline.
    origins = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin);")
    assert set(origins) <= {server}


DROP = """const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
  const files = new DataTransfer();
  files.items.add(new File([bytes], arguments[1], {type: 'image/png'}));
  document.getElementById('pad').dispatchEvent(new DragEvent('drop', {dataTransfer: files, bubbles: true}));"""


def test_dropped_image_file_and_opened_bad_file(server: str, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    from bnpipe.serve.samples import write_samples

    (sample,) = write_samples(real_mnist_root(), tmp_path, count=1)  # 00000_7.png: the first test image
    browser.get(server + "/")
    browser.execute_script(DROP, base64.b64encode(sample.read_bytes()).decode(), sample.name)
    shown = wait_for_result(browser)
    request = urllib.request.Request(server + "/v1/predict", data=sample.read_bytes(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = json.load(response)
    assert shown["label"] == answer["label"] == sample.stem.split("_")[1]
    assert shown["top"] == [[t["label"], t["probability"]] for t in answer["top_k"]]
    assert np.array_equal(seen_pixels(browser), load_digit(str(sample), sample.name))
    browser.save_screenshot(str(tmp_path / "page_file.png"))

    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    browser.find_element(By.ID, "file").send_keys(str(notes))
    shown = wait_for_result(browser, before=shown)
    browser.save_screenshot(str(tmp_path / "page_error.png"))
    assert shown["error"] and shown["status"].startswith("notes.txt: ") and shown["label"] == ""
    assert shown["top"] == [] and "\n" not in shown["status"]
