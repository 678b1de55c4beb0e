"""A real headless browser for tests: the system Chromium (Debian's ``chromium``) driven by Playwright.

Playwright's own browser download cannot work offline, so it launches ``/usr/bin/chromium`` (or
``$MEDSFT_CHROMIUM``). Every request the page makes is recorded (:attr:`Browser.requests`), so a test can
assert that nothing outside loopback (or no URL at all, for a file page) was asked for.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

import pytest

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def chromium_path() -> str | None:
    return os.environ.get("MEDSFT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    def __init__(self, page) -> None:
        self.page = page
        self.requests: list[str] = []
        page.on("request", lambda request: self.requests.append(request.url))

    def outside_loopback(self) -> list[str]:
        """Requested URLs that are neither loopback http(s)/ws nor in-page (data:, blob:, about:)."""
        bad = []
        for url in self.requests:
            parsed = urlparse(url)
            if parsed.scheme in {"data", "blob", "about"}:
                continue
            if parsed.scheme in {"http", "https", "ws", "wss"} and parsed.hostname in LOOPBACK:
                continue
            bad.append(url)
        return bad


@contextmanager
def browser(width: int = 1280, height: int = 900) -> Iterator[Browser]:
    """A fresh headless Chromium page; skips the test when no Chromium is installed (``.ci/run`` installs it)."""
    path = chromium_path()
    if path is None:
        pytest.skip("no chromium on PATH (apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chrome = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = chrome.new_page(viewport={"width": width, "height": height})
            yield Browser(page)
        finally:
            chrome.close()
