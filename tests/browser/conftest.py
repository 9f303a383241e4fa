"""End-to-end tests in a real headless Chromium (Debian's ``chromium`` package) driven by
Playwright (launched by ``tests/browser/chromium.py``), against pytest-django's live server and a
transactional database.

The test command installs both: ``pip install playwright`` (no ``playwright install``: its own
browser download does not work here) and ``apt-get install -y chromium``. Without them these
tests are skipped with the reason. Screenshots go to ``test-artifacts/screenshots/``."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import factories
from tests.browser.chromium import CHROMIUM, chromium_installed, launch

# Playwright's sync API runs an event loop in this thread; the test's own ORM calls are still
# synchronous and never share a connection with the live server's thread.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
PASSWORD = "pw-for-browser-tests-1"
# The machine running the suite may be busy; page actions wait this long (ms) before failing.
TIMEOUT_MS = 20_000


def _unavailable(reason: str) -> None:
    # CI sets METACLAW_REQUIRE_BROWSER=1 so a missing browser fails instead of skipping.
    if os.environ.get("METACLAW_REQUIRE_BROWSER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def browser() -> Iterator:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install playwright)")
    if not chromium_installed():
        _unavailable(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    with sync_playwright() as playwright:
        browser = launch(playwright)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, live_server, request) -> Iterator:
    context = browser.new_context(base_url=live_server.url, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.js_errors = errors  # type: ignore[attr-defined]
    yield page
    # The last state of every test, passed or failed, is kept as an artifact.
    _save(page, request.node.name, "final")
    context.close()


def _save(page, test_name: str, step: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{test_name}--{step}")
    path = SCREENSHOTS / f"{name}.png"
    try:
        page.screenshot(path=str(path), full_page=True)
    except Exception:  # noqa: BLE001 - a failed screenshot must not hide the test's own result
        pass
    return path


@pytest.fixture
def screenshot(page, request) -> Callable[[str], Path]:
    """``screenshot("after-approve")`` saves the page as it is now."""
    return lambda step: _save(page, request.node.name, step)


@pytest.fixture
def project(transactional_db):
    return factories.make_project(name="Support agents")


@pytest.fixture
def person(project) -> Callable[..., object]:
    """``person("admin", "ada")``: a user with that role in ``project`` and a known password."""

    def person(role: str, username: str, in_project=None):
        from base import services

        user = factories.make_user(username, password=PASSWORD)
        services.membership_set(project=in_project or project, user=user, role=role)
        return user

    return person


@pytest.fixture
def log_in(page) -> Callable[[str], None]:
    """Log in through the real form, as a person does."""

    def log_in(username: str, password: str = PASSWORD) -> None:
        page.goto("/login/")
        page.fill("#id_username", username)
        page.fill("#id_password", password)
        with page.expect_navigation():
            page.click("button[type=submit]")

    return log_in
