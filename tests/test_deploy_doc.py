"""The compose file in docs/deploy.md, checked as far as it can be without Docker (which these
machines do not run): a deployment copied from it must start in order and leave no task without
a worker. The scale-out test (tests/test_scale_out.py) runs the same node kinds as processes."""

from __future__ import annotations

import fnmatch
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import pytest
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


# --- The Dockerfile ---------------------------------------------------------------------------
# The image cannot be built here (no Docker daemon, no registry for the base image), so its
# steps run as they would in it: the build context filtered by .dockerignore is copied to a
# folder standing for the image's WORKDIR, each RUN runs there with the Dockerfile's ENV, and
# then its CMD serves pages. The image's Python with its dependencies is a virtual environment
# that sees this one's packages but not its MetaClaw, so the Dockerfile's own install must put
# MetaClaw there. Not emulated: FROM (checked to be a Python this project supports), USER and
# the user it creates (the steps run as whoever runs the suite).

DOCKERFILE = ROOT / "Dockerfile"


def _dockerfile_steps() -> list[tuple[str, str]]:
    """(instruction, arguments) in order: continuation lines joined, comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    steps = []
    for line in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines():
        if line.strip():
            instruction, _, arguments = line.strip().partition(" ")
            steps.append((instruction.upper(), arguments.strip()))
    return steps


def _ignored(relative: Path, patterns: list[str]) -> bool:
    """.dockerignore's two forms used here: a path from the context's top, or ``**/name``."""
    for pattern in patterns:
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatchcase(part, pattern[3:]) for part in relative.parts):
                return True
        elif any(
            fnmatch.fnmatchcase("/".join(relative.parts[: n + 1]), pattern)
            for n in range(len(relative.parts))
        ):
            return True
    return False


def _copy_context(destination: Path) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert all("*" not in p or p.startswith("**/") or "/" not in p for p in patterns), patterns
    for folder, subfolders, files in os.walk(ROOT):
        here = Path(folder).relative_to(ROOT)
        subfolders[:] = [d for d in subfolders if not _ignored(here / d, patterns)]
        for name in files:
            if not _ignored(here / name, patterns):
                (destination / here).mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(folder) / name, destination / here / name)


def _image_python(folder: Path) -> Path:
    """A Python with the project's dependencies and without MetaClaw: a virtual environment
    whose path ends with this one's packages (a .pth line; their own .pth files, this
    checkout's editable MetaClaw among them, do not run)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    packages = sysconfig.get_path("purelib", vars={"base": str(folder)})
    Path(packages, "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    for script, module in (("pip", "pip"), ("uvicorn", "uvicorn")):
        shim = folder / "bin" / script  # the console scripts the image's pip would make
        shim.write_text(f'#!/bin/sh\nexec "$(dirname "$0")/python" -m {module} "$@"\n')
        shim.chmod(0o755)
    return folder / "bin"


@pytest.mark.django_db(transaction=True)
def test_the_dockerfiles_steps_make_a_site_that_serves_its_pages_and_static_files(tmp_path):
    from tests.faults import procs

    image_bin = _image_python(tmp_path / "python")
    image = tmp_path / "image"  # the image's root: /app is image/app
    env = {"PATH": f"{image_bin}:{os.environ['PATH']}", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    workdir = image
    command: list[str] = []
    for instruction, arguments in _dockerfile_steps():
        if instruction == "FROM":
            assert re.fullmatch(r"python:3\.(1[1-9])-slim(-\w+)?", arguments), arguments
        elif instruction == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(arguments)))
        elif instruction == "WORKDIR":
            workdir = image / arguments.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction == "COPY":
            source, target = shlex.split(arguments)
            assert source == ".", "the whole build context, filtered by .dockerignore"
            _copy_context(image / target.lstrip("/"))
        elif instruction == "RUN":
            for part in arguments.split("&&"):
                if part.split()[0] in ("useradd", "chown"):
                    continue  # the image's own user
                part = re.sub(r"(?<![\w.])/app\b", str(image / "app"), part)
                done = subprocess.run(
                    part, shell=True, cwd=workdir, env=env, capture_output=True, text=True
                )
                assert done.returncode == 0, f"RUN {part}\n{done.stdout[-3000:]}{done.stderr}"
        elif instruction == "CMD":
            command = json.loads(arguments)
        else:
            assert instruction in ("USER", "EXPOSE"), f"{instruction}: not emulated by this test"
    assert not (workdir / ".venv").exists() and (workdir / "templates").is_dir()

    port = procs.free_port()
    command[command.index("--port") + 1] = str(port)
    command[command.index("--host") + 1] = "127.0.0.1"
    compose_env = _compose()["x-metaclaw"]["environment"]
    env.update(compose_env)
    env.update(
        DATABASE_URL=procs.test_database_url(),
        REDIS_URL=procs.suite_redis_url(),
        SECRET_KEY="a-secret-for-this-test-only-" + "x" * 32,
        ALLOWED_HOSTS="127.0.0.1",
        METACLAW_PUBLIC_URL=f"http://127.0.0.1:{port}",
    )
    log = tmp_path / "web.log"
    with open(log, "w") as output:
        web = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        headers = {"X-Forwarded-Proto": "https"}  # as the load balancer says
        deadline = time.monotonic() + 60
        while True:
            try:
                login = httpx.get(f"{base}/login/", headers=headers, timeout=5)
                break
            except httpx.TransportError:
                assert web.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.3)
        assert login.status_code == 200, log.read_text()[-3000:]
        assert "csrfmiddlewaretoken" in login.text and "/static/metaclaw/app.css" in login.text
        css = httpx.get(f"{base}/static/metaclaw/app.css", headers=headers, timeout=5)
        assert css.status_code == 200
        assert css.content == (ROOT / "static" / "metaclaw" / "app.css").read_bytes()
        docs = httpx.get(f"{base}/api/v1/docs", headers=headers, timeout=5)
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        # The code it runs is the image's copy, not this checkout.
        imported = subprocess.run(
            ["python", "-c", "import metaclaw_site; print(metaclaw_site.__file__)"],
            cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert imported.stdout.strip() == str(workdir / "metaclaw_site" / "__init__.py")
    finally:
        procs.stop(web)
