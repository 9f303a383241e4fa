#!/usr/bin/env python3
"""Django's command-line utility for administrative tasks.

After ``python3 scripts/run.py`` it works as the README prints it, from any Python 3: outside a
virtual environment it runs in the ``.venv`` the runner made, and it reads the settings the
runner's processes run with (its generated SECRET_KEY, the database) from ``var/run.env``, so a
command acts on the same site. What the environment sets wins; without that file (production)
nothing changes."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"


def run_in_the_project_venv() -> None:
    """Outside any virtual environment, use the one scripts/run.py made (Django is there, not
    in the system's Python). An activated or other virtual environment is left alone."""
    python = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if sys.prefix != sys.base_prefix or not python.exists():
        return
    command = [str(python), str(ROOT / "manage.py"), *sys.argv[1:]]
    if os.name == "nt":
        raise SystemExit(subprocess.call(command))
    os.execv(command[0], command)


def read_runner_settings() -> None:
    """The lines ``NAME=value`` (shell-quoted) of ``var/run.env``, written by scripts/run.py."""
    var = Path(os.environ.get("METACLAW_VAR_DIR", ROOT / "var"))
    path = var / "run.env"
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words:
            name, _, value = words[0].partition("=")
            os.environ.setdefault(name, value)


def main() -> None:
    run_in_the_project_venv()
    read_runner_settings()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "metaclaw_site.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
