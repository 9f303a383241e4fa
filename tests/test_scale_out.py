"""Scale-out: two web nodes and two fast workers, each a process group of its own on its own
port, against one PostgreSQL and one Redis (docs/deploy.md). Incidents sent to either node in
parallel are all stored, every group is synthesised exactly once, and an API key's rate limit
holds across the nodes (their counts meet in Redis).

The same nodes again behind PgBouncer in transaction mode (``METACLAW_PGBOUNCER=1``), with two
server connections for all of them, so that each transaction may run on another server
connection than the one before: what a deployment with hundreds of processes does."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from incidents.models import Incident, IncidentGroup, SynthesisStatus
from skills.library.models import SkillRevision
from tests import factories
from tests.fakes.openai_server import OpenAIServer, Reply
from tests.faults import procs
from tests.test_worker import ANSWER

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

NODE_APP_NAME = "metaclaw-test-worker"  # the name whose backends the teardown waits out


class Node:
    """One process group (a web server or a worker), logging to a file."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.log_path = logs / f"{name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = procs.start(command, env, self._log)

    def stop(self) -> None:
        procs.stop(self.process)
        self._log.close()

    def tail(self) -> str:
        return f"--- {self.name}\n" + self.log_path.read_text()[-2000:]


def _wait_until_listening(port: int, nodes: list[Node], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail("A web node did not start.\n" + "\n".join(n.tail() for n in nodes))


def _start_cluster(logs: Path, env: dict[str, str]) -> dict:
    """Two web nodes (uvicorn) and two fast workers (prefork, one child each)."""
    ports = [procs.free_port(), procs.free_port()]
    nodes: list[Node] = []
    for i, port in enumerate(ports):
        nodes.append(
            Node(
                f"web-{i}",
                [sys.executable, "-m", "uvicorn", "metaclaw_site.asgi:application",
                 "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
                 "--lifespan", "off"],
                env,
                logs,
            )
        )  # fmt: skip
    for i in range(2):
        nodes.append(
            Node(
                f"worker-{i}",
                [sys.executable, "-m", "celery", "-A", "metaclaw_site", "worker", "-Q", "fast",
                 "-P", "prefork", "-c", "1", "-n", f"fast{i}@%h", "--without-gossip",
                 "--without-mingle", "--without-heartbeat", "-l", "INFO"],
                env,
                logs,
            )
        )  # fmt: skip
    try:
        for port in ports:
            _wait_until_listening(port, nodes)
    except BaseException:
        _stop(nodes)
        raise
    return {"urls": [f"http://127.0.0.1:{p}" for p in ports], "nodes": nodes}


def _stop(nodes: list[Node]) -> None:
    for node in nodes:
        node.stop()


def _cluster_env(
    llm: OpenAIServer, redis_url: str, database_url: str = "", **settings: object
) -> dict:
    return procs.process_env(
        redis_url,
        database_url=database_url,
        llm=llm,
        METACLAW_OUTBOX_SWEEP_AFTER_SECONDS=0,
        ALLOWED_HOSTS="127.0.0.1,localhost",
        PGAPPNAME=NODE_APP_NAME,
        **settings,
    )


@pytest.fixture(scope="module")
def cluster(django_db_setup, django_db_blocker, tmp_path_factory):
    from base.counters import redis_client

    redis_client().flushdb()  # no stale task messages or counts from an earlier run
    logs = tmp_path_factory.mktemp("scale-out")
    with OpenAIServer(default=_answer_for_its_group, model="loopback-model") as llm:
        started = _start_cluster(logs, _cluster_env(llm, procs.suite_redis_url()))
        try:
            yield {**started, "llm": llm}
        finally:
            _stop(started["nodes"])
            with django_db_blocker.unblock():
                procs.wait_for_backends_to_end(NODE_APP_NAME)


PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


class PgBouncer:
    """A private PgBouncer in transaction mode in front of the suite's PostgreSQL, with
    ``server_connections`` server connections for all its clients. As root it drops to the
    postgres user (PgBouncer refuses to run as root)."""

    def __init__(self, database_url: str, server_connections: int = 2) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="metaclaw-pgbouncer-"))
        self.folder.chmod(0o755)  # readable by the user it runs as
        self.port = procs.free_port()
        server = urllib.parse.urlsplit(database_url)
        (self.folder / "userlist.txt").write_text(f'"{server.username}" ""\n')
        (self.folder / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={server.hostname} port={server.port or 5432}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.folder / 'userlist.txt'}\n"
            f"pool_mode = transaction\ndefault_pool_size = {server_connections}\n"
            "max_client_conn = 500\n"
        )
        self.url = server._replace(netloc=f"{server.username}@127.0.0.1:{self.port}").geturl()
        self.log_path = self.folder / "pgbouncer.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        as_postgres = ["-u", "postgres"] if os.geteuid() == 0 else []
        self.process = subprocess.Popen(
            [PGBOUNCER, *as_postgres, str(self.folder / "pgbouncer.ini")],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            assert self.process.poll() is None and time.monotonic() < deadline, self.log()
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text()[-3000:]

    def stop(self) -> None:
        procs.stop(self.process)
        self._log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster_behind_pgbouncer(django_db_setup, django_db_blocker, tmp_path_factory):
    if not os.path.exists(PGBOUNCER):
        message = f"no PgBouncer at {PGBOUNCER} (apt-get install -y pgbouncer)"
        if os.environ.get("METACLAW_REQUIRE_PGBOUNCER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    logs = tmp_path_factory.mktemp("scale-out-pgbouncer")
    # A Redis of its own: the other cluster's workers, still up, must not take its tasks.
    redis, redis_url = procs.start_redis(logs)
    with django_db_blocker.unblock():
        bouncer = PgBouncer(procs.test_database_url())
    try:
        with OpenAIServer(default=_answer_for_its_group, model="loopback-model") as llm:
            env = _cluster_env(llm, redis_url, database_url=bouncer.url, METACLAW_PGBOUNCER=1)
            started = _start_cluster(logs, env)
            try:
                yield {**started, "llm": llm, "pgbouncer": bouncer}
            finally:
                _stop(started["nodes"])
    finally:
        bouncer.stop()  # its server connections end with it
        redis.terminate()  # a plain child (not a process group of its own)
        redis.wait(timeout=10)
        with django_db_blocker.unblock():
            procs.wait_for_backends_to_end(NODE_APP_NAME)


def _answer_for_its_group(body: dict) -> Reply:
    """A skill of its own for each group (the prompt names the group's error type)."""
    prompt = json.dumps(body.get("messages", []))
    match = re.search(r"Error(\d+)", prompt)
    answer = json.loads(ANSWER)
    if match:
        answer["skill"]["slug"] = f"fix-failure-mode-{match.group(1)}"
        answer["skill"]["instructions"] += f" (failure mode {match.group(1)})"
    return Reply(content=json.dumps(answer), delay=0.2)


def _post(url: str, path: str, body: dict, key: str) -> tuple[int, dict]:
    request = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_two_web_nodes_and_two_workers_lose_nothing_and_synthesise_each_group_once(
    project, cluster
):
    _lose_nothing_and_synthesise_each_group_once(project, cluster)


def test_behind_pgbouncer_in_transaction_mode_they_lose_nothing_and_synthesise_once(
    project, cluster_behind_pgbouncer
):
    cluster = cluster_behind_pgbouncer
    _lose_nothing_and_synthesise_each_group_once(project, cluster)
    # Nothing a node did needed a session: no error in any node's log, nor in PgBouncer's.
    for node in cluster["nodes"]:
        log = node.log_path.read_text()
        assert "Traceback" not in log and "ERROR" not in log, node.tail()
    bouncer_log = cluster["pgbouncer"].log()
    assert "ERROR" not in bouncer_log and "WARNING" not in bouncer_log, bouncer_log
    # Reads go through it too, many at once over its two server connections: the group list,
    # and the library export, which reads the bundled files with a cursor (on PostgreSQL
    # directly a server-side one, whose FETCH could reach a server connection without it).
    admin = factories.make_key(project, ["admin"])

    def read(n: int) -> tuple[int, int]:
        url = cluster["urls"][n % 2]
        headers = {"Authorization": f"Bearer {admin}"}
        request = urllib.request.Request(url + "/api/v1/groups", headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            groups = len(json.loads(response.read())["items"])
        request = urllib.request.Request(url + "/api/v1/skills/export", headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            with zipfile.ZipFile(io.BytesIO(response.read())) as archive:
                return groups, sum(name.endswith("/SKILL.md") for name in archive.namelist())

    skills = SkillRevision.objects.values("skill").distinct().count()  # some were merged
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert set(pool.map(read, range(40))) == {(12, skills)}


def _lose_nothing_and_synthesise_each_group_once(project, cluster) -> None:
    key = factories.make_key(project, ["ingest"])
    groups, per_group = 12, 4
    items = [
        factories.incident_payload(
            f"node-{g}-{n}", error={"type": f"Error{g}", "message": f"failure mode {g}"}
        )
        for g in range(groups)
        for n in range(per_group)
    ]
    urls = cluster["urls"]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(
            pool.map(
                lambda pair: _post(urls[pair[0] % 2], "/api/v1/incidents", pair[1], key),
                enumerate(items),
            )
        )
    acknowledged = [body["client_id"] for status, body in answers if status in (200, 202)]
    assert len(acknowledged) == len(items), answers

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        statuses = list(IncidentGroup.objects.values_list("synthesis_status", flat=True))
        if len(statuses) == groups and all(s == SynthesisStatus.PROPOSED for s in statuses):
            break
        time.sleep(0.3)
    else:
        pytest.fail(
            "Not every group was proposed: "
            + repr(list(IncidentGroup.objects.values_list("synthesis_status", "synthesis_error")))
        )
    elapsed = time.monotonic() - started
    stored = set(Incident.objects.values_list("client_id", flat=True))
    assert stored == set(acknowledged)
    proposals = SkillRevision.objects.filter(source_groups__isnull=False)
    per_group_proposals = [
        proposals.filter(source_groups=group).count() for group in IncidentGroup.objects.all()
    ]
    assert per_group_proposals == [1] * groups
    workers_used = [
        node.name
        for node in cluster["nodes"]
        if node.name.startswith("worker") and "succeeded" in node.log_path.read_text()
    ]
    print(
        f"\nscale-out: {len(items)} incidents over 2 web nodes, {groups} groups over 2 workers: "
        f"{len(stored)} stored, {len(per_group_proposals)} groups proposed once each, "
        f"{len(cluster['llm'].chat_requests())} LLM calls, workers that ran tasks: "
        f"{workers_used}, {elapsed:.1f} s"
    )
    assert len(cluster["llm"].chat_requests()) == groups


def test_a_keys_rate_limit_holds_across_web_nodes(project, cluster):
    project.rate_limit_per_minute = 10
    project.save(update_fields=["rate_limit_per_minute"])
    key = factories.make_key(project, ["ingest"])
    urls = cluster["urls"]
    # The limit counts per minute: start where the run cannot cross into the next one.
    while time.time() % 60 > 40:
        time.sleep(0.5)
    statuses = []
    for n in range(24):
        # Each node counts in process, adds its counts to Redis and reads the totals back every
        # 0.25 s: requests two flushes apart see each other's counts, whichever node they reach.
        status, _ = _post(
            urls[n % 2], "/api/v1/incidents", factories.incident_payload(f"rl-{n}"), key
        )
        statuses.append(status)
        time.sleep(0.6)
    accepted = sum(status in (200, 202) for status in statuses)
    limited = statuses.count(429)
    print(f"\nrate limit 10/min across 2 nodes: {accepted} accepted, {limited} refused (429)")
    assert accepted == 10 and limited == 14
