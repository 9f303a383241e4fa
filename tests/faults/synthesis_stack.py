"""What the synthesis fault tests share: the skill our loopback LLM proposes, and the stack they
run synthesis on (a private Redis, the loopback LLM, a fast worker with its beat, and this
process publishing ``propose_skill`` to that Redis)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

import pytest
from kombu import Connection

from metaclaw_site.celery import app as celery_app
from skills.synthesis import tasks
from tests import factories
from tests.fakes.openai_server import OpenAIServer, Reply, skill_answer
from tests.faults import procs


def iso_dates_reply(slug: str, name: str, case: str = "", delay: float = 0.0) -> Reply:
    """The LLM's answer: a new skill ``slug`` about ISO dates; ``case``, when given, is written
    into its texts so that each answer is a skill of its own, not a near copy of another one."""
    about = f" ({case})" if case else ""
    return Reply(
        delay=delay,
        content=skill_answer(
            diagnosis=f"The agent passed a relative date where a tool needs ISO 8601{about}.",
            slug=slug,
            name=name,
            description=f"When a tool needs an ISO 8601 date{about}.",
            instructions=f"Convert relative dates to ISO 8601 (YYYY-MM-DD) first{about}.",
        ),
    )


def ingest_failure_modes(api, key: str, count: int) -> None:
    """One incident in each of ``count`` failure modes (agents ``agent-0``…, errors
    ``Failure0Error``…): ``count`` new groups, each waiting for a synthesis."""
    for n in range(count):
        payload = factories.incident_payload(
            agent={"name": f"agent-{n}", "version": "1.0"},
            error={"type": f"Failure{n}Error", "message": f"failure mode {n}"},
        )
        assert api.post("/api/v1/incidents", payload, key=key).status_code in (200, 202)


@dataclass
class Stack:
    llm: OpenAIServer
    env: dict[str, str]  # the worker's: start another one with it
    worker: Popen  # the one ``synthesis_stack`` stops
    redis: Popen  # the private broker (stopped on the way out unless already)


@contextmanager
def synthesis_stack(
    folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    reply: Callable[[dict], Reply],
    worker_name: str,
    *,
    pool: str = "prefork",
    concurrency: int = 4,
    **settings: object,
) -> Iterator[Stack]:
    """A private Redis, the loopback LLM answering ``reply(body)`` and a fast worker with its
    beat logging to ``folder/<worker_name>.log`` (Celery's ``pool`` with ``concurrency`` slots;
    ``settings`` by their environment names); this
    process publishes ``propose_skill`` to that Redis for real (the suite's broker is another,
    and runs tasks eagerly). Every process is stopped on the way out."""
    redis, redis_url = procs.start_redis(folder)
    llm = OpenAIServer(default=reply, model="loopback-model").start()
    env = procs.process_env(redis_url, llm=llm, **settings)
    broker = Connection(redis_url)
    eager = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = False
    monkeypatch.setattr(
        tasks.propose_skill,
        "delay",
        lambda *a: tasks.propose_skill.apply_async(a, connection=broker),
    )
    worker = procs.start_worker(env, folder, worker_name, concurrency=concurrency, pool=pool)
    stack = Stack(llm=llm, env=env, worker=worker, redis=redis)
    try:
        yield stack
    finally:
        celery_app.conf.task_always_eager = eager
        procs.stop(stack.worker)
        if stack.redis.poll() is None:
            stack.redis.terminate()
            stack.redis.wait(timeout=10)
        llm.stop()
