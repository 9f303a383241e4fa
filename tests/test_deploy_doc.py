"""The compose file in docs/deploy.md, checked as far as it can be without Docker (which these
machines do not run): a deployment copied from it must start in order and leave no task without
a worker. The scale-out test (tests/test_scale_out.py) runs the same node kinds as processes."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import yaml
from celery import concurrency
from django.conf import settings

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "deploy.md"


def _compose() -> dict:
    text = DOC.read_text()
    section = text[text.index("## A compose file") :]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block, "docs/deploy.md has no compose file under '## A compose file'"
    return yaml.safe_load(block.group(1))


def _metaclaw_services(compose: dict) -> dict[str, dict]:
    image = compose["x-metaclaw"]["image"]
    return {name: s for name, s in compose["services"].items() if s.get("image") == image}


def _waits_for(service: dict) -> dict[str, dict]:
    """``depends_on`` in its long form (the short one, a list, waits only for a start)."""
    waits = service.get("depends_on", {})
    if isinstance(waits, list):
        return {name: {"condition": "service_started"} for name in waits}
    return waits


def _command(service: dict) -> list[str]:
    return shlex.split(service["command"])


def _option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_every_queue_the_tasks_are_routed_to_has_a_worker_and_one_beat_runs():
    services = _metaclaw_services(_compose())
    routed = {route["queue"] for route in settings.CELERY_TASK_ROUTES.values()}
    routed.add(settings.CELERY_TASK_DEFAULT_QUEUE)
    consumed: set[str] = set()
    beats = []
    for name, service in services.items():
        argv = _command(service)
        if argv[:1] != ["celery"]:
            continue
        assert _option(argv, "-A") == "metaclaw_site", name
        if "worker" in argv:
            consumed.update(_option(argv, "-Q").split(","))
            concurrency.get_implementation(_option(argv, "-P"))  # a pool Celery has
        elif "beat" in argv:
            beats.append(name)
    assert routed <= consumed, f"queues without a worker: {sorted(routed - consumed)}"
    assert len(beats) == 1, f"exactly one beat in a deployment, found {beats}"


def test_each_process_waits_for_the_migrations_and_they_for_a_healthy_database():
    compose = _compose()
    services = _metaclaw_services(compose)
    migrate = [n for n, s in services.items() if _command(s)[-3:-1] == ["manage.py", "migrate"]]
    assert migrate == ["migrate"]
    assert _waits_for(services["migrate"]).get("db") == {"condition": "service_healthy"}
    assert "healthcheck" in compose["services"]["db"]
    assert "healthcheck" in compose["services"]["redis"]
    for name, service in services.items():
        if name == "migrate":
            continue
        waits = _waits_for(service)
        assert waits.get("migrate") == {"condition": "service_completed_successfully"}, name
        assert waits.get("redis") == {"condition": "service_healthy"}, name


def test_the_settings_it_names_are_read_and_the_commands_modules_import():
    compose = _compose()
    source = (ROOT / "metaclaw_site" / "settings.py").read_text()
    for variable in compose["x-metaclaw"]["environment"]:
        assert f'"{variable}"' in source, f"{variable} is not a setting MetaClaw reads"
    for name, service in _metaclaw_services(compose).items():
        argv = _command(service)
        if argv[0] == "uvicorn":
            module, attribute = argv[1].split(":")
            assert callable(getattr(importlib.import_module(module), attribute)), name
        elif argv[0] == "celery":
            assert importlib.import_module("metaclaw_site.celery").app.main == "metaclaw"
        else:
            assert argv[:2] == ["python3", "manage.py"], name
            assert (ROOT / "manage.py").exists()
