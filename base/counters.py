"""Per-minute counters: API rate limits and the traffic figures the slow loop's idle detection
reads. Redis in production (shared by every web process); the Django cache in embedded mode.
Also the failed-authentication counts that throttle guessing (``failure_record``), kept in the
Django cache, which is the same Redis in production.

Two ways to count a request: ``hit`` asks Redis on the spot (the Django door); ``hit_local``
counts in this process's memory and a background thread adds the counts to the same keys every
``FLUSH_INTERVAL`` seconds (the ASGI fast lane, whose event loop must never wait on Redis)."""

from __future__ import annotations

import atexit
import functools
import logging
import math
import threading
import time

from django.conf import settings
from django.core.cache import cache

from base import redis_cluster
from base.periodic import Periodic

logger = logging.getLogger(__name__)

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

    if redis_cluster.enabled():
        return redis_cluster.client_for(
            settings.REDIS_URL, socket_timeout=1.0, socket_connect_timeout=1.0
        )
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
    return [int(v or 0) for v in redis_cluster.mget(client, keys)]


# --- In-process counts, flushed to the same keys in the background ---------------------------

FLUSH_INTERVAL = 0.25


class _LocalCounts:
    """Request counts of this process not yet added to Redis, and the totals Redis answered."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rate: dict[tuple[int, int], int] = {}
        self.traffic: dict[tuple[int, int], int] = {}
        self.known_rate: dict[tuple[int, int], int] = {}
        # Counts taken by a flush and not yet answered for: still this process's requests (a
        # request arriving meanwhile must see them, or it could pass a limit just reached).
        self.flushing_rate: dict[tuple[int, int], int] = {}


_local = _LocalCounts()


def hit_local(*, key_id: int, project_id: int, now: float | None = None) -> int:
    """Count one request (rate limit of the key, traffic of the project) and return the key's
    count in this minute as far as this process knows (Redis totals as of the last flush plus
    what is not yet flushed). Never touches the network."""
    _flusher.ensure_started()
    minute = current_minute(now)
    rate_key = (key_id, minute)
    with _local.lock:
        pending = _local.rate.get(rate_key, 0) + 1
        _local.rate[rate_key] = pending
        traffic_key = (project_id, minute)
        _local.traffic[traffic_key] = _local.traffic.get(traffic_key, 0) + 1
        return _local.known_rate.get(rate_key, 0) + _local.flushing_rate.get(rate_key, 0) + pending


def flush_local() -> None:
    """Add the counts of ``hit_local`` to Redis (the cache in embedded mode) and learn the
    keys' totals. Counts that cannot be written are kept for the next flush. One flush at a
    time (the background one and the one at exit)."""
    with _flush_lock:
        _flush_local()


_flush_lock = threading.Lock()


def _flush_local() -> None:
    with _local.lock:
        rate, _local.rate = _local.rate, {}
        traffic, _local.traffic = _local.traffic, {}
        _local.flushing_rate = dict(rate)
        current = current_minute()
        for key in [k for k in _local.known_rate if k[1] < current - 1]:
            del _local.known_rate[key]
        # Keys this process saw this minute: their totals are read back even when it has
        # nothing to add, or it would not hear of what other nodes counted since its last
        # request (two web nodes each let one request too many through).
        watched = [k for k in _local.known_rate if k[1] == current and k not in rate]
    if not rate and not traffic:
        _refresh_known(watched)
        return
    client = redis_client()
    try:
        if client is None:
            totals = {}
            for (key_id, minute), n in rate.items():
                totals[(key_id, minute)] = _cache_incr(
                    RATE_KEY.format(key_id=key_id, minute=minute), n, 120
                )
            for (pid, minute), n in traffic.items():
                _cache_incr(
                    TRAFFIC_KEY.format(project_id=pid, minute=minute), n, TRAFFIC_TTL_SECONDS
                )
        else:
            pipe = client.pipeline(transaction=False)
            for (key_id, minute), n in rate.items():
                key = RATE_KEY.format(key_id=key_id, minute=minute)
                pipe.incrby(key, n)
                pipe.expire(key, 120)
            for (pid, minute), n in traffic.items():
                key = TRAFFIC_KEY.format(project_id=pid, minute=minute)
                pipe.incrby(key, n)
                pipe.expire(key, TRAFFIC_TTL_SECONDS)
            results = pipe.execute()
            totals = {k: int(results[2 * i]) for i, k in enumerate(rate)}
    except Exception:  # noqa: BLE001 - counts must never fail requests; keep them for later
        logger.warning("Could not flush request counts; keeping them for the next try.")
        with _local.lock:
            for k, n in rate.items():
                _local.rate[k] = _local.rate.get(k, 0) + n
            for k, n in traffic.items():
                _local.traffic[k] = _local.traffic.get(k, 0) + n
            _local.flushing_rate = {}
        return
    with _local.lock:
        for k, total in totals.items():
            _local.known_rate[k] = max(total, _local.known_rate.get(k, 0))
        _local.flushing_rate = {}
    _refresh_known(watched)


def _refresh_known(keys: list[tuple[int, int]]) -> None:
    """Learn the current totals of rate-limit keys (one MGET): what other nodes counted."""
    if not keys:
        return
    names = [RATE_KEY.format(key_id=key_id, minute=minute) for key_id, minute in keys]
    try:
        client = redis_client()
        values = (
            redis_cluster.mget(client, names)
            if client is not None
            else [cache.get(n) for n in names]
        )
    except Exception:  # noqa: BLE001 - a missed refresh only delays what this node learns
        return
    with _local.lock:
        for k, value in zip(keys, values, strict=True):
            if value is not None:
                _local.known_rate[k] = max(int(value), _local.known_rate.get(k, 0))


def _cache_incr(key: str, n: int, ttl: int) -> int:
    try:
        return cache.incr(key, n)
    except ValueError:
        cache.add(key, 0, ttl)
        return cache.incr(key, n)


_flusher = Periodic("metaclaw-counts-flush", FLUSH_INTERVAL, lambda: flush_local())
atexit.register(lambda: flush_local())


# --- Failed authentications (wrong passwords, wrong API keys) --------------------------------

FAILURES_KEY = "metaclaw:failures:{scope}:{subject}:{window}"
BLOCKED_KEY = "metaclaw:blocked:{scope}:{subject}"


def failures_blocked(*, scope: str, subject: str, now: float | None = None) -> int:
    """Seconds until ``subject`` (an address, a username and address...) may try ``scope``
    again; 0 when it may now. A cache outage blocks nobody (and is logged)."""
    now = time.time() if now is None else now
    try:
        until = cache.get(BLOCKED_KEY.format(scope=scope, subject=subject))
    except Exception:  # noqa: BLE001 - throttling must never fail a request
        logger.warning("Could not read the failed-authentication counts.")
        return 0
    return max(0, math.ceil(float(until) - now)) if until else 0


def failure_record(
    *, scope: str, subject: str, limit: int, window_seconds: int, now: float | None = None
) -> int:
    """Count one failure of ``subject`` in the current window of ``window_seconds`` (fixed
    windows: the count starts again when the window does). The ``limit``-th failure in a window
    blocks ``subject`` for ``window_seconds`` from now. Returns the seconds it is blocked for,
    0 when it is not. Every process shares the count, so the limit is the site's, not a
    process's."""
    now = time.time() if now is None else now
    key = FAILURES_KEY.format(scope=scope, subject=subject, window=int(now // window_seconds))
    try:
        if _cache_incr(key, 1, 2 * window_seconds) < limit:
            return 0
        cache.set(
            BLOCKED_KEY.format(scope=scope, subject=subject),
            now + window_seconds,
            timeout=window_seconds + 1,
        )
    except Exception:  # noqa: BLE001 - throttling must never fail a request
        logger.warning("Could not count a failed authentication.")
        return 0
    return window_seconds


def failures_clear(
    *, scope: str, subject: str, window_seconds: int, now: float | None = None
) -> None:
    """Forget ``subject``'s failures and lift its block (a successful login)."""
    now = time.time() if now is None else now
    window = int(now // window_seconds)
    try:
        cache.delete_many(
            [
                BLOCKED_KEY.format(scope=scope, subject=subject),
                FAILURES_KEY.format(scope=scope, subject=subject, window=window),
            ]
        )
    except Exception:  # noqa: BLE001
        logger.warning("Could not clear the failed-authentication counts.")
