"""A Redis Cluster for the cache and the counters (docs/deploy.md): three redis-server nodes of
our own in cluster mode, two web nodes and two fast workers with ``METACLAW_REDIS_CLUSTER=1``, and
the broker on a plain Redis (a cluster cannot be Celery's broker). With a plain client the
cache's writes to the other nodes' slots failed (MOVED), the rate-limit counts never reached
Redis (each node let through its own ten) and the traffic figures raised CROSSSLOT."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from redis.cluster import RedisCluster

from base.models import Project
from incidents.models import IncidentGroup, SynthesisStatus
from tests import factories
from tests.fakes.openai_server import OpenAIServer
from tests.faults import procs
from tests.test_scale_out import (
    NODE_APP_NAME,
    _answer_for_its_group,
    _cluster_env,
    _start_cluster,
    _stop,
    _wait_until_listening,
)

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

NODES = 3


def _port_with_a_bus_port() -> int:
    """A free port whose cluster bus port (10,000 above it) is free too."""
    while True:
        port = procs.free_port()
        if port + 10_000 > 65_535:
            continue
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port + 10_000)) != 0:
                return port


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    """Three primaries sharing the 16,384 slots, no replicas."""
    folder = tmp_path_factory.mktemp("redis-cluster")
    ports = [_port_with_a_bus_port() for _ in range(NODES)]
    servers = [
        subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(folder),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{port}.conf",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for port in ports
    ]
    try:
        for port in ports:
            _wait_until_listening(port, [])
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while any(
            b"cluster_state:ok" not in subprocess.run(
                ["redis-cli", "-p", str(p), "cluster", "info"], capture_output=True, timeout=5
            ).stdout
            for p in ports
        ):  # fmt: skip
            assert time.monotonic() < deadline, "the cluster did not come up"
            time.sleep(0.2)
        yield {"url": f"redis://127.0.0.1:{ports[0]}/0", "ports": ports}
    finally:
        for server in servers:
            server.terminate()  # plain children (not process groups of their own)
            server.wait(timeout=10)


@pytest.fixture(scope="module")
def nodes_on_the_cluster(django_db_setup, django_db_blocker, tmp_path_factory, redis_cluster):
    """The scale-out test's two web nodes and two workers, on the cluster; the broker on a
    plain Redis of its own."""
    logs = tmp_path_factory.mktemp("redis-cluster-nodes")
    broker, broker_url = procs.start_redis(logs)
    try:
        with OpenAIServer(default=_answer_for_its_group, model="loopback-model") as llm:
            env = _cluster_env(
                llm, redis_cluster["url"], METACLAW_REDIS_CLUSTER=1, CELERY_BROKER_URL=broker_url
            )
            started = _start_cluster(logs, env)
            try:
                yield {**started, "llm": llm}
            finally:
                _stop(started["nodes"])
    finally:
        broker.terminate()  # a plain child (not a process group of its own)
        broker.wait(timeout=10)
        with django_db_blocker.unblock():
            procs.wait_for_backends_to_end(NODE_APP_NAME)


def _send(url: str, payload: dict, key: str) -> int:
    request = urllib.request.Request(
        url + "/api/v1/incidents",
        data=json.dumps(payload).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_cache_and_the_counters_work_on_a_redis_cluster(
    project: Project, redis_cluster, nodes_on_the_cluster
):
    urls = nodes_on_the_cluster["urls"]
    project.rate_limit_per_minute = 10
    project.save(update_fields=["rate_limit_per_minute"])
    key = factories.make_key(project, ["ingest"])
    while time.time() % 60 > 40:  # all requests in one minute of the limit
        time.sleep(0.5)
    statuses = []
    for n in range(15):
        # Two web nodes in turn: each adds its counts to the cluster and reads the totals back
        # every 0.25 s, so requests two flushes apart see each other's counts.
        payload = factories.incident_payload(
            f"cluster-{n}", error={"type": f"Error{n % 3}", "message": f"failure mode {n % 3}"}
        )
        statuses.append(_send(urls[n % 2], payload, key))
        time.sleep(0.6)
    assert sorted(statuses) == [202] * 10 + [429] * 5, statuses

    # Every group the accepted incidents made is proposed by the worker (the PII cache on the
    # cluster, the broker on its plain Redis).
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        groups = list(IncidentGroup.objects.values_list("synthesis_status", flat=True))
        if groups and all(s == SynthesisStatus.PROPOSED for s in groups):
            break
        time.sleep(0.3)
    else:
        pytest.fail(
            f"groups: {groups}\n" + "\n".join(n.tail() for n in nodes_on_the_cluster["nodes"])
        )

    # The counts reached the cluster: the key's 15 requests, and the project's traffic, which
    # the idle detection reads back over several minutes' keys (on several slots).
    cluster = RedisCluster.from_url(redis_cluster["url"])
    deadline = time.monotonic() + 5
    while True:
        rate_keys = list(cluster.scan_iter(match="metaclaw:rate:*", target_nodes="primaries"))
        counted = [int(cluster.get(k) or 0) for k in rate_keys]
        if counted == [15] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert counted == [15], rate_keys
    check = subprocess.run(
        [sys.executable, "-c",
         "import django; django.setup(); from base import counters; "
         f"print(sum(counters.traffic_per_minute(project_id={project.pk}, minutes=5)))"],
        env={**os.environ, **procs.process_env(
            redis_cluster["url"], METACLAW_REDIS_CLUSTER=1, CELERY_BROKER_URL="redis://x"
        )},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr[-3000:]
    assert int(check.stdout.split()[-1]) >= 15
    # Keys live on more than one node (so the cluster, not one node, answered), and no node
    # logged a failed Redis call.
    per_node = [
        int(subprocess.run(["redis-cli", "-p", str(p), "dbsize"], capture_output=True).stdout)
        for p in redis_cluster["ports"]
    ]
    assert sum(n > 0 for n in per_node) >= 2, per_node
    for node in nodes_on_the_cluster["nodes"]:
        log = node.log_path.read_text()
        assert "Traceback" not in log and "Could not" not in log, node.tail()


def test_a_redis_cluster_without_a_broker_of_its_own_is_refused_at_start():
    done = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        env={
            **{k: v for k, v in os.environ.items() if k != "CELERY_BROKER_URL"},
            "DJANGO_SETTINGS_MODULE": "metaclaw_site.settings",
            "SECRET_KEY": "a-secret-for-this-test-only",
            "REDIS_URL": "redis://127.0.0.1:7000/0",
            "METACLAW_REDIS_CLUSTER": "1",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "a Redis Cluster cannot be Celery's broker" in done.stderr
    assert "CELERY_BROKER_URL" in done.stderr


def test_the_cluster_cache_spreads_keys_and_splits_each_multi_key_call_by_slot(redis_cluster):
    from base.redis_cluster import RedisClusterCache

    cache = RedisClusterCache(redis_cluster["url"], {"KEY_PREFIX": "t", "OPTIONS": {}})
    names = [f"key-{n}" for n in range(30)]  # on all three nodes' slots
    cache.set_many({name: {"n": n} for n, name in enumerate(names)}, 60)
    assert cache.get_many([*names, "absent"]) == {name: {"n": n} for n, name in enumerate(names)}
    assert cache.get("key-7") == {"n": 7}
    assert cache.add("counter", 5) and cache.incr("counter", 2) == 7
    cache.delete_many(names[:20])
    assert sorted(cache.get_many(names)) == sorted(names[20:])
    cache.set_many({"gone": 1}, 0)  # Django's timeout 0: expire at once
    assert cache.get("gone") is None
    cache.clear()
    assert cache.get_many(names) == {} and cache.get("counter") is None


def _manage_check(**settings: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CELERY_BROKER_URL",)}
    env.update(DJANGO_SETTINGS_MODULE="metaclaw_site.settings", SECRET_KEY="x" * 50, **settings)
    return subprocess.run(
        [sys.executable, str(procs.ROOT / "manage.py"), "check"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_manage_py_check_says_when_the_setting_and_the_redis_server_disagree(redis_cluster):
    # A cluster node without the setting: silent at run time, so refused before migrating.
    plain_client = _manage_check(REDIS_URL=redis_cluster["url"], METACLAW_REDIS_CLUSTER="0")
    assert plain_client.returncode != 0
    assert "metaclaw.E001" in plain_client.stderr and "METACLAW_REDIS_CLUSTER=1" in (
        plain_client.stderr
    )
    # The setting on a plain Redis; the message names the server, never its password.
    not_a_cluster = _manage_check(
        REDIS_URL=procs.suite_redis_url().replace("redis://", "redis://:a-password@", 1),
        METACLAW_REDIS_CLUSTER="1",
        CELERY_BROKER_URL=procs.suite_redis_url(),
    )
    assert not_a_cluster.returncode != 0 and "metaclaw.E002" in not_a_cluster.stderr
    assert "a-password" not in not_a_cluster.stderr
    # Both agree.
    agreed = _manage_check(
        REDIS_URL=redis_cluster["url"],
        METACLAW_REDIS_CLUSTER="1",
        CELERY_BROKER_URL=procs.suite_redis_url(),
    )
    assert agreed.returncode == 0, agreed.stderr
    assert "no issues" in agreed.stdout
