"""``base.coalescing.Coalescer`` on its own: who runs with whom, and that no caller is left
waiting, whatever the shared call does. (``tests/incidents/test_group_commit.py`` shows it
under the ingest endpoint, on PostgreSQL.)"""

from __future__ import annotations

import asyncio
import threading

import pytest
from asgiref.sync import async_to_sync

from base.coalescing import Coalescer


class Recorder:
    """A ``run_many`` that records each call's items and answers ``item * 10``; the first call
    waits until ``release`` is set, so that others arrive while it is under way."""

    def __init__(self, answer=None) -> None:
        self.calls: list[list[int]] = []
        self.release = threading.Event()
        self.answer = answer or (lambda items: [item * 10 for item in items])

    def __call__(self, key, items):
        self.calls.append(list(items))
        if len(self.calls) == 1:
            assert self.release.wait(10)
        return self.answer(items)


def run(coalescer: Coalescer, recorder: Recorder, first: int, then: list[int], cancel=()):
    """``first`` is called, then ``then`` while it is under way; the callers in ``cancel`` go
    away; then the first call ends. What each caller got: its result, or its exception."""

    async def scenario():
        leader = asyncio.ensure_future(coalescer.call("key", first))
        await asyncio.sleep(0.2)
        others = {n: asyncio.ensure_future(coalescer.call("key", n)) for n in then}
        await asyncio.sleep(0.2)
        for n in cancel:
            others[n].cancel()
        recorder.release.set()
        done = await asyncio.wait_for(
            asyncio.gather(leader, *others.values(), return_exceptions=True), timeout=10
        )
        return dict(zip([first, *others], done, strict=True))

    return async_to_sync(scenario)()


def test_calls_that_arrive_while_one_is_under_way_run_together_and_get_their_own_results():
    recorder = Recorder()

    got = run(Coalescer(recorder, lambda: 100), recorder, 1, [2, 3, 4])

    assert recorder.calls == [[1], [2, 3, 4]]
    assert got == {1: 10, 2: 20, 3: 30, 4: 40}


def test_at_most_max_items_run_together():
    recorder = Recorder()

    got = run(Coalescer(recorder, lambda: 2), recorder, 1, [2, 3, 4, 5, 6])

    assert recorder.calls == [[1], [2, 3], [4, 5], [6]]
    assert got == {n: n * 10 for n in range(1, 7)}


def test_a_caller_that_goes_away_leaves_the_others_their_answers():
    recorder = Recorder()

    got = run(Coalescer(recorder, lambda: 100), recorder, 1, [2, 3, 4], cancel=[3])

    assert isinstance(got[3], asyncio.CancelledError)
    assert {n: got[n] for n in (1, 2, 4)} == {1: 10, 2: 20, 4: 40}
    assert recorder.calls == [[1], [2, 3, 4]]  # its item was already on its way


def test_a_shared_call_that_answers_wrongly_fails_its_callers_instead_of_leaving_them_waiting():
    recorder = Recorder(answer=lambda items: [items[0] * 10])  # one result, however many items

    got = run(Coalescer(recorder, lambda: 100), recorder, 1, [2, 3])

    assert got[1] == 10
    assert all(isinstance(got[n], ValueError) for n in (2, 3)), got


@pytest.mark.parametrize("max_items", [1, 0])
def test_switched_off_each_call_runs_alone_and_at_once(max_items):
    recorder = Recorder()
    recorder.release.set()

    async def scenario():
        coalescer = Coalescer(recorder, lambda: max_items)
        return await asyncio.gather(*(coalescer.call("key", n) for n in (1, 2, 3)))

    assert async_to_sync(scenario)() == [10, 20, 30]
    assert sorted(recorder.calls) == [[1], [2], [3]]


def test_when_the_database_cannot_be_reached_those_waiting_are_answered_at_once():
    from django.db import OperationalError

    def unreachable(items):
        raise OperationalError("connection refused")  # what a pool timeout raises: no SQLSTATE

    recorder = Recorder(answer=unreachable)

    got = run(Coalescer(recorder, lambda: 100), recorder, 1, [2, 3])

    assert all(isinstance(got[n], OperationalError) for n in (1, 2, 3)), got
    assert recorder.calls == [[1]]  # not once more for those who came meanwhile


def test_a_shared_call_that_fails_is_tried_again_item_by_item():
    def refuse_two(items):
        if 2 in items:
            raise RuntimeError("refused")
        return [item * 10 for item in items]

    recorder = Recorder(answer=refuse_two)

    got = run(Coalescer(recorder, lambda: 100), recorder, 1, [2, 3, 4])

    assert recorder.calls == [[1], [2, 3, 4], [2], [3], [4]]
    assert isinstance(got[2], RuntimeError)
    assert {n: got[n] for n in (1, 3, 4)} == {1: 10, 3: 30, 4: 40}


def test_when_the_database_goes_away_during_the_retries_the_rest_are_answered_at_once():
    from django.db import OperationalError

    def refuse_then_unreachable(items):
        if len(items) > 1:
            raise RuntimeError("refused")
        raise OperationalError("connection refused")

    recorder = Recorder()  # the first call answers; those after it go as above
    recorder.answer = lambda items: (
        [item * 10 for item in items]
        if len(recorder.calls) == 1
        else refuse_then_unreachable(items)
    )

    got = run(Coalescer(recorder, lambda: 100), recorder, 1, [2, 3, 4])

    assert got[1] == 10
    assert all(isinstance(got[n], OperationalError) for n in (2, 3, 4)), got
    assert recorder.calls == [[1], [2, 3, 4], [2]]
