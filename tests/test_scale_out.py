"""Scale-out: two web nodes and two fast workers, each a process group of its own on its own
port, against one PostgreSQL and one Redis (docs/deploy.md). Incidents sent to either node in
parallel are all stored, every group is synthesised exactly once, and an API key's rate limit
holds across the nodes (their counts meet in Redis)."""

from __future__ import annotations

import json
import re
import socket
import sys
import time
import urllib.error
import urllib.request
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


@pytest.fixture(scope="module")
def cluster(django_db_setup, django_db_blocker, tmp_path_factory):
    from base.counters import redis_client

    redis_client().flushdb()  # no stale task messages or counts from an earlier run
    logs = tmp_path_factory.mktemp("scale-out")
    llm = OpenAIServer(default=_answer_for_its_group, model="loopback-model")
    llm.__enter__()
    env = procs.process_env(
        procs.suite_redis_url(),
        llm=llm,
        METACLAW_OUTBOX_SWEEP_AFTER_SECONDS=0,
        ALLOWED_HOSTS="127.0.0.1,localhost",
        PGAPPNAME=NODE_APP_NAME,
    )
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
        yield {"urls": [f"http://127.0.0.1:{p}" for p in ports], "nodes": nodes, "llm": llm}
    finally:
        for node in nodes:
            node.stop()
        llm.__exit__(None, None, None)
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
