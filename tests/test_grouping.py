"""Group commit: concurrent claims and finishes made as one script call per group.

The combiner alone (a slow ``run`` standing in for Redis), then the ledger's claims and finishes
from 32 threads against a real Redis, counted by Redis itself (``INFO commandstats``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import redis

from metrix_s2s import grouping
from metrix_s2s.grouping import GroupCommit
from metrix_s2s.ledger import ClaimState, FinishMode, Ledger, Limits
from metrix_s2s.ratelimit import RateLimit

THREADS = 32


class Slow:
    """A ``run`` that takes ``delay`` seconds and records each call's items."""

    def __init__(self, delay: float = 0.02, fail_on: str | None = None) -> None:
        self.delay = delay
        self.fail_on = fail_on
        self.calls: list[tuple[str, list[str]]] = []
        self.lock = threading.Lock()

    def __call__(self, key: str, items: list[str]) -> list[str]:
        with self.lock:
            self.calls.append((key, list(items)))
        time.sleep(self.delay)
        if self.fail_on in items:
            raise redis.ConnectionError("Redis went away")
        return [f"{key}:{item}" for item in items]


def timeout() -> BaseException:
    return redis.TimeoutError("no answer")


def run_threads(n: int, target: Callable[[int], object]) -> list[object]:
    """``target(i)`` in ``n`` threads started together; each one's result or exception."""
    results: list[object] = [None] * n
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = target(i)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_concurrent_calls_share_few_calls_and_each_gets_its_own_result() -> None:
    run = Slow()
    group: GroupCommit[str, str, str] = GroupCommit(run, timeout_s=10, on_timeout=timeout)
    results = run_threads(THREADS, lambda i: group("A" if i % 2 else "B", f"item{i}"))
    assert results == [f"{'A' if i % 2 else 'B'}:item{i}" for i in range(THREADS)]
    carried = sorted(item for _, items in run.calls for item in items)
    assert carried == sorted(f"item{i}" for i in range(THREADS))  # each item once
    assert all({item[4:].isdigit() for item in items} for _, items in run.calls)
    for key, items in run.calls:  # a call carries one key's items only
        assert {int(item[4:]) % 2 for item in items} == {1 if key == "A" else 0}
    # the first call of each key goes alone; the rest queue behind it
    assert len(run.calls) <= 6, run.calls
    assert (group.calls, group.items) == (len(run.calls), THREADS)


def test_one_caller_alone_calls_at_once() -> None:
    run = Slow(delay=0)
    group: GroupCommit[str, str, str] = GroupCommit(run, timeout_s=10, on_timeout=timeout)
    assert [group("A", "x"), group("A", "y")] == ["A:x", "A:y"]
    assert run.calls == [("A", ["x"]), ("A", ["y"])]


def test_a_failed_call_raises_in_each_caller_of_its_group_only() -> None:
    run = Slow(fail_on="item0")
    group: GroupCommit[str, str, str] = GroupCommit(run, timeout_s=10, on_timeout=timeout)
    failed: list[BaseException] = []

    def lead() -> None:
        try:
            group("A", "item0")
        except redis.ConnectionError as exc:
            failed.append(exc)

    first = threading.Thread(target=lead)
    first.start()
    time.sleep(0.005)  # item0's call is in flight: the others queue behind it
    results = run_threads(8, lambda i: group("A", f"item{i + 1}"))
    first.join(10)
    assert len(failed) == 1
    assert results == [f"A:item{i + 1}" for i in range(8)]
    assert run.calls[0] == ("A", ["item0"])
    # the key is free again after a failure
    assert group("A", "again") == "A:again"


def test_a_caller_queued_behind_a_call_that_never_returns_times_out() -> None:
    stuck = threading.Event()

    def run(key: str, items: list[str]) -> list[str]:
        if "hang" in items:
            stuck.wait(5)
        return items

    group: GroupCommit[str, str, str] = GroupCommit(run, timeout_s=0.2, on_timeout=timeout)
    hanging = threading.Thread(target=group, args=("A", "hang"))
    hanging.start()
    time.sleep(0.02)
    started = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        group("A", "waiter")
    assert 0.2 <= time.monotonic() - started < 2
    stuck.set()
    hanging.join(5)
    # the withdrawn caller's item was not run later, and the key works again
    assert group("A", "next") == "next"


class Interrupted(BaseException):
    """What a time limit or a killed greenlet raises in a caller (not an ``Exception``)."""


def interrupt_waits_of(monkeypatch: pytest.MonkeyPatch, victim: str, *, after: bool) -> None:
    """Make the thread named ``victim`` interrupted in its wait: before it returns, or just
    after it was woken (handed the lead or its outcome)."""

    class Event(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            if threading.current_thread().name == victim and not after:
                raise Interrupted
            woken = super().wait(timeout)
            if threading.current_thread().name == victim:
                raise Interrupted
            return woken

    monkeypatch.setattr("metrix_s2s.grouping.threading.Event", Event)


def start(
    group: GroupCommit[str, str, str], name: str, item: str, out: dict[str, object]
) -> threading.Thread:
    def call() -> None:
        try:
            out[name] = group("A", item)
        except BaseException as exc:
            out[name] = exc

    thread = threading.Thread(target=call, name=name)
    thread.start()
    return thread


def free(group: GroupCommit[str, str, str]) -> bool:
    """The key is free again: a call now runs at once, alone."""
    return group._busy == set() and not group._queued.get("A")


@pytest.mark.parametrize("after", [False, True], ids=["while-queued", "when-handed-the-lead"])
def test_an_interrupted_caller_never_leaves_the_key_busy_nor_its_group_stranded(
    monkeypatch: pytest.MonkeyPatch, after: bool
) -> None:
    interrupt_waits_of(monkeypatch, "victim", after=after)
    run = Slow(delay=0.1)
    group: GroupCommit[str, str, str] = GroupCommit(run, timeout_s=10, on_timeout=timeout)
    out: dict[str, object] = {}
    threads = [start(group, "leader", "first", out)]
    time.sleep(0.03)  # the leader's call is in flight
    threads.append(start(group, "victim", "victim-item", out))  # the oldest queued
    time.sleep(0.01)
    threads += [start(group, f"t{i}", f"item{i}", out) for i in range(3)]
    for t in threads:
        t.join(10)
    assert isinstance(out["victim"], Interrupted)
    assert out["leader"] == "A:first"
    assert [out[f"t{i}"] for i in range(3)] == [f"A:item{i}" for i in range(3)]
    assert "victim-item" not in [item for _, items in run.calls for item in items]
    assert free(group)
    assert group("A", "after") == "A:after"


def test_a_leader_interrupted_in_its_call_passes_the_lead_and_tells_its_group() -> None:
    calls: list[list[str]] = []

    def run(key: str, items: list[str]) -> list[str]:
        calls.append(list(items))
        time.sleep(0.1)
        if "doomed" in items:  # the leader of the second call is interrupted in it
            raise Interrupted
        return items

    group: GroupCommit[str, str, str] = GroupCommit(run, timeout_s=10, on_timeout=timeout)
    out: dict[str, object] = {}
    threads = [start(group, "first", "first", out)]
    time.sleep(0.03)
    threads.append(start(group, "doomed", "doomed", out))  # leads the next call
    time.sleep(0.01)
    threads += [start(group, f"t{i}", f"item{i}", out) for i in range(2)]
    for t in threads:
        t.join(10)
    assert out["first"] == "first"
    assert isinstance(out["doomed"], Interrupted)
    # the others of its group were told, as their own interrupted call would have left them
    assert all(isinstance(out[f"t{i}"], redis.TimeoutError) for i in range(2))
    assert calls == [["first"], ["doomed", "item0", "item1"]]
    assert free(group)
    assert group("A", "after") == "after"


# -- lingering while the pool is busy -------------------------------------------------------


def staggered(group: GroupCommit[str, str, str], n: int, gap_s: float) -> dict[str, object]:
    """``n`` threads, each calling ``gap_s`` after the one before and living on until all have
    called (as a pool's threads do: a thread's ident is reused once it ends): what each got."""
    out: dict[str, object] = {}
    done = threading.Event()

    def call(i: int) -> None:
        try:
            out[f"t{i}"] = group("A", f"item{i}")
        except BaseException as exc:
            out[f"t{i}"] = exc
        done.wait(10)

    threads = []
    for i in range(n):
        threads.append(threading.Thread(target=call, args=(i,)))
        threads[-1].start()
        time.sleep(gap_s)
    while len(out) < n and threads[-1].is_alive():
        time.sleep(0.001)
    done.set()
    for t in threads:
        t.join(10)
    return out


def test_while_the_pool_is_busy_a_free_key_waits_for_others_and_calls_for_them_all() -> None:
    # Given calls that never meet one in flight (each returns at once, the next comes 5 ms on)
    run = Slow(delay=0)
    group: GroupCommit[str, str, str] = GroupCommit(
        run, timeout_s=10, on_timeout=timeout, linger_s=0.1
    )
    # When eight threads call one after the other
    out = staggered(group, 8, 0.005)
    # Then each got its own result; the first went alone (no other thread had called yet) and
    # the second, the pool now busy, waited for the other six and called for them all
    assert out == {f"t{i}": f"A:item{i}" for i in range(8)}
    assert run.calls[0] == ("A", ["item0"])
    assert len(run.calls) <= 3, run.calls  # 2 unless this machine stalled a thread
    assert max(len(items) for _, items in run.calls) >= 5, run.calls
    assert free(group)


def test_without_a_linger_calls_that_never_meet_go_alone() -> None:
    run = Slow(delay=0)
    group: GroupCommit[str, str, str] = GroupCommit(run, timeout_s=10, on_timeout=timeout)
    staggered(group, 8, 0.005)
    assert [items for _, items in run.calls] == [[f"item{i}"] for i in range(8)]


class _Clock:
    """The group commit's ``time``: its clock, its sleeps recorded and not waited."""

    def __init__(self) -> None:
        self.slept: list[float] = []
        self.monotonic = time.monotonic

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


@pytest.fixture
def lingers(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The lingers callers wait, recorded (not waited)."""
    clock = _Clock()
    monkeypatch.setattr("metrix_s2s.grouping.time", clock)
    return clock.slept


def test_one_thread_alone_never_lingers(lingers: list[float]) -> None:
    run = Slow(delay=0)
    group: GroupCommit[str, str, str] = GroupCommit(
        run, timeout_s=10, on_timeout=timeout, linger_s=0.002
    )
    assert [group("A", f"x{i}") for i in range(20)] == [f"A:x{i}" for i in range(20)]
    assert lingers == []
    assert len(run.calls) == 20


def test_a_quiet_flow_never_lingers_and_a_busy_one_does(lingers: list[float]) -> None:
    run = Slow(delay=0)
    group: GroupCommit[str, str, str] = GroupCommit(
        run, timeout_s=10, on_timeout=timeout, linger_s=0.001
    )
    # threads calling 60 ms apart: far more than ten lingers (10 ms) between them
    staggered(group, 3, 0.06)
    assert lingers == []
    # threads calling 5 ms apart: those that find the key free linger (the first found no other)
    staggered(group, 5, 0.005)
    assert lingers
    assert set(lingers) == {0.001}


def test_threads_taking_turns_without_meeting_seldom_linger(lingers: list[float]) -> None:
    # Given two threads of a busy pool that take turns, 5 ms apart, never meeting a call
    run = Slow(delay=0)
    group: GroupCommit[str, str, str] = GroupCommit(
        run, timeout_s=10, on_timeout=timeout, linger_s=0.002
    )

    def turns(first_wait: float) -> None:
        time.sleep(first_wait)
        for n in range(20):
            group("A", f"{first_wait}-{n}")
            time.sleep(0.005)

    threads = [threading.Thread(target=turns, args=(w,)) for w in (0.0, 0.0025)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    # Then once their lingers had brought nobody for a while (five), the leaders went at once
    # but for a probe in eight: of 40 calls, about nine lingered
    assert len(run.calls) == 40
    assert 7 <= len(lingers) <= 12, lingers


def test_a_probe_that_brings_others_resumes_lingering() -> None:
    # Given a key whose lingers brought nobody for long, its next eligible leader due to probe
    run = Slow(delay=0)
    group: GroupCommit[str, str, str] = GroupCommit(
        run, timeout_s=10, on_timeout=timeout, linger_s=0.05
    )
    assert group("A", "warm") == "A:warm"  # this thread's call: the pool is busy from here on
    group._yield["A"] = 0.0
    group._skipped["A"] = grouping.PROBE_EVERY - 1
    # When threads call 5 ms apart
    out = staggered(group, 4, 0.005)
    # Then the probe waited for the others and called for them, and lingering pays again
    assert out == {f"t{i}": f"A:item{i}" for i in range(4)}
    assert max(len(items) for _, items in run.calls) >= 3, run.calls
    assert group._yield["A"] >= grouping.MIN_LINGER_YIELD


def test_a_caller_interrupted_while_it_lingers_hands_the_lead_to_those_queued(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a leader that is interrupted while it lingers, with two callers queued behind it
    queued = threading.Event()

    class Clock(_Clock):
        def sleep(self, seconds: float) -> None:
            if threading.current_thread().name == "lingerer":
                queued.wait(5)
                raise Interrupted

    monkeypatch.setattr("metrix_s2s.grouping.time", Clock())
    run = Slow(delay=0)
    group: GroupCommit[str, str, str] = GroupCommit(
        run, timeout_s=10, on_timeout=timeout, linger_s=0.05
    )
    assert group("A", "before") == "A:before"  # this thread's: the pool is busy from here on
    out: dict[str, object] = {}
    threads = [start(group, "lingerer", "lost", out)]
    wait_until_queued = time.monotonic() + 5
    while "A" not in group._busy and time.monotonic() < wait_until_queued:
        time.sleep(0.001)
    threads += [start(group, f"t{i}", f"item{i}", out) for i in range(2)]
    while len(group._queued.get("A", [])) < 2 and time.monotonic() < wait_until_queued:
        time.sleep(0.001)
    queued.set()
    for t in threads:
        t.join(10)
    # Then it is interrupted, its item not run; the others were called for, and the key is free
    assert isinstance(out["lingerer"], Interrupted)
    assert [out["t0"], out["t1"]] == ["A:item0", "A:item1"]
    assert "lost" not in [item for _, items in run.calls for item in items]
    assert free(group)


@pytest.fixture
def ledger(redis_client: redis.Redis) -> Ledger:
    return Ledger(redis_client, prefix="grp", ttl_s=3600, guard_ttl_s=30)


def evalsha_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_claims_and_finishes_of_32_threads_are_grouped_and_each_event_is_claimed_once(
    ledger: Ledger, redis_client: redis.Redis
) -> None:
    limits = Limits(RateLimit(1_000_000, burst=1_000))
    redis_client.config_resetstat()

    def attempt(i: int) -> tuple[str, int, bool, str]:
        event_id = f"ev{i % (THREADS // 2)}"  # two threads race for each event
        claim = ledger.claim(event_id, f"tok{i}", "A", limits)
        released = False
        if claim.state is ClaimState.OK:
            time.sleep(0.01)  # the POST
            released = ledger.finish(event_id, f"tok{i}", "A", FinishMode.DELIVERED, "200:1")
        return claim.state.value, claim.attempt, released, event_id

    results = run_threads(THREADS, attempt)
    assert not [r for r in results if isinstance(r, BaseException)], results
    winners = [r for r in results if isinstance(r, tuple) and r[0] == "ok"]
    # exactly one attempt per event got the claim (the other saw it busy or delivered)
    assert sorted(r[3] for r in winners) == sorted(f"ev{i}" for i in range(THREADS // 2))
    assert all(r[1] == 1 and r[2] for r in winners)
    for i in range(THREADS // 2):
        assert redis_client.get(f"grp:delivered:ev{i}") == b"200:1"
        assert not redis_client.exists(f"grp:inflight:ev{i}", f"grp:tries:ev{i}")
    calls = evalsha_calls(redis_client)
    assert calls < THREADS + THREADS // 2, f"{calls} script calls for 48 claims and finishes"
    assert ledger._claims.items == THREADS
