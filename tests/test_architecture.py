"""The shape of the code and of the database, checked so that it stays as ARCHITECTURE.md says."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
from django.conf import settings

ROOT = Path(__file__).resolve().parent.parent


def test_imports_keep_the_one_way_rules():
    """The import-linter contracts in pyproject.toml: layers, no cycles, a light runtime."""
    lint_imports = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def _server_url(database: str) -> str:
    db = settings.DATABASES["default"]
    user = db.get("USER") or "postgres"
    host, port = db.get("HOST") or "127.0.0.1", db.get("PORT") or 5432
    return f"postgres://{user}@{host}:{port}/{database}"


def _manage(database_url: str, var_dir: Path, *args: str) -> str:
    var_dir.mkdir(exist_ok=True)
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PYTEST")},
        "DJANGO_SETTINGS_MODULE": "metaclaw_site.settings_test",
        "DATABASE_URL": database_url,
        "METACLAW_DB_POOL": "0",
        "METACLAW_VAR_DIR": str(var_dir),
    }
    done = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


# A database as the code before the restructuring left it (commit 418a4ad): ``migrate``, then
# ``seed_demo``, then one demo proposal approved by an API key and a first approval (of two) by a
# Slack user on another, dumped with ``pg_dump --inserts --no-owner --no-privileges`` (psql's
# backslash lines removed). A file, not a checkout of the old code: CI's clone may lack history.
BEFORE_THE_RESTRUCTURING = ROOT / "tests" / "fixtures" / "db_before_restructuring.sql.gz"

COUNT_ROWS = """
import json
from django.apps import apps
print(json.dumps({m._meta.db_table: m.objects.count() for m in apps.get_models()
                  if m._meta.app_label in {"metaclaw_site", "incidents", "skills", "training"}}))
"""

READ_DECISIONS = """
import json
from skills.library.models import SkillRevision
rows = SkillRevision.objects.exclude(decided_by_label="", first_approved_by_label="")
print(json.dumps([[r.status, r.decided_by_label, r.first_approved_by_label]
                  for r in rows.filter(status__in=["approved", "proposed"]).order_by("id")]))
"""


def test_a_database_made_before_the_restructuring_upgrades_with_all_its_data(tmp_path):
    """Today's ``migrate`` on a database of the code before the restructuring applies only what
    came since, and today's models read every row."""
    name = f"metaclaw_upgrade_{uuid.uuid4().hex[:8]}"
    admin_url = _server_url("postgres")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = _server_url(name)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(gzip.decompress(BEFORE_THE_RESTRUCTURING.read_bytes()).decode())
        with psycopg.connect(url) as conn:
            tables = [
                row[0]
                for row in conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND "
                    "split_part(tablename, '_', 1) IN ('metaclaw', 'incidents', 'skills', "
                    "'training')"
                )
            ]
            before = {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}
        assert before["metaclaw_site_project"] == 1 and before["incidents_incident"] > 10

        migrated = _manage(url, tmp_path / "var", "migrate", "--no-input")
        # Only the migrations made since apply (none of the snapshot's again), among them the
        # one that moved who decided on a revision from the audit log into fields of the
        # revision, copied from the log.
        applied = re.findall(r"Applying (\S+)\.\.\. OK", migrated)
        assert "skills.0004_revision_decision_labels" in applied
        assert not [name for name in applied if name.split(".")[1].startswith("0001")]
        after = json.loads(
            _manage(url, tmp_path / "var", "shell", "-c", COUNT_ROWS).strip().splitlines()[-1]
        )
        # Every model of the four apps reads every row it had; tables added since start empty.
        assert {t: n for t, n in after.items()} == {t: before.get(t, 0) for t in after}
        assert len(after) >= 18
        labels = _manage(url, tmp_path / "var", "shell", "-c", READ_DECISIONS)
        assert json.loads(labels.strip().splitlines()[-1]) == [
            ["approved", "api-key:old", ""],
            ["proposed", "", "slack:U1"],
        ]
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_api_keeps_its_operations_wherever_their_code_lives():
    """Moving a router's module must not rename its OpenAPI operations: ninja derives their
    ids from the module path, and generated clients name their methods after them."""
    from metaclaw_site.api import api

    schema = api.get_openapi_schema()
    operations = sorted(
        f"{method.upper()} {path} {operation['operationId']}"
        for path, methods in schema["paths"].items()
        for method, operation in methods.items()
    )
    recorded = (ROOT / "tests" / "api_operations.txt").read_text().splitlines()
    assert operations == [line for line in recorded if line and not line.startswith("#")]


def _url_patterns(patterns, prefix: str = "", namespace: str = ""):
    from django.urls.resolvers import URLResolver

    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            inner = namespace + (f"{pattern.namespace}:" if pattern.namespace else "")
            yield from _url_patterns(pattern.url_patterns, prefix + str(pattern.pattern), inner)
        else:
            yield f"{prefix}{pattern.pattern} {namespace}{pattern.name or '-'}"


def test_every_page_and_endpoint_keeps_its_url_and_name():
    from django.urls import get_resolver

    patterns = sorted(
        line
        for line in set(_url_patterns(get_resolver().url_patterns))
        if not line.startswith("admin/")
    )
    recorded = (ROOT / "tests" / "url_patterns.txt").read_text().splitlines()
    assert patterns == [line for line in recorded if line and not line.startswith("#")]


def test_every_task_keeps_its_name_and_the_beat_schedule_finds_each():
    """Task names travel in queued messages and in the beat schedule: moving a task's module
    must not rename it, or messages queued by an older process are dropped as unknown."""
    from metaclaw_site.celery import app

    app.loader.import_default_modules()
    ours = sorted(
        name for name in app.tasks if name.startswith(("incidents.", "skills.", "training."))
    )
    assert ours == [
        "incidents.tasks.ensure_incident_partitions",
        "skills.tasks.check_canaries",
        "skills.tasks.check_effectiveness",
        "skills.tasks.judge_revision",
        "skills.tasks.process_slack_interaction",
        "skills.tasks.propose_skill",
        "skills.tasks.replay_gate_run",
        "skills.tasks.send_notification",
        "skills.tasks.sweep_pending_judges",
        "skills.tasks.sweep_pending_notifications",
        "skills.tasks.sweep_slack_interactions",
        "skills.tasks.sweep_waiting_groups",
        "training.tasks.check_idle_windows",
        "training.tasks.training_run_execute",
    ]
    for entry in app.conf.beat_schedule.values():
        assert entry["task"] in app.tasks


def _our_modules():
    for package in ("base", "incidents", "skills", "training", "metaclaw_site"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if not {"migrations", "management", "templatetags"} & set(path.parts):
                yield path


def test_every_package_says_what_it_owns_and_no_module_grows_past_500_lines_unexplained():
    import ast

    for path in _our_modules():
        source = path.read_text()
        docstring = ast.get_docstring(ast.parse(source)) or ""
        where = path.relative_to(ROOT)
        if path.name == "__init__.py":
            assert len(docstring) > 80, f"{where} must say what the package owns and imports"
        lines = source.count("\n")
        # "About 500": a module may run a little over while it reads as one piece.
        assert lines <= 560 or "on purpose" in docstring, f"{where}: {lines} lines, no reason"
