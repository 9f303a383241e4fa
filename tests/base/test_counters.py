"""The fast lane's in-process request counts (rate limits), flushed to Redis in the background."""

from __future__ import annotations

import threading
import uuid

from base import counters


def test_requests_counted_while_a_flush_is_in_flight_still_count_against_the_limit(
    monkeypatch,
):
    """A flush takes the pending counts and asks Redis for the totals; a request arriving
    before Redis answers must still see the counts in flight, or it passes a limit just
    reached (the second request of a one-a-minute key was let through)."""
    real = counters.redis_client()
    entered, release = threading.Event(), threading.Event()

    class RedisAnsweringLate:
        """The real client; its pipelines wait for the test before they run."""

        def pipeline(self, **kwargs):
            pipe = real.pipeline(**kwargs)
            execute = pipe.execute

            def execute_late():
                entered.set()
                assert release.wait(10)
                return execute()

            pipe.execute = execute_late
            return pipe

    monkeypatch.setattr(counters, "redis_client", lambda: RedisAnsweringLate())
    key_id = uuid.uuid4().int % 10**12  # a key no other test counts

    assert counters.hit_local(key_id=key_id, project_id=1) == 1
    flush = threading.Thread(target=counters.flush_local)
    flush.start()
    assert entered.wait(10)

    assert counters.hit_local(key_id=key_id, project_id=1) == 2  # in flight + this one

    release.set()
    flush.join(10)
    assert counters.hit_local(key_id=key_id, project_id=1) == 3  # Redis's total + this one
    counters.flush_local()
    minute = counters.current_minute()
    assert int(real.get(counters.RATE_KEY.format(key_id=key_id, minute=minute))) == 3
