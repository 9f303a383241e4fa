"""Processes the fault tests start on ports and in folders of their own (Redis, Celery workers),
so stopping or killing them disturbs nothing else on the machine."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from django.db import connection

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_database_url() -> str:
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


def start_worker(env: dict[str, str], folder: Path, name: str, concurrency: int = 4):
    """A fast-queue worker with the beat inside it (-B), as a small deployment runs it."""
    log = open(folder / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "metaclaw_site", "worker", "-B",
         "-s", str(folder / f"{name}-beat-schedule"), "-Q", "fast", "-P", "prefork",
         "-c", str(concurrency), "--without-gossip", "--without-mingle", "--without-heartbeat",
         "-n", f"{name}@%h", "-l", "INFO"],
        cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


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
