"""Shared pieces of the benchmarks: a PostgreSQL database of their own, a throwaway project in
it, the words their generated support traffic is made of, a production server started as a
subprocess (and stopping one), and a low-overhead asyncio HTTP/1.1 load generator (the client
runs on the same 2 cores as the server, so it must cost as little CPU as possible)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def bench_env(db_name: str, redis_db: int = 9) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DATABASE_URL", f"postgres://postgres@127.0.0.1:5432/{db_name}")
    env.setdefault("REDIS_URL", f"redis://127.0.0.1:6379/{redis_db}")
    env.setdefault("SECRET_KEY", "benchmark-secret-key-not-for-production-use-0123456789")
    env["DJANGO_SETTINGS_MODULE"] = "metaclaw_site.settings"
    env.setdefault("ALLOWED_HOSTS", "127.0.0.1,localhost")
    env.setdefault("LOG_LEVEL", "WARNING")
    env["METACLAW_RATE_LIMIT_PER_MINUTE"] = "100000000"
    return env


def ensure_database(env: dict[str, str], *, fresh: bool = False) -> None:
    """Create and migrate the benchmark's own database. ``fresh`` drops it first, so that a
    run does not measure the tables and indexes every earlier run left behind (the machines
    here run PostgreSQL without autovacuum, which makes that history weigh even more)."""
    import psycopg

    server, name = env["DATABASE_URL"].rsplit("/", 1)
    if fresh and not name.startswith("metaclaw_bench"):
        raise SystemExit(
            f"Refusing to drop {name!r}: a benchmark starts afresh only in a database whose "
            "name begins with metaclaw_bench."
        )
    # The server of DATABASE_URL, through its maintenance database.
    admin = server.replace("postgres://", "postgresql://", 1) + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        if fresh:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=ROOT,
        env=env,
        check=True,
    )


def django_setup(env: dict[str, str]) -> None:
    os.environ.update(env)
    import django

    django.setup()


def django_ready(db_name: str, redis_db: int = 9, *, fresh: bool = False) -> dict[str, str]:
    """For a benchmark that runs MetaClaw's code in its own process: its environment
    (``bench_env``), its database created and migrated (``ensure_database``), Django set up."""
    env = bench_env(db_name, redis_db)
    ensure_database(env, fresh=fresh)
    django_setup(env)
    return env


@contextmanager
def throwaway_project(name: str) -> Iterator:
    """A new project named ``name`` and a random suffix, deleted with all it holds at the end."""
    from base.models import Project
    from metaclaw_site.projects import project_create
    from skills.versions.models import Release

    project = project_create(name=f"{name} {uuid.uuid4().hex[:8]}")
    try:
        yield project
    finally:
        Release.objects.filter(project=project).delete()  # releases protect their versions
        Project.objects.filter(pk=project.pk).delete()


# The words of the support questions and answers that the dataset benchmarks generate.
NOUNS = (
    "invoice refund password webhook export invitation billing token domain backup alert "
    "dashboard report quota region bucket log metric trace queue schedule reminder calendar "
    "contact payment subscription discount coupon tax shipment return warranty repair upgrade "
    "migration archive cluster node replica snapshot certificate firewall route gateway"
).split()
VERBS = "reset download renew rotate delete restore move export import enable disable".split()
PLACES = "Settings Billing Security Members Data Webhooks Integrations Admin Console".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, command: list[str], env: dict[str, str], port: int) -> None:
        self.command, self.env, self.port = command, env, port
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        self.process = subprocess.Popen(
            self.command, cwd=ROOT, env=self.env, start_new_session=True
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"server did not start: {' '.join(self.command)}")

    def __exit__(self, *exc: object) -> None:
        if self.process:
            stop(self.process, timeout=10, group=True)


def stop(process: subprocess.Popen, *, timeout: float, group: bool = False) -> None:
    """SIGTERM, then SIGKILL if it has not ended within ``timeout`` seconds. ``group``: the
    signals go to its whole process group (one started with ``start_new_session``, so that a
    server's forked workers stop with it)."""
    if process.poll() is not None:
        return

    def send(sig: int) -> None:
        if group:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)

    send(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        process.wait()


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    elapsed: float = 0.0

    def pct(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(round(p / 100 * (len(data) - 1))))] * 1000

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) * 1000 if self.latencies else float("nan")


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """``(status, body, server_closes)`` of one HTTP/1.1 response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    chunked = False
    closes = False
    for line in lines[1:]:
        lower = line.lower()
        if lower.startswith(b"connection:") and b"close" in lower:
            closes = True
        if lower.startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
        elif lower.startswith(b"transfer-encoding:") and b"chunked" in lower:
            chunked = True
    if chunked:
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
        return status, body, closes
    return status, (await reader.readexactly(length) if length else b""), closes


def build_request(method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def run_load(
    port: int,
    make_request: Callable[[int, int], bytes],
    *,
    concurrency: int,
    duration: float,
    warmup: float = 1.0,
) -> LoadResult:
    """``concurrency`` keep-alive connections, each sending requests back to back for
    ``duration`` seconds after ``warmup``. ``make_request(worker, i)`` builds raw request bytes."""
    result = LoadResult()
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + duration

    async def worker(n: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = 0
        closes = False
        try:
            while True:
                request = make_request(n, i)
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    break
                if closes:  # the server does not keep connections alive
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                await writer.drain()
                status, _, closes = await _read_response(reader)
                t1 = time.perf_counter()
                i += 1
                if t0 >= measure_from:
                    result.latencies.append(t1 - t0)
                    result.statuses[status] = result.statuses.get(status, 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    result.elapsed = time.perf_counter() - measure_from
    return result


def backend_cpu_clock(connection) -> Callable[[], float]:
    """A clock of the CPU seconds (user + system) that the PostgreSQL backend serving Django's
    ``connection`` has used, read from ``/proc``: the server runs on this machine."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (backend,) = cursor.fetchone()

    def clock() -> float:
        with open(f"/proc/{backend}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    return clock


def median_spread(values: list[float]) -> tuple[float, float, float]:
    """``(median, min, max)`` of several runs' figures."""
    return statistics.median(values), min(values), max(values)
