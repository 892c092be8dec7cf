"""The poll scheduler: one timer task for every schedule, a bound on polls at once, reloads.

The transport is a stand-in whose requests the test finishes one by one; the clock is injected and
only moves when the test moves it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import pytest
from helpers import make_config, wait_until

from exporter.clocks import Clocks
from exporter.config import ApiSettings, Config
from exporter.poller import POLLS_PER_REQUEST_SLOT, Poller
from exporter.transport import Request

T = TypeVar("T")
VALUES = {"sessions_count": 1, "searches_count": 2, "prs_opened": 3, "prs_closed": 2, "prs_merged": 1}


class HeldClient:
    """A transport that answers a request only when the test releases it."""

    def __init__(self) -> None:
        self.waiting: list[tuple[Request, asyncio.Future[None]]] = []
        self.answered: list[str | None] = []

    async def get(self, request: Request, parse: Callable[[object], T]) -> T:
        release: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append((request, release))
        await release
        self.answered.append(request.org_set)
        return parse(dict(VALUES))

    def update_settings(self, settings: ApiSettings) -> None:
        pass

    def release(self, count: int) -> None:
        for _ in range(count):
            self.waiting.pop(0)[1].set_result(None)


class SteppedClock:
    """Monotonic time that moves only when the test says; sleepers wake when their time comes."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + delay, wake))
        await wake

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for at, wake in self._sleepers:
            if at <= self.now and not wake.done():
                wake.set_result(None)
        self._sleepers = [(at, wake) for at, wake in self._sleepers if not wake.done()]


def _config(sets: int, *, concurrency: int = 32) -> Config:
    """`sets` org sets of one 1h window, due at once (jitter 0)."""
    org_sets = "\n".join(f"- name: s{i:03d}" for i in range(sets))
    config = make_config("http://127.0.0.1:9", org_sets, windows="[1h]", interval="1h")
    return dataclasses.replace(config, api=dataclasses.replace(config.api, max_concurrency=concurrency))


@pytest.fixture
async def running() -> AsyncIterator[list[Poller]]:
    pollers: list[Poller] = []
    yield pollers
    for poller in pollers:
        await poller.stop()


def _start(running: list[Poller], client: HeldClient, config: Config, clock: SteppedClock) -> Poller:
    clocks = Clocks(wall=lambda: 1_800_000_000.0, monotonic=clock.monotonic, sleep=clock.sleep,
                    random=lambda: 0.5)
    poller = Poller(client, config, clocks)  # type: ignore[arg-type]  # the stand-in client
    running.append(poller)
    poller.start()
    return poller


async def _polled_once(running: list[Poller], sets: int) -> tuple[Poller, HeldClient, SteppedClock]:
    """A poller of `sets` org sets whose first polls are done: its scheduler sleeps for an hour."""
    client, clock = HeldClient(), SteppedClock()
    poller = _start(running, client, _config(sets), clock)
    await wait_until(lambda: len(client.waiting) == sets, what="the first polls")
    client.release(sets)
    await wait_until(lambda: len(client.answered) == sets and len(_poll_tasks()) == 1, what="the polls to end")
    return poller, client, clock


def _poll_tasks() -> list[str]:
    """The names of the poller's tasks: "poll scheduler", and "poll ORG_SET/WINDOW" per poll running."""
    return sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("poll "))


async def test_schedules_due_together_beyond_the_limit_wait_for_a_free_slot(running: list[Poller]) -> None:
    # A start with jitter 0 makes every schedule due at once: only so many polls may exist.
    client, clock = HeldClient(), SteppedClock()
    limit = POLLS_PER_REQUEST_SLOT * 1
    _start(running, client, _config(10, concurrency=1), clock)
    await wait_until(lambda: len(client.waiting) == limit, what="the first polls")
    assert len(_poll_tasks()) == limit + 1  # and the scheduler
    client.release(2)  # two slots free: two more of the due schedules start
    await wait_until(lambda: len(client.answered) == 2 and len(client.waiting) == limit, what="two more polls")
    while len(client.answered) < 10:
        assert len(client.waiting) <= limit and len(_poll_tasks()) <= limit + 1
        client.release(len(client.waiting))
        await wait_until(lambda: client.waiting or len(client.answered) == 10, what="the next polls")
    assert sorted(client.answered) == [f"s{i:03d}" for i in range(10)]  # each exactly once


async def test_idle_schedules_are_timers_not_tasks_and_each_polls_again_after_its_interval(
    running: list[Poller],
) -> None:
    poller, client, clock = await _polled_once(running, 50)
    assert _poll_tasks() == ["poll scheduler"]  # one task for 50 schedules
    assert poller.alive()
    clock.advance(3599)
    await asyncio.sleep(0)
    assert client.waiting == []  # not due yet
    clock.advance(1)
    await wait_until(lambda: len(client.waiting) == 50, what="the second polls")
    assert {q.org_set for q, _ in client.waiting} == {f"s{i:03d}" for i in range(50)}


async def test_a_reload_adds_a_schedule_due_before_the_scheduler_would_wake(running: list[Poller]) -> None:
    poller, client, _ = await _polled_once(running, 2)
    # The scheduler sleeps for an hour; a new org set is due now (jitter 0) and must not wait.
    poller.apply_config(_config(3))
    await wait_until(lambda: [q.org_set for q, _ in client.waiting] == ["s002"], what="the new org set's poll")


async def test_a_reload_removing_a_schedule_cancels_its_poll_and_never_polls_it_again(
    running: list[Poller],
) -> None:
    client, clock = HeldClient(), SteppedClock()
    poller = _start(running, client, _config(2), clock)
    await wait_until(lambda: len(client.waiting) == 2, what="the first polls")
    poller.apply_config(_config(1))  # s001 goes, its request still in flight
    await wait_until(lambda: len(_poll_tasks()) == 2, what="the removed schedule's poll to be cancelled")
    client.release(1)  # s000's
    await wait_until(lambda: client.answered == ["s000"] and len(_poll_tasks()) == 1, what="s000's poll")
    clock.advance(3600)
    await wait_until(lambda: len(client.waiting) == 2, what="the next polls")  # s001's cancelled future, s000
    assert [q.org_set for q, r in client.waiting if not r.cancelled()] == ["s000"]


@pytest.mark.parametrize("turns", range(8))
async def test_stop_ends_the_scheduler_whatever_it_was_doing(running: list[Poller], turns: int) -> None:
    # A stop() that landed while the scheduler was tidying up after a wake-up used to be
    # swallowed: the scheduler slept on and the process hung on SIGTERM. Stop at each step.
    poller, _, _ = await _polled_once(running, 1)
    poller._changed.set()  # wakes it, as a reload or a freed poll slot does
    for _ in range(turns):
        await asyncio.sleep(0)
    await asyncio.wait_for(poller.stop(), 5)
    assert not poller.alive() and _poll_tasks() == []
