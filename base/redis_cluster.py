"""Redis Cluster for the cache and the counters (``METACLAW_REDIS_CLUSTER=1``, ``REDIS_URL`` one
of its nodes). A cluster answers a key only on the node that holds its slot and refuses one
command over keys of several slots, so a plain client fails there: the cache's writes to other
nodes' slots raise ``MOVED``, rate-limit counts never reach Redis (each web process limits only
what it counted itself), and the traffic figures raise ``CROSSSLOT``. Here one cluster-aware
client (redis-py's ``RedisCluster``) serves all keys, and a command over several keys is split
by slot. Celery's broker cannot be a cluster (settings require ``CELERY_BROKER_URL``), and a
system check says when the setting and the server disagree: docs/deploy.md."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.cache.backends.redis import RedisCache, RedisCacheClient

if TYPE_CHECKING:
    from redis.cluster import RedisCluster


def enabled() -> bool:
    return bool(getattr(settings, "REDIS_CLUSTER", False))


def client_for(url: str, **options: Any) -> RedisCluster:
    """A client that finds each key's node (it reads the slot map from ``url``'s node)."""
    from redis.cluster import RedisCluster  # only where a cluster is configured

    return RedisCluster.from_url(url, **options)


def mget(client: Any, keys: list[str]) -> list[Any]:
    """MGET, split by slot on a cluster (in order; one command per node, not atomic)."""
    return client.mget_nonatomic(keys) if enabled() else client.mget(keys)


class RedisClusterCacheClient(RedisCacheClient):
    """Django's Redis cache client with one ``RedisCluster`` for every key, and its multi-key
    operations split by slot."""

    def __init__(self, servers, serializer=None, pool_class=None, parser_class=None, **options):
        super().__init__(servers, serializer, pool_class, parser_class, **options)
        self._options = options  # socket timeouts and the like, for each node's connections
        self._cluster: RedisCluster | None = None
        self._cluster_lock = threading.Lock()

    def get_client(self, key=None, *, write=False) -> RedisCluster:
        if self._cluster is None:
            with self._cluster_lock:
                if self._cluster is None:
                    self._cluster = client_for(self._servers[0], **self._options)
        return self._cluster

    def get_many(self, keys):
        keys = list(keys)
        values = self.get_client().mget_nonatomic(keys)
        pairs = zip(keys, values, strict=True)
        return {k: self._serializer.loads(v) for k, v in pairs if v is not None}

    def set_many(self, data, timeout):
        client = self.get_client(write=True)
        if timeout == 0:  # Django's meaning: expire at once
            client.delete(*data)
            return
        pipeline = client.pipeline()  # a cluster pipeline sends each command to its key's node
        for key, value in data.items():
            pipeline.set(key, self._serializer.dumps(value), ex=timeout)
        pipeline.execute()

    def delete_many(self, keys):
        self.get_client(write=True).delete(*keys)  # redis-py splits a multi-key DEL by slot

    def clear(self):
        return bool(self.get_client(write=True).flushdb(target_nodes="primaries"))


class RedisClusterCache(RedisCache):
    """``CACHES["default"]["BACKEND"]`` for a Redis Cluster; ``LOCATION``: one of its nodes."""

    def __init__(self, server, params) -> None:
        super().__init__(server, params)
        self._class = RedisClusterCacheClient


def check_the_setting_matches_the_server(app_configs=None, **kwargs) -> list:
    """A system check (``manage.py check``, and ``migrate`` before every release): REDIS_URL's
    server is a cluster node exactly when ``METACLAW_REDIS_CLUSTER`` says so. Either mistake is
    silent at run time (the plain client's failures are swallowed by the counters). When Redis
    cannot be reached it says nothing: an outage is not a configuration error."""
    from django.core import checks

    if not settings.REDIS_URL:
        return []
    import redis

    try:
        with redis.Redis.from_url(
            settings.REDIS_URL, socket_timeout=1.0, socket_connect_timeout=1.0
        ) as client:
            info = client.info("cluster")
    except redis.RedisError:
        return []
    is_cluster = bool(int(info.get("cluster_enabled", 0)))
    address = urlsplit(settings.REDIS_URL).netloc.rpartition("@")[2]  # never its password
    if is_cluster and not enabled():
        return [
            checks.Error(
                f"REDIS_URL ({address}) is a node of a Redis Cluster, and "
                "METACLAW_REDIS_CLUSTER is not set: the cache would fail for keys on other "
                "nodes and rate limits would not be shared between web processes.",
                hint="Set METACLAW_REDIS_CLUSTER=1 and CELERY_BROKER_URL (docs/deploy.md).",
                id="metaclaw.E001",
            )
        ]
    if enabled() and not is_cluster:
        return [
            checks.Error(
                f"METACLAW_REDIS_CLUSTER=1, but REDIS_URL ({address}) is not a node "
                "of a Redis Cluster.",
                hint="Unset METACLAW_REDIS_CLUSTER, or point REDIS_URL at a cluster node.",
                id="metaclaw.E002",
            )
        ]
    return []
