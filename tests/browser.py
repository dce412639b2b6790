"""Open an advseg page in a real headless browser (Chromium through Playwright) and say what a
reader's browser would meet: console errors, images that did not load, requests that left the
machine. Skips, with the reason, where no browser is installed (CI installs Debian's chromium:
see .ci/run; Playwright's own browser download needs the internet)."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def browser_path() -> str | None:
    """``$ADVSEG_BROWSER``, else the first Chromium on the PATH, else None."""
    given = os.environ.get("ADVSEG_BROWSER")
    if given:
        return given
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


@dataclass
class Visit:
    """What the browser met opening one page."""

    page: object
    errors: list[str] = field(default_factory=list)
    external: list[str] = field(default_factory=list)


@contextmanager
def browser():
    """A headless Chromium (skips the test when none is installed or Playwright is missing)."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright (the dev extra) is not installed"
    )
    executable = browser_path()
    if executable is None:
        pytest.skip(
            "no Chromium on this machine (apt-get install chromium, or set $ADVSEG_BROWSER); "
            ".ci/run installs it"
        )
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield launched
        finally:
            launched.close()


def visit(launched, path: Path, width: int = 1400) -> Visit:
    """Open ``path`` at ``width`` px; every request not to a file: or data: URL is blocked and
    recorded as external, every console error and uncaught exception recorded."""
    page = launched.new_page(viewport={"width": width, "height": 900})
    seen = Visit(page)
    page.on("console", lambda m: seen.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: seen.errors.append(str(e)))

    def route(request_route) -> None:
        url = request_route.request.url
        if url.startswith(("file:", "data:")):
            request_route.continue_()
        else:
            seen.external.append(url)
            request_route.abort()

    page.route("**/*", route)
    page.goto(path.resolve().as_uri(), wait_until="load")
    return seen


def broken_images(page) -> list[str]:
    """The ``alt`` of each image that did not load (not complete, or no pixels)."""
    return page.evaluate(
        "Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)"
        ".map(i => i.alt || i.src.slice(0, 40))"
    )
