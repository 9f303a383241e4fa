"""Running a script in the embedded mode (SQLite) from a suite whose database is PostgreSQL."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tests.helpers import last_line_of_success


def run_embedded(script: str, var_dir: Path, **env: str) -> Any:
    """Run ``script`` in a fresh process with no DATABASE_URL (SQLite in ``var_dir``) and no
    Redis, and return the JSON its last line printed."""
    environment = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL"}
    }
    environment.update(
        DJANGO_SETTINGS_MODULE="metaclaw_site.settings",
        METACLAW_TESTING="1",
        METACLAW_VAR_DIR=str(var_dir),
        ALLOWED_HOSTS="testserver",
        **env,
    )
    return json.loads(last_line_of_success([sys.executable, "-c", script], environment, 240))
