"""Per-minute counters: API rate limits and the traffic figures the slow loop's idle detection
reads. Redis in production (shared by every web process); the Django cache in embedded mode."""

from __future__ import annotations

import functools
import time

from django.conf import settings
from django.core.cache import cache

TRAFFIC_KEY = "metaclaw:traffic:{project_id}:{minute}"
RATE_KEY = "metaclaw:rate:{key_id}:{minute}"
# Traffic counters are kept long enough for "idle for N minutes" windows of up to two hours.
TRAFFIC_TTL_SECONDS = 3 * 3600


@functools.cache
def redis_client():
    """A pooled client, or None in embedded mode."""
    if not settings.REDIS_URL:
        return None
    import redis

    return redis.Redis.from_url(
        settings.REDIS_URL, socket_timeout=1.0, socket_connect_timeout=1.0, health_check_interval=30
    )


def current_minute(now: float | None = None) -> int:
    return int((now if now is not None else time.time()) // 60)


def hit(*, key_id: int, project_id: int, now: float | None = None) -> int:
    """Count one request for the key's rate limit and the project's traffic; return the key's
    count in the current minute. A Redis outage never blocks a request: it counts as 0."""
    minute = current_minute(now)
    rate_key = RATE_KEY.format(key_id=key_id, minute=minute)
    traffic_key = TRAFFIC_KEY.format(project_id=project_id, minute=minute)
    client = redis_client()
    if client is None:
        try:
            count = cache.incr(rate_key)
        except ValueError:
            cache.add(rate_key, 0, 120)
            count = cache.incr(rate_key)
        try:
            cache.incr(traffic_key)
        except ValueError:
            cache.add(traffic_key, 0, TRAFFIC_TTL_SECONDS)
            cache.incr(traffic_key)
        return count
    try:
        pipe = client.pipeline(transaction=False)
        pipe.incr(rate_key)
        pipe.expire(rate_key, 120)
        pipe.incr(traffic_key)
        pipe.expire(traffic_key, TRAFFIC_TTL_SECONDS)
        return int(pipe.execute()[0])
    except Exception:  # noqa: BLE001 - a counter must never fail a request
        return 0


def count_traffic(*, project_id: int, now: float | None = None) -> None:
    """Count a request that is not authenticated by an API key limit (e.g. the proxy's
    streaming path counts once per request through ``hit`` already)."""
    minute = current_minute(now)
    key = TRAFFIC_KEY.format(project_id=project_id, minute=minute)
    client = redis_client()
    try:
        if client is None:
            try:
                cache.incr(key)
            except ValueError:
                cache.add(key, 0, TRAFFIC_TTL_SECONDS)
                cache.incr(key)
        else:
            client.pipeline(transaction=False).incr(key).expire(key, TRAFFIC_TTL_SECONDS).execute()
    except Exception:  # noqa: BLE001
        pass


def traffic_per_minute(*, project_id: int, minutes: int, now: float | None = None) -> list[int]:
    """Requests in each of the last ``minutes`` whole minutes, oldest first (the current,
    incomplete minute is the last element)."""
    end = current_minute(now)
    keys = [
        TRAFFIC_KEY.format(project_id=project_id, minute=m)
        for m in range(end - minutes + 1, end + 1)
    ]
    client = redis_client()
    if client is None:
        values = cache.get_many(keys)
        return [int(values.get(k) or 0) for k in keys]
    return [int(v or 0) for v in client.mget(keys)]
