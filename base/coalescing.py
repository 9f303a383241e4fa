"""Group commit for the fast lane: concurrent calls that share a key run as one call.

On a 2-core machine a single-incident ingest spent more CPU on its own transaction (four
statements, the group row's update, the commit's WAL flush: about 3 ms of PostgreSQL and as
much Python) than on everything else it did; a batch of 500 spends a tenth of that per item
(``benchmarks/ingest_orm.py``). ``Coalescer`` stores what arrives while a transaction of the
same key is under way in the next one, as PostgreSQL's own group commit does for WAL flushes:
no call ever waits for others to arrive (an idle server runs each alone, at once), and under
load the calls of one key share a transaction. ``benchmarks/ingest.py`` measures what it buys.

Imports nothing of the apps: the fast lane's handlers give it the function to run."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from base.fast_lane import in_worker_thread
from base.middleware import database_unavailable

logger = logging.getLogger(__name__)


class Coalescer:
    """``await coalescer.call(key, item)`` answers what ``run_many(key, [.., item, ..])`` answers
    for ``item``. ``run_many`` is a sync function (run on a worker thread, with the database
    connection handed back to the pool afterwards) that takes a key and a list of items and
    returns one result per item, in order, all in one transaction.

    One call of ``run_many`` per key is under way at a time (per event loop); the items that
    arrive meanwhile wait for it to end and then go together, at most ``max_items()`` at once
    (1 switches it off: each call then runs at once on its own thread, as without it). If
    a shared call raises, each of its items is tried again alone, so one item that fails (a
    row the database refuses) fails only its own request; except when the database cannot be
    reached: then all of them, and those who came meanwhile, get that error (and their 503) at
    once, without a wait each for the same outage."""

    def __init__(
        self, run_many: Callable[[Any, list[Any]], Sequence[Any]], max_items: Callable[[], int]
    ) -> None:
        self._run_many = run_many
        self._max_items = max_items
        # (event loop, key) -> the items waiting, each with the future its caller awaits.
        self._waiting: dict[tuple[int, Hashable], list[tuple[Any, asyncio.Future]]] = {}
        self._leaders: set[asyncio.Task] = set()  # held: the loop keeps only weak references

    async def call(self, key: Hashable, item: Any) -> Any:
        if self._max_items() <= 1:  # switched off: each call alone, side by side with others
            (result,) = await in_worker_thread(self._run_many)(key, [item])
            return result
        loop = asyncio.get_running_loop()
        slot = (id(loop), key)
        answer = loop.create_future()
        queue = self._waiting.get(slot)
        if queue is not None:  # a call of this key is under way: join the next one
            queue.append((item, answer))
        else:
            # Nothing under way: run at once, in a task of its own that runs this key's calls
            # until nobody waits (so no caller's answer waits for the calls after its own, and
            # a caller who goes away, cancelled by a client's disconnect, strands nobody).
            self._waiting[slot] = [(item, answer)]
            task = loop.create_task(self._lead(slot, key))
            self._leaders.add(task)
            task.add_done_callback(self._leaders.discard)
        return await answer

    async def _lead(self, slot: tuple[int, Hashable], key: Hashable) -> None:
        batch: list[tuple[Any, asyncio.Future]] = []
        try:
            while queue := self._waiting[slot]:
                most = max(1, self._max_items())
                self._waiting[slot] = queue[most:]
                batch = queue[:most]
                await self._run(slot, key, batch)
        except Exception as exc:
            # A bug must not leave callers waiting: each of them answers for it.
            logger.exception("A shared call of %r failed.", key)
            for _, answer in batch + self._waiting[slot]:
                _settle(answer, exception=exc)
        except BaseException:
            for _, answer in batch + self._waiting[slot]:  # the loop is cancelling this task
                answer.cancel()
            raise
        finally:
            del self._waiting[slot]

    async def _run(
        self, slot: tuple[int, Hashable], key: Hashable, batch: list[tuple[Any, asyncio.Future]]
    ) -> Exception | None:
        """Run ``batch`` and answer its callers. Returns the error when the database could not
        be reached (everyone waiting has been answered with it), else None."""
        items = [item for item, _ in batch]
        try:
            results = await in_worker_thread(self._run_many)(key, items)
        except Exception as exc:  # noqa: BLE001 - handed to the callers, who answer for it
            if database_unavailable(exc):
                # Those who came meanwhile would wait for the same outage: they answer now.
                for _, answer in batch + self._waiting.pop(slot, []):
                    _settle(answer, exception=exc)
                self._waiting[slot] = []
                return exc
            if len(batch) == 1:
                _settle(batch[0][1], exception=exc)
                return None
            for index, one in enumerate(batch):  # which of them failed it? Each alone.
                unreachable = await self._run(slot, key, [one])
                if unreachable is not None:
                    for _, answer in batch[index + 1 :]:
                        _settle(answer, exception=unreachable)
                    return unreachable
            return None
        if len(results) != len(batch):
            raise ValueError(f"{len(results)} results for {len(batch)} items")
        for (_, answer), result in zip(batch, results, strict=True):
            _settle(answer, result=result)
        return None


def _settle(answer: asyncio.Future, *, result: Any = None, exception: Exception | None = None):
    if answer.done():  # its caller went away
        return
    if exception is not None:
        answer.set_exception(exception)
    else:
        answer.set_result(result)
