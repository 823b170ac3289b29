"""
Tests for the status page (L{ollamamq.web}): served as shipped, self-contained, and, in
headless Chromium against a real daemon and simulator, showing the backends and a user who
just sent a request.
"""

from __future__ import annotations

import os
import re
import shutil

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from ollamamq.web.page import statusPage
from tests.harness import ProcessTestCase, threaded
from tests.test_api import Proxy, sim


class PageTests(SynchronousTestCase):
    """
    C{GET /proxy/ui} serves the one static file.
    """

    def test_served(self) -> None:
        """
        The page is served as HTML with a policy that lets it load nothing from elsewhere.
        """
        proxy = Proxy(self, {"gpu1": sim(name="gpu1")})
        response, body = proxy.complete("GET", "/proxy/ui")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, statusPage())
        self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                         [b"text/html; charset=utf-8"])
        policy = response.headers.getRawHeaders(b"content-security-policy")[0]
        self.assertIn(b"default-src 'self'", policy)

    def test_selfContained(self) -> None:
        """
        No URL with a host anywhere in the page (no CDN, no external font), and it uses
        the proxy's own status and event stream.
        """
        page = statusPage().decode("utf-8")
        self.assertIsNone(re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", page, re.I))
        self.assertNotIn("@import", page)
        self.assertNotIn("@font-face", page)
        for path in ('"/proxy/status"', '"/proxy/events"', '"/proxy/queue/me"'):
            self.assertIn(path, page)


def chromium() -> str:
    """
    The path of a Chromium to drive, and Playwright importable; else skip with why.
    """
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        raise SkipTest("Playwright is not installed (pip install '.[test]')") from None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SkipTest("no Chromium on this machine (.ci/run installs Debian's chromium)")


def viewPage(executable: str, url: str, backend: str, user: str, screenshot: str) -> dict:
    """
    Open the status page in headless Chromium, wait until it shows C{backend} and
    C{user}, save a screenshot; return what the page showed (blocking: run in a thread).
    """
    from playwright.sync_api import sync_playwright

    outside: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 640})
            page.on("request", lambda r: None if r.url.startswith(url) else outside.append(r.url))
            page.goto(url + "/proxy/ui")
            row = page.wait_for_selector(f'#backends tr[data-name="{backend}"]', timeout=20_000)
            state = row.query_selector(".state").inner_text()
            userRow = page.wait_for_selector(f'#users tr[data-user="{user}"]', timeout=20_000)
            served = userRow.query_selector_all("td")[4].inner_text()
            page.wait_for_selector("#health.ok", timeout=20_000)
            page.screenshot(path=screenshot)
        finally:
            browser.close()
    return {"state": state, "served": served, "outside": outside}


class BrowserTests(ProcessTestCase):
    """
    The page in a real browser against a real daemon.
    """

    def test_showsBackendsAndUser(self) -> ensureDeferred:
        """
        Headless Chromium shows the simulator backend online and the user who just sent a
        request; the screenshot is saved under the test's temp directory, and the page
        asked nothing of any other host.
        """
        executable = chromium()

        async def run() -> None:
            simURL, _ = await self.startSimulator("--tps", "0")
            # A backend given by URL is named after its host and port.
            name = simURL.split("//", 1)[1]
            url, _ = await self.startProxy("--backend", simURL, backends=1)
            response = await self.http.post(
                url + "/api/generate", json={"model": "llama3", "prompt": "hi", "stream": False},
                headers={"X-User-ID": "browser-user"})
            self.assertEqual(response.code, 200)
            await response.content()
            directory = self.mktemp()
            os.makedirs(directory)
            screenshot = os.path.join(directory, "status-page.png")
            seen = await threaded(viewPage, executable, url, name, "browser-user", screenshot)
            self.assertEqual(seen["state"], "online")
            self.assertEqual(seen["served"], "1")
            self.assertEqual(seen["outside"], [])
            self.assertGreater(os.path.getsize(screenshot), 1000)

        return ensureDeferred(run())
