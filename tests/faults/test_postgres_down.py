"""Issue 21, item 11: PostgreSQL stopped for 10 s under a steady ingest, on a private
PostgreSQL (initdb on a port and folder of its own), MetaClaw under uvicorn as in production.
While it is down, ingest answers 503 with Retry-After within 2 s, /healthz and /readyz answer
503 within 1 s naming the database and /livez 200 within 1 s; afterwards the web process recovers by itself; every incident that
was acknowledged is stored, and no group is left running."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest

from tests.faults import procs

pytestmark = pytest.mark.worker

ROOT = Path(__file__).resolve().parents[2]
PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)


def _as_postgres(*command: str) -> None:
    runner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run([*runner, *command], check=True, capture_output=True)


class PrivatePostgres:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data = folder / "data"
        self.port = procs.free_port()
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o755)
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
        _as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U",
                     "postgres", "--no-sync")  # fmt: skip
        self.start()
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE metaclaw")

    def url(self, name: str = "metaclaw") -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{name}"

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off"
        )
        _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options, "-w",
                     "-l", str(self.folder / "postgres.log"), "start")  # fmt: skip

    def stop(self) -> None:
        _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")


def _request(url: str, body: dict | None, key: str, timeout: float = 10.0):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method="POST" if data else "GET",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )  # fmt: skip
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, headers, payload = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, headers, payload = error.code, error.headers, error.read()
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        return 0, {}, str(error).encode(), time.monotonic() - started
    return status, headers, payload, time.monotonic() - started


@pytest.mark.skipif(PG_BIN is None, reason="no PostgreSQL server binaries on this machine")
def test_postgres_stopped_for_ten_seconds_answers_503_fast_and_loses_nothing(tmp_path):
    # Not under pytest's tmp_path: its folders are the test runner's alone, and the server runs
    # as the postgres user.
    pg_folder = Path(tempfile.mkdtemp(prefix="metaclaw-faults-pg-"))
    postgres = PrivatePostgres(pg_folder)
    redis, redis_url = procs.start_redis(tmp_path)
    env = {**os.environ, **procs.process_env(redis_url, database_url=postgres.url())}
    web = None
    try:
        manage = [sys.executable, "manage.py"]
        subprocess.run([*manage, "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True)
        subprocess.run([*manage, "create_project", "Faults"], cwd=ROOT, env=env, check=True,
                       capture_output=True)  # fmt: skip
        key = subprocess.run(
            [*manage, "create_api_key", "faults", "ingest", "--scope", "ingest"],
            cwd=ROOT, env=env, check=True, capture_output=True, text=True,
        ).stdout.strip().splitlines()[-1]  # fmt: skip
        port = procs.free_port()
        log = open(tmp_path / "web.log", "w")  # noqa: SIM115 - closed below
        web = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "metaclaw_site.asgi:application", "--host",
             "127.0.0.1", "--port", str(port), "--lifespan", "off", "--no-access-log"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while _request(base + "/healthz?probe=live", None, key)[0] != 200:
            assert time.monotonic() < deadline, (tmp_path / "web.log").read_text()[-3000:]
            time.sleep(0.2)

        results: list[tuple[str, int, float, float]] = []  # client id, status, sent at, took
        stop_sending = threading.Event()

        def send() -> None:
            n = 0
            while not stop_sending.is_set():
                client_id = f"pg-{n}"
                sent = time.monotonic()
                body = {"id": client_id, "agent": {"name": "bot"}, "kind": "tool_error",
                        "error": {"type": f"E{n % 5}", "message": "boom"}}  # fmt: skip
                status, _, _, took = _request(base + "/api/v1/incidents", body, key)
                results.append((client_id, status, sent, took))
                n += 1
                time.sleep(0.1)

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(3)
        down_at = time.monotonic()
        postgres.stop()
        time.sleep(2)
        health = _request(base + "/healthz", None, key)
        live = _request(base + "/livez", None, key)
        ready = _request(base + "/readyz", None, key)
        time.sleep(8)
        postgres.start()
        up_at = time.monotonic()
        time.sleep(8)
        stop_sending.set()
        sender.join()

        during = [r for r in results if down_at + 1 <= r[2] < up_at - 0.5]
        refused = [r for r in during if r[1] == 503]
        after = [r for r in results if r[2] >= up_at + 5]
        acknowledged = {r[0] for r in results if r[1] in (200, 202)}
        slowest_refusal = max((r[3] for r in refused), default=0.0)
        print(
            f"\nPostgreSQL down 10 s: {len(results)} sent, {len(acknowledged)} acknowledged, "
            f"{len(refused)}/{len(during)} refused 503 while down (slowest {slowest_refusal:.2f} s),"
            f" /healthz {health[0]} in {health[3]:.2f} s, /livez {live[0]} in {live[3]:.3f} s,"
            f" /readyz {ready[0]} in {ready[3]:.2f} s, after restart "
            f"{sum(r[1] in (200, 202) for r in after)}/{len(after)} accepted"
        )
        assert during and len(refused) == len(during), sorted({r[1] for r in during})
        assert slowest_refusal <= 2.0
        assert health[0] == 503 and health[3] <= 1.0 and b"database" in health[2]
        # Liveness asks nothing of the database: a restart would not help, so it stays 200.
        assert live[0] == 200 and live[3] <= 1.0, live
        assert ready[0] == 503 and ready[3] <= 1.0 and b"database" in ready[2], ready
        assert ready[1].get("Retry-After"), ready[1]
        assert after and all(r[1] in (200, 202) for r in after)  # recovered by itself
        with psycopg.connect(postgres.url()) as conn:
            stored = {row[0] for row in conn.execute("SELECT client_id FROM incidents_incident")}
            running = conn.execute(
                "SELECT count(*) FROM incidents_incidentgroup WHERE synthesis_status = 'running'"
            ).fetchone()[0]
        assert acknowledged <= stored
        assert running == 0
    finally:
        if web is not None:
            procs.stop(web)
        if redis.poll() is None:
            redis.terminate()  # a plain child (not a process group of its own)
            redis.wait(timeout=10)
        try:
            postgres.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(pg_folder, ignore_errors=True)


def test_django_door_answers_livez_without_the_database_and_readyz_with_it(
    client, transactional_db, django_assert_num_queries
):
    """The same paths on Django's door (WSGI, the test client): the ASGI fast lane answers
    /livez before Django, and the test above stops PostgreSQL under it."""
    with django_assert_num_queries(0):
        live = client.get("/livez")
        old_live = client.get("/healthz?probe=live")
    assert live.status_code == old_live.status_code == 200
    assert live.json() == old_live.json() == {"ok": True, "probe": "live"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.content
    assert ready.json()["checks"] == {"database": "ok", "redis": "ok"}
    assert client.get("/healthz").json() == ready.json()
