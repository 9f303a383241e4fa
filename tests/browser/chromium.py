"""Debian's Chromium (``apt-get install -y chromium``; ``METACLAW_CHROMIUM`` names another), as
the browser tests and ``docs/screenshots.py`` launch it through Playwright (``pip install
playwright``, no ``playwright install``: its own browser download does not work here)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("METACLAW_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_installed() -> bool:
    return bool(Path(CHROMIUM).exists() or shutil.which(CHROMIUM))


def launch(playwright: Any) -> Any:
    """A headless Chromium browser from a started ``sync_playwright()``."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
