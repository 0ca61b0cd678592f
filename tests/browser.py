"""A headless Chromium for the page tests (the explorer, eval's HTML): Debian's chromium in CI
(.ci/run installs it), or any found locally. Without one the test is skipped, saying so."""
import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]


def find_chromium() -> str | None:
    """A Chromium to drive: $MINILM_CHROMIUM, Debian's chromium, or one on PATH; None means
    playwright's own download, if it has one."""
    for path in (os.environ.get("MINILM_CHROMIUM"), "/usr/bin/chromium",
                 shutil.which("chromium"), shutil.which("chromium-browser"),
                 shutil.which("google-chrome")):
        if path and Path(path).is_file():
            return path
    return None


@contextlib.contextmanager
def chromium() -> Iterator:
    """A launched playwright Browser, closed after the block; skips the test without one."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        path = find_chromium()
        if path is None and not Path(p.chromium.executable_path).is_file():
            pytest.skip("no Chromium found (install Debian's chromium, or set MINILM_CHROMIUM)")
        browser = p.chromium.launch(executable_path=path, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()
