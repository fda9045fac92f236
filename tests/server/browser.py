"""Drives the server's page (``/``) in Debian's headless Chromium through Selenium.

Used by tests/server/doors/test_http.py, and to make the screenshot in docs/ with the shipped
models::

    python -m tests.server.browser tests/data/Set5/butterfly.png docs/http_page.png
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import logging
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PAGE_TIMEOUT_S = 60
# The bytes behind a blob: URL, base64 (Selenium hands strings back, not bytes).
SAVED_BYTES = """
const done = arguments[arguments.length - 1];
fetch(arguments[0]).then((r) => r.blob()).then((blob) => {
  const reader = new FileReader();
  reader.onload = () => done(reader.result.split(",")[1]);
  reader.readAsDataURL(blob);
});
"""

log = logging.getLogger("tests.server.browser")


@dataclass(frozen=True)
class PageRun:
    result: str  # the upscaled image's size as the page decoded it, "WxH"
    status: str  # the page's status line
    facts: str  # the facts table's text
    console_errors: list[dict[str, object]]  # the browser console's SEVERE / ERROR entries
    download: str = ""  # the save link's file name
    saved: bytes = b""  # what the save link holds


def chromium_driver() -> tuple[str, str] | None:
    """(browser, chromedriver) paths, or None where Chromium is not installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def _driver() -> Any:
    """Headless Chromium at 1100x900 that keeps the console log."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = chromium_driver()
    if found is None:
        raise RuntimeError("no chromium and chromedriver on PATH")
    browser, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,900"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver_path), options=options)


def drive_page(
    port: int, image: Path, screenshot: Path, models: int, output_format: str = "png"
) -> PageRun:
    """Load the page at 127.0.0.1:``port``, wait for its ``models`` models, upscale ``image``
    into ``output_format`` (the rest as default), read what the save link holds, and save a
    screenshot."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver = _driver()
    try:
        driver.set_page_load_timeout(PAGE_TIMEOUT_S)
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, PAGE_TIMEOUT_S)
        options_shown = "#model option"  # "server default" + one per model
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, options_shown)) == models + 1)
        Select(driver.find_element(By.ID, "format")).select_by_value(output_format)
        driver.find_element(By.ID, "file").send_keys(str(image.resolve()))
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-result"))
        save = driver.find_element(By.ID, "save")
        saved = driver.execute_async_script(SAVED_BYTES, save.get_attribute("href"))
        run = PageRun(
            result=driver.find_element(By.TAG_NAME, "body").get_attribute("data-result") or "",
            status=driver.find_element(By.ID, "status").text,
            facts=driver.find_element(By.ID, "facts").text,
            console_errors=[
                e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")
            ],
            download=save.get_attribute("download") or "",
            saved=base64.b64decode(saved),
        )
        driver.save_screenshot(str(screenshot))
        return run
    finally:
        driver.quit()


@dataclass(frozen=True)
class PageTour:
    """What the page showed at each step of ``tour_page``."""

    label_on_empty_page: bool  # the "before | after" label is displayed before any result
    sized_result: str  # "WxH" with the width control set
    sized_download: str  # the save link's file name then
    result: str  # "WxH" without sizing
    download: str
    shown_width: float  # CSS pixels the result takes on screen at first (its real size)
    zoom_text: str
    fit_width: float  # after "Fit"
    fit_height: float
    view_size: tuple[float, float]  # the viewport's client width and height
    zoomed_in_width: float  # after "Fit" then "+"
    error_status: str  # the status line after a file that is not an image
    error_status_class: str
    result_after_error: bool  # the result area is displayed under the error
    label_after_error: bool
    console_errors: list[dict[str, object]]


def tour_page(port: int, image: Path, not_image: Path, models: int, width: int) -> PageTour:
    """Drive the page's controls: an upscale sized by the width control, one at the model's
    scale, the zoom buttons, then a file that is not an image."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _driver()
    try:
        driver.set_page_load_timeout(PAGE_TIMEOUT_S)
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, PAGE_TIMEOUT_S)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model option")) == models + 1)
        element = driver.find_element
        label_on_empty_page = element(By.ID, "tags").is_displayed()

        def upscale(path: Path) -> None:
            driver.execute_script("delete document.body.dataset.result")
            element(By.ID, "file").send_keys(str(path.resolve()))
            element(By.ID, "go").click()
            wait.until(lambda d: element(By.ID, "status").text not in ("", "upscaling...")
                       and not element(By.ID, "go").get_attribute("disabled")
                       and "ready" not in element(By.ID, "status").text)  # fmt: skip

        def result() -> str:
            return element(By.TAG_NAME, "body").get_attribute("data-result") or ""

        def shown(axis: str = "width") -> float:
            script = f"return document.getElementById('after').getBoundingClientRect().{axis}"
            return float(driver.execute_script(script))

        element(By.ID, "width").send_keys(str(width))
        upscale(image)
        sized_result, sized_download = result(), element(By.ID, "save").get_attribute("download")
        element(By.ID, "width").clear()
        upscale(image)
        plain = (result(), element(By.ID, "save").get_attribute("download"))
        shown_width, zoom_text = shown(), element(By.ID, "zoom-level").text
        element(By.ID, "fit").click()
        fit = (shown(), shown("height"))
        view = driver.execute_script(
            "const v = document.getElementById('view'); return [v.clientWidth, v.clientHeight]"
        )
        element(By.ID, "zoom-in").click()
        zoomed_in_width = shown()
        upscale(not_image)
        return PageTour(
            label_on_empty_page=label_on_empty_page,
            sized_result=sized_result,
            sized_download=sized_download or "",
            result=plain[0],
            download=plain[1] or "",
            shown_width=shown_width,
            zoom_text=zoom_text,
            fit_width=fit[0],
            fit_height=fit[1],
            view_size=(float(view[0]), float(view[1])),
            zoomed_in_width=zoomed_in_width,
            error_status=element(By.ID, "status").text,
            error_status_class=element(By.ID, "status").get_attribute("class") or "",
            result_after_error=element(By.ID, "result").is_displayed(),
            label_after_error=element(By.ID, "tags").is_displayed(),
            console_errors=[
                e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")
            ],
        )
    finally:
        driver.quit()


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium under Selenium that keeps its console log, quit on exit."""
    driver = _driver()
    try:
        driver.set_page_load_timeout(PAGE_TIMEOUT_S)
        yield driver
    finally:
        driver.quit()


def console_errors(driver: Any) -> list[dict[str, object]]:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def run_script_page(url: str) -> str:
    """Open ``url`` (a page whose script sets ``data-done`` on its body when it is finished)
    and return that attribute's value."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with chromium() as driver:
        driver.get(url)
        wait = WebDriverWait(driver, PAGE_TIMEOUT_S)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-done"))
        return driver.find_element(By.TAG_NAME, "body").get_attribute("data-done") or ""


def main(argv: list[str] | None = None) -> int:
    """Serve the shipped models with HTTP on a free port and screenshot the page."""
    from server.config import EngineConfig, ServerConfig
    from server.models import MODELS_DIR
    from tests.background import BackgroundServer

    parser = argparse.ArgumentParser(description="Screenshot the page with the shipped models.")
    parser.add_argument("image", type=Path)
    parser.add_argument("screenshot", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = ServerConfig(
        model_dir=MODELS_DIR,
        host="127.0.0.1",
        port=0,
        http_port=0,
        engine=EngineConfig(providers=("CPUExecutionProvider",)),
    )
    with BackgroundServer(config) as bg:
        models = len(bg.running.repository.snapshot.models)
        run = drive_page(bg.running.http.port, args.image, args.screenshot, models)  # type: ignore[union-attr]
    log.info("%s: %s, %s", args.screenshot, run.status, run.result)
    return 0 if run.status == "done" and not run.console_errors else 1


if __name__ == "__main__":
    sys.exit(main())
