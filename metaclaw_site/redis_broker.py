"""Celery's Redis transport, with one fault of kombu 5.7.0 turned into the error it means.

When Redis goes away while a worker holds unacknowledged messages (a task was running: with
``acks_late`` every task is unacknowledged until it ends), Celery's consumer closes its broker
connection to reconnect. kombu forgets the connection's settings first (``transport.client =
None``) and then, closing a channel, builds a Redis client to put those messages back: reading
the host from ``None`` raises ``AttributeError``. That is not one of the transport's connection
errors, so Celery calls it "Unrecoverable" and the worker exits (known upstream since kombu 3:
celery/kombu#582, #970). Here the same moment raises Redis's ``ConnectionError``: kombu ignores
it while closing, the consumer reconnects once Redis is back, and the messages it could not put
back are delivered again after the visibility timeout (every task is idempotent).
``tests/faults/test_redis_lost_mid_task.py`` stops Redis during a task and shows the worker
living on."""

from __future__ import annotations

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict:
        if self.connection.client is None:
            raise RedisConnectionError("The broker connection is closed; it reconnects.")
        return super()._connparams(asynchronous=asynchronous)


class Transport(kombu_redis.Transport):
    Channel = Channel
