"""Issue 21, item 12: Redis stopped while agents poll the policy. Each web process keeps its
copy of the policy with its ETag and serves it while Redis is down, quickly and saying so
(``X-MetaClaw-Policy-Stale``), instead of rebuilding it and waiting on Redis every time."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests import factories
from tests.faults import procs
from tests.faults.test_postgres_down import _request

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


def test_the_policy_is_served_from_the_process_copy_while_redis_is_down(project, tmp_path):
    redis, redis_url = procs.start_redis(tmp_path)
    key = factories.make_key(project, ["runtime"])
    factories.make_revision(project)  # something in the policy
    env = {**os.environ, **procs.process_env(redis_url)}
    port = procs.free_port()
    log = open(tmp_path / "web.log", "w")  # noqa: SIM115 - closed with the process
    web = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "metaclaw_site.asgi:application", "--host",
         "127.0.0.1", "--port", str(port), "--lifespan", "off", "--no-access-log"],
        cwd=procs.ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/api/v1/runtime/policy"
    try:
        deadline = time.monotonic() + 60
        while (first := _request(url, None, key))[0] != 200:
            assert time.monotonic() < deadline, (tmp_path / "web.log").read_text()[-3000:]
            time.sleep(0.2)
        etag = first[1]["ETag"]
        assert "X-MetaClaw-Policy-Stale" not in first[1]

        redis.terminate()  # a plain child (not a process group of its own)
        redis.wait(timeout=10)
        time.sleep(1)  # the process's syncer (every 0.25 s) notices the outage
        answers = [_request(url, None, key) for _ in range(20)]
        statuses = [a[0] for a in answers]
        took = sorted(a[3] for a in answers)
        print(
            f"\nRedis down: {statuses.count(200)}/20 policy answers 200, same ETag "
            f"{all(a[1].get('ETag') == etag for a in answers)}, p50 {took[10] * 1000:.0f} ms, "
            f"slowest {took[-1] * 1000:.0f} ms"
        )
        assert statuses == [200] * 20
        assert all(a[1]["ETag"] == etag for a in answers)
        stale = [a[1].get("X-MetaClaw-Policy-Stale") for a in answers]
        assert stale == ["redis-unavailable"] * 20, (tmp_path / "web.log").read_text()[-2000:]
        assert took[10] < 0.5  # not waiting on Redis's timeout on every request
    finally:
        procs.stop(web)
        log.close()
        if redis.poll() is None:
            redis.terminate()
            redis.wait(timeout=10)
