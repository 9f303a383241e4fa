"""Short regression guards for the test suite (``tests/test_perf_guard.py``), a few seconds each.

Each compares a figure with a baseline measured in the same run, on the same machine, taken in
turns with it so that both see the same load: a slower or busier machine slows both and passes,
a slower MetaClaw slows only the figure and fails. The limits are generous ratios (the figures
seen are beside them in the test), so that a loaded 2-core CI machine does not flake.

- The proxy: ``POST /v1/chat/completions`` through MetaClaw against the same request sent to
  the upstream directly (``proxy_latency``).
- The fast loop: an incident's ingest response → its group's proposal stored, one group at a
  time, against an empty Celery task's round trip on the same worker (``fast_loop_latency``,
  with the worker of ``_probe.py``: ``probe_worker``).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from _harness import ROOT, stop


@dataclass
class Figure:
    """A figure's timings and its baseline's (ms), and the ratio allowed between their fastest
    tries: the fastest is the least disturbed by other load (on a busy machine the medians of
    both, the empty task's most, grow with how long a woken process waits for a core)."""

    name: str
    measured: list[float]
    baseline: list[float]
    limit: float

    @property
    def ratio(self) -> float:
        return min(self.measured) / max(min(self.baseline), 0.05)

    @property
    def ok(self) -> bool:
        return self.ratio <= self.limit

    def __str__(self) -> str:
        return (
            f"{self.name}: fastest {min(self.measured):.1f} ms (p50 "
            f"{statistics.median(self.measured):.1f}) against a baseline's fastest "
            f"{min(self.baseline):.1f} ms (p50 {statistics.median(self.baseline):.1f}): "
            f"{self.ratio:.1f}x, allowed {self.limit:g}x "
            f"({len(self.measured)} and {len(self.baseline)} tries)"
        )


# --- The proxy ---------------------------------------------------------------------------------


def proxy_latency(
    *, proxy_url: str, upstream_url: str, runtime_key: str, upstream_key: str, requests: int = 60
) -> tuple[list[float], list[float]]:
    """``(through the proxy, direct)``: the latency in ms of the same small chat completion,
    one request at a time on a kept-alive connection each, alternating which goes first."""
    import httpx

    body = {"model": "guard-model", "messages": [{"role": "user", "content": "Say hi."}]}
    proxied: list[float] = []
    direct: list[float] = []
    with (
        httpx.Client(base_url=proxy_url, timeout=10) as through,
        httpx.Client(base_url=upstream_url, timeout=10) as straight,
    ):
        calls = [
            (through, "/v1/chat/completions", runtime_key, proxied),
            (straight, "/chat/completions", upstream_key, direct),
        ]
        for index in range(requests + 5):  # the first 5 of each warm up
            for client, path, key, times in calls if index % 2 else calls[::-1]:
                started = time.perf_counter()
                response = client.post(path, json=body, headers={"Authorization": f"Bearer {key}"})
                took = (time.perf_counter() - started) * 1000
                response.raise_for_status()
                if index >= 5:
                    times.append(took)
    return proxied, direct


# --- The fast loop -----------------------------------------------------------------------------


@contextmanager
def probe_worker(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen]:
    """The production fast worker (prefork, one child) with ``_probe.py``'s empty task."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [
                sys.executable, "benchmarks/_probe.py", "-A", "metaclaw_site", "worker",
                "-Q", "fast", "-P", "prefork", "-c", "1", "--without-gossip",
                "--without-mingle", "--without-heartbeat", "-l", "WARNING",
            ],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            yield process
        finally:
            stop(process, timeout=15)


def empty_task_round_trip(app, redis_client, timeout: float = 60.0) -> float:
    """One empty task on the probe worker: sent → done there, in ms."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _probe import records

    sent = time.time()
    app.send_task("bench.empty", args=[sent])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in records(redis_client):
            if record.get("sent") == sent:
                return (record["end"] - sent) * 1000
        time.sleep(0.002)
    raise TimeoutError("The probe worker did not run the empty task.")


def fast_loop_latency(
    *,
    ingest: Callable[[int], tuple[float, int]],
    stored_at: Callable[[int], float | None],
    app,
    redis_client,
    groups: int = 10,
    empties_per_group: int = 4,
    timeout: float = 60.0,
) -> tuple[list[float], list[float]]:
    """``(fast loop, empty task)`` in ms. ``ingest(n)`` sends the first incident of a new
    group and returns ``(answered at, group id)``; ``stored_at(group id)`` is when its proposal
    was stored (``time.time()``), or None. One group at a time, empty tasks in between; the
    first group and the first empty tasks warm the worker up and are not counted."""
    loop: list[float] = []
    empty: list[float] = []
    for n in range(groups + 1):
        round_trips = [empty_task_round_trip(app, redis_client) for _ in range(empties_per_group)]
        answered, group_id = ingest(n)
        deadline = time.monotonic() + timeout
        while (at := stored_at(group_id)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"No proposal for group {group_id} after {timeout:.0f} s.")
            time.sleep(0.005)
        if n:
            loop.append((at - answered) * 1000)
            empty += round_trips
    return loop, empty


def worker_env(base: dict[str, str]) -> dict[str, str]:
    """``base`` for a worker subprocess: tasks go through the broker, never eagerly."""
    return {**os.environ, **base, "CELERY_TASK_ALWAYS_EAGER": "0"}
