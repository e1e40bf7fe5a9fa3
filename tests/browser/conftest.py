"""Headless Chromium for the browser tests: Debian's /usr/bin/chromium driven by Playwright.

Playwright's sync API runs an asyncio loop in the thread that uses it, and Django refuses ORM
calls from a thread with a running loop. So the browser lives on a thread of its own
(`run_in_browser`) while the test body, and its ORM setup and checks, stay on the main thread.

A failing flow leaves a screenshot of every open page in `test-artifacts/` (gitignored); set
`BROWSER_SCREENSHOTS=all` to keep them for passing flows too.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from django.test import override_settings
from playwright.sync_api import Browser, BrowserContext, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
FLOW_TIMEOUT = 120  # seconds; a hung browser fails the test instead of blocking the run

T = TypeVar("T")
NewContext = Callable[[], BrowserContext]


def _reload_middleware(live_server) -> None:
    """Rebuild the live server's middleware chains so they read the current settings.

    The live server is session-wide and its handlers load the middleware once, at start-up:
    SecurityMiddleware keeps the SECURE_SSL_REDIRECT and HSTS values it saw then (the production
    ones), so an override made in a test would not reach it. Django's media-files handler, which
    with an empty MEDIA_URL answers every request, holds a chain of its own, so every handler in
    the stack is reloaded (the static-files handler's `load_middleware` does nothing).
    """
    app = live_server.thread.httpd.get_app()
    while app is not None:
        app.load_middleware()
        app = getattr(app, "application", None)


@pytest.fixture
def site(live_server) -> Iterator[str]:
    """The live server's base URL, set up for a plain-http browser on localhost."""
    plain_http = override_settings(
        ALLOWED_HOSTS=["localhost", "127.0.0.1"],
        SESSION_COOKIE_SECURE=False,  # a Secure cookie is dropped over http
        CSRF_COOKIE_SECURE=False,
        SECURE_SSL_REDIRECT=False,
        SECURE_HSTS_SECONDS=0,
    )
    with plain_http:
        _reload_middleware(live_server)
        yield live_server.url
    _reload_middleware(live_server)


def _screenshot_all(browser: Browser, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    for c, context in enumerate(browser.contexts):
        for p, page in enumerate(context.pages):
            try:
                page.screenshot(path=ARTIFACTS / f"{name}-{c}-{p}.png", full_page=True)
            except Exception:  # a crashed page must not hide the test's own error
                pass


def in_chromium(use: Callable[[Browser], T], name: str) -> T:
    """`use(browser)` with headless Chromium, on a thread of its own; what it returns, or what
    it raised, here. A missing browser fails the test, and so does one hung beyond
    `FLOW_TIMEOUT`."""
    if not CHROMIUM.exists():  # fail, never skip: a missing browser must not pass unseen
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests need Debian's Chromium "
            "(apt-get install chromium chromium-driver).",
            pytrace=False,
        )
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(
                    executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
                )
                try:
                    outcome["value"] = use(browser)
                finally:
                    browser.close()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"browser-{name}", daemon=True)
    thread.start()
    thread.join(FLOW_TIMEOUT)
    if thread.is_alive():
        pytest.fail(f"The browser flow did not finish within {FLOW_TIMEOUT} s.")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.fixture
def run_in_browser(request, site: str) -> Callable[[Callable[[NewContext], T]], T]:
    """Run `flow(new_context)` in headless Chromium on its own thread; return what it returns.

    `new_context()` opens an isolated browser context (its own cookies: one per person) on the
    live server. Errors raised in the flow are re-raised here, after the screenshots are taken.
    """
    name = re.sub(r"[^\w.-]+", "_", request.node.name)

    def run(flow: Callable[[NewContext], T]) -> T:
        def use(browser: Browser) -> T:
            def new_context() -> BrowserContext:
                context = browser.new_context(
                    base_url=site, viewport={"width": 1280, "height": 900}
                )
                context.set_default_timeout(5_000)
                return context

            try:
                value = flow(new_context)
            except BaseException:
                _screenshot_all(browser, name)
                raise
            if os.environ.get("BROWSER_SCREENSHOTS") == "all":
                _screenshot_all(browser, name)
            return value

        return in_chromium(use, name)

    return run
