"""Running a script in the embedded mode (SQLite) from a suite whose database is PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


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
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
