"""Processes the fault, worker and scale-out tests start (Redis, Celery workers, web nodes), each a
process group of its own on ports and in folders of their own, so stopping or killing one disturbs
nothing else on the machine; and the test database and Redis they share with the suite."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from django.db import connection

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def suite_redis_url() -> str:
    """The suite's own Redis (its broker and counters)."""
    return os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")


def test_database_url() -> str:
    """The test database pytest-django created (test_<name>), not the configured one."""
    db = connection.settings_dict
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    host, port = db.get("HOST") or "127.0.0.1", db.get("PORT") or 5432
    return f"postgres://{db.get('USER') or 'postgres'}{password}@{host}:{port}/{db['NAME']}"


def process_env(
    redis_url: str, *, database_url: str = "", llm=None, **settings: object
) -> dict[str, str]:
    """The environment of a test's own web and worker processes: the test settings, the test
    database (or ``database_url``), the test's private Redis as broker and counters, real
    queues, and the loopback LLM (``tests.fakes.openai_server``) when one is given; more
    settings by their environment names."""
    env = {
        "DJANGO_SETTINGS_MODULE": "metaclaw_site.settings_test",
        "DATABASE_URL": database_url or test_database_url(),
        "REDIS_URL": redis_url,
        "CELERY_TASK_ALWAYS_EAGER": "0",
        "ALLOWED_HOSTS": "127.0.0.1",
    }
    if llm is not None:
        env.update(
            OPENAI_BASE_URL=llm.base_url,
            OPENAI_API_KEY="test-key",
            METACLAW_LLM_MODEL="loopback-model",
        )
    env.update({name: str(value) for name, value in settings.items()})
    return env


def start_redis(folder: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A private redis-server; ``port``: the one an earlier server had (a restart)."""
    port = port or free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def start(command: list[str], env: dict[str, str], log: IO) -> subprocess.Popen:
    """``command`` run in the checkout with ``env`` over this process's environment, its output
    to ``log``: a process group of its own, as on its own machine (``stop`` ends it whole)."""
    return subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def start_worker(
    env: dict[str, str],
    folder: Path,
    name: str,
    concurrency: int = 4,
    beat: bool = True,
    pool: str = "prefork",
):
    """A fast-queue worker logging to ``folder/<name>.log``; with ``beat``, the beat inside it
    (-B), as a small deployment runs it; ``pool``: Celery's (``threads`` for a hosted LLM)."""
    log = open(folder / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    beat_args = ["-B", "-s", str(folder / f"{name}-beat-schedule")] if beat else []
    return start(
        [sys.executable, "-m", "celery", "-A", "metaclaw_site", "worker", *beat_args,
         "-Q", "fast", "-P", pool, "-c", str(concurrency), "--without-gossip",
         "--without-mingle", "--without-heartbeat", "-n", f"{name}@%h", "-l", "INFO"],
        env, log,
    )  # fmt: skip


def wait_ready(log: Path, deadline: float) -> None:
    """Until the worker logging to ``log`` says it is ready; the test fails at ``deadline``."""
    while " ready." not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


def kill_group(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """The worker and its pool's children, as a machine loss takes them."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
    process.wait(timeout=20)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            kill_group(process)


def wait_for_backends_to_end(app_name: str, timeout: float = 10.0) -> None:
    """The PostgreSQL backends of a stopped process (``PGAPPNAME=app_name``) outlive it by a
    moment; the test database cannot be dropped at the end of the session while they are there."""
    deadline = time.monotonic() + timeout
    with connection.cursor() as cursor:
        while time.monotonic() < deadline:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = %s",
                [app_name],
            )
            if cursor.fetchone()[0] == 0:
                return
            time.sleep(0.1)
