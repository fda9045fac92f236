"""Drives the server's page (``/``), and pages of other origins, in Debian's headless Chromium
through Selenium.

Used by tests/server/test_http.py and test_cross_site.py, and to make the README's screenshot
with the shipped models::

    python -m tests.server.browser tests/data/Set5/butterfly.png docs/http_page.png
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PAGE_TIMEOUT_S = 60

log = logging.getLogger("tests.server.browser")


@dataclass(frozen=True)
class PageRun:
    result: str  # the upscaled image's size as the page decoded it, "WxH"
    status: str  # the page's status line
    facts: str  # the facts table's text
    console_errors: list[dict[str, object]]  # the browser console's SEVERE / ERROR entries


def chromium_driver() -> tuple[str, str] | None:
    """(browser, chromedriver) paths, or None where Chromium is not installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium under Selenium that keeps its console log, quit on exit."""
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
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.set_page_load_timeout(PAGE_TIMEOUT_S)
        yield driver
    finally:
        driver.quit()


def console_errors(driver: Any) -> list[dict[str, object]]:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def drive_page(port: int, image: Path, screenshot: Path, models: int) -> PageRun:
    """Load the page at 127.0.0.1:``port``, wait for its ``models`` models, upscale ``image``
    with the defaults, and save a screenshot."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with chromium() as driver:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, PAGE_TIMEOUT_S)
        options_shown = "#model option"  # "server default" + one per model
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, options_shown)) == models + 1)
        driver.find_element(By.ID, "file").send_keys(str(image.resolve()))
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-result"))
        run = PageRun(
            result=driver.find_element(By.TAG_NAME, "body").get_attribute("data-result") or "",
            status=driver.find_element(By.ID, "status").text,
            facts=driver.find_element(By.ID, "facts").text,
            console_errors=console_errors(driver),
        )
        driver.save_screenshot(str(screenshot))
        return run


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
    from server.main import BackgroundServer
    from server.models import MODELS_DIR

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
