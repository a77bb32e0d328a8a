"""``LockerState``, the bookkeeping of a Locker, without a server.

Every transition of an entry (idle, acquiring, held, releasing) and of a
request (queued, in flight, waiting, granted, done, abandoned), driven as
the Locker's driver drives it: requests in, the server's answers back, and
cancellation (abandonment) at each state of a request.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiopglock._errors import UsageError
from aiopglock._keys import AdvisoryKey
from aiopglock._locker_entry import (
    HANDOFF_LIMIT,
    Dedicated,
    Entry,
    EntryState,
    Request,
    RequestState,
    settle,
)
from aiopglock._locker_state import LockerState

HOLDER = object()  # stands for the holder connection
PID = 4242


class FakeHandle:
    """What a LockerLock offers the state."""

    def __init__(self, key: AdvisoryKey = 1, *, shared: bool = False, timeout: float | None = None):
        self.key = key
        self.shared = shared
        self.acquired = False
        self.pid: int | None = None
        self._timeout = timeout
        self._entry: Entry | None = None
        self.lost: list[str] = []

    def _mark_lost(self, reason: str) -> None:
        self.lost.append(reason)


class Driver:
    """The state, attached to the running loop, with a wake counter."""

    def __init__(self, *, holder_ready: bool = True) -> None:
        self.state = LockerState()
        self.wakes = 0
        self.ready = holder_ready
        self.state.attach(
            asyncio.get_running_loop(), wake=self._wake, holder_ready=lambda: self.ready
        )

    def _wake(self) -> None:
        self.wakes += 1

    def ask(self, handle: FakeHandle) -> Request:
        got = self.state.request(handle)
        assert isinstance(got, Request)
        return got

    def batch(self) -> tuple[list[Entry], list[Entry]]:
        return self.state.take_batch()

    def grant_all(self) -> None:
        locks, unlocks = self.batch()
        assert not unlocks
        for entry in locks:
            assert self.state.locked(entry, HOLDER, PID, True) is None

    def unlock_all(self, ok: bool = True) -> None:
        locks, unlocks = self.batch()
        assert not locks
        for entry in unlocks:
            self.state.released(entry, ok)

    def held(self, handle: FakeHandle) -> Request:
        req = self.ask(handle)
        self.grant_all()
        assert req.fut.result() is True
        return req


# --------------------------------------------------------------------------- the enums


def test_states_are_enums() -> None:
    assert {s.name for s in EntryState} == {"IDLE", "ACQUIRING", "HELD", "RELEASING"}
    assert {s.name for s in RequestState} == {
        "QUEUED",
        "INFLIGHT",
        "WAITING",
        "GRANTED",
        "DONE",
        "ABANDONED",
    }


# --------------------------------------------------------------------------- the happy paths


async def test_new_key_goes_to_the_batch_then_is_granted() -> None:
    d = Driver()
    h = FakeHandle(7)
    req = d.ask(h)
    entry = d.state.entries[7]
    assert req.state is RequestState.INFLIGHT
    assert entry.state is EntryState.ACQUIRING and entry.req is req
    assert d.state.locks == [entry] and d.wakes == 1
    assert req.timer is None  # no timeout: nothing armed
    d.grant_all()
    assert entry.state is EntryState.HELD and entry.where is HOLDER and entry.pid == PID
    assert req.state is RequestState.GRANTED and req.fut.result() is True
    assert h.acquired and h.pid == PID and h._entry is entry and entry.holders == {h}


async def test_release_goes_to_the_batch_then_the_entry_goes() -> None:
    d = Driver()
    h = FakeHandle()
    d.held(h)
    entry = d.state.entries[1]
    wait = d.state.release(h)
    assert wait is not None and not wait.done()
    assert entry.state is EntryState.RELEASING and d.state.unlocks == [entry]
    assert h._entry is None
    d.unlock_all(True)
    assert wait.result() is True
    assert entry.state is EntryState.IDLE and entry.where is None
    assert entry.last_release == (wait, True)
    assert d.state.entries == {}


async def test_release_answered_not_held() -> None:
    d = Driver()
    h = FakeHandle()
    d.held(h)
    wait = d.state.release(h)
    assert wait is not None
    d.unlock_all(False)
    assert wait.result() is False


async def test_release_twice_is_nothing() -> None:
    d = Driver()
    h = FakeHandle()
    d.held(h)
    assert d.state.release(h) is not None
    assert d.state.release(h) is None


async def test_refused_try_lock_with_no_wait() -> None:
    d = Driver()
    h = FakeHandle(timeout=0)
    req = d.ask(h)
    (entry,), _ = d.batch()
    assert d.state.locked(entry, HOLDER, PID, False) is None
    assert req.fut.result() is False and req.state is RequestState.DONE
    assert not h.acquired and d.state.entries == {}


async def test_contended_try_lock_waits_on_a_dedicated_connection() -> None:
    d = Driver()
    h = FakeHandle(timeout=30)
    req = d.ask(h)
    (entry,), _ = d.batch()
    assert d.state.locked(entry, HOLDER, PID, False) is req
    assert req.state is RequestState.WAITING and entry.state is EntryState.ACQUIRING
    assert req.timer is None
    dedicated = Dedicated()
    d.state.dedicated_held(entry, req, dedicated, 99)
    assert req.fut.result() is True and h.pid == 99 and entry.where is dedicated
    wait = d.state.release(h)
    assert wait is not None
    # A dedicated release wakes its task, not the holder's batch.
    assert dedicated.release.is_set() and d.state.unlocks == []
    d.state.dedicated_done(entry, dedicated, True)
    assert wait.result() is True and d.state.entries == {}


async def test_dedicated_wait_ends_without_the_lock() -> None:
    d = Driver()
    req = d.ask(FakeHandle(timeout=30))
    (entry,), _ = d.batch()
    d.state.locked(entry, HOLDER, PID, False)
    error = RuntimeError("boom")
    d.state.wait_ended(entry, req, error)
    assert req.fut.exception() is error and d.state.entries == {}


async def test_dedicated_wait_not_granted_within_timeout() -> None:
    d = Driver()
    req = d.ask(FakeHandle(timeout=30))
    (entry,), _ = d.batch()
    d.state.locked(entry, HOLDER, PID, False)
    d.state.wait_ended(entry, req, None)
    assert req.fut.result() is False


async def test_no_time_left_is_refused_not_waited() -> None:
    d = Driver()
    req = d.ask(FakeHandle(timeout=30))
    assert req.deadline is not None
    req.deadline = d.state._loop().time() - 1
    (entry,), _ = d.batch()
    assert d.state.locked(entry, HOLDER, PID, False) is None
    assert req.fut.result() is False


# --------------------------------------------------------------------------- local queues


async def test_second_exclusive_queues_and_no_wait_is_refused_at_once() -> None:
    d = Driver()
    d.held(FakeHandle())
    assert d.state.request(FakeHandle(timeout=0)) is False
    req = d.ask(FakeHandle())
    assert req.state is RequestState.QUEUED
    assert list(d.state.entries[1].waiters) == [req]
    assert d.state.locks == []  # no round trip for a local wait


async def test_exclusive_is_handed_over_without_a_round_trip() -> None:
    d = Driver()
    first = FakeHandle()
    d.held(first)
    second = FakeHandle(timeout=30)
    req = d.ask(second)
    assert req.timer is not None
    assert d.state.release(first) is None
    entry = d.state.entries[1]
    assert req.fut.result() is True and req.state is RequestState.GRANTED
    assert req.timer is None  # disarmed
    assert entry.handoffs == 1 and entry.state is EntryState.HELD
    assert d.state.unlocks == [] and entry.holders == {second}


async def test_hand_overs_stop_at_the_limit() -> None:
    d = Driver()
    h = FakeHandle()
    d.held(h)
    for _ in range(HANDOFF_LIMIT):
        nxt = FakeHandle()
        d.ask(nxt)
        assert d.state.release(h) is None
        h = nxt
    entry = d.state.entries[1]
    assert entry.handoffs == HANDOFF_LIMIT
    late = FakeHandle()
    req = d.ask(late)
    wait = d.state.release(h)
    assert wait is not None and entry.state is EntryState.RELEASING
    assert req.state is RequestState.QUEUED
    d.unlock_all(True)
    # Released to the server, then asked again for the next in line.
    assert wait.result() is True
    assert req.state is RequestState.INFLIGHT and d.state.locks == [entry]
    assert entry.handoffs == 0 and entry.state is EntryState.ACQUIRING


async def test_shared_joins_a_held_shared_key_at_once() -> None:
    d = Driver()
    a = FakeHandle(shared=True)
    d.held(a)
    b = FakeHandle(shared=True)
    assert d.state.request(b) is True
    entry = d.state.entries[1]
    assert entry.holders == {a, b} and b.pid == PID
    assert d.state.release(a) is None  # b still holds it
    assert d.state.release(b) is not None


async def test_shared_waits_behind_a_queued_exclusive() -> None:
    d = Driver()
    d.held(FakeHandle(shared=True))
    ex = d.ask(FakeHandle())
    sh = d.ask(FakeHandle(shared=True))
    assert ex.state is RequestState.QUEUED and sh.state is RequestState.QUEUED


async def test_shared_requests_at_the_head_join_a_grant() -> None:
    d = Driver()
    ex = FakeHandle()
    d.held(ex)
    s1, s2 = FakeHandle(shared=True), FakeHandle(shared=True)
    r1, r2 = d.ask(s1), d.ask(s2)
    gone = d.ask(FakeHandle(shared=True))
    gone.fut.cancel()
    r4 = d.ask(FakeHandle())
    assert d.state.release(ex) is not None  # a shared one is next: no hand-over
    d.unlock_all(True)
    assert r1.state is RequestState.INFLIGHT  # the next one asks the server
    d.grant_all()
    assert r1.fut.result() is True and r2.fut.result() is True
    assert gone.state is RequestState.ABANDONED and gone.settled is not None
    assert gone.settled.done()
    assert r4.state is RequestState.QUEUED
    assert d.state.entries[1].holders == {s1, s2}


async def test_queued_request_expires() -> None:
    d = Driver()
    d.held(FakeHandle())
    req = d.ask(FakeHandle(timeout=0.01))
    assert await req.fut is False
    assert req.state is RequestState.DONE and req.timer is None
    assert not d.state.entries[1].waiters


async def test_try_lock_expires_while_no_holder_connection() -> None:
    d = Driver(holder_ready=False)
    req = d.ask(FakeHandle(timeout=0.01))
    assert req.timer is not None
    assert await req.fut is False
    assert d.state.locks == [] and d.state.entries == {}


async def test_unsent_timer_is_harmless_once_sent() -> None:
    d = Driver(holder_ready=False)
    req = d.ask(FakeHandle(timeout=30))
    (entry,), _ = d.batch()
    d.state.expire_unsent(entry, req)  # fires after the batch took it
    assert not req.fut.done() and entry.state is EntryState.ACQUIRING


# --------------------------------------------------------------------------- abandonment


async def test_abandon_queued() -> None:
    d = Driver()
    d.held(FakeHandle())
    req = d.ask(FakeHandle(timeout=30))
    timer = req.timer
    assert timer is not None
    assert d.state.abandon(req) is None
    assert req.state is RequestState.DONE and req.timer is None and timer.cancelled()
    assert not d.state.entries[1].waiters


async def test_abandon_inflight_then_granted_is_released() -> None:
    d = Driver()
    h = FakeHandle()
    req = d.ask(h)
    settled = d.state.abandon(req)
    assert settled is not None and not settled.done()
    assert req.state is RequestState.ABANDONED
    d.grant_all()
    # Granted for nobody: the Locker unlocks it before the caller goes on.
    assert not h.acquired and not settled.done()
    entry = d.state.entries[1]
    assert entry.state is EntryState.RELEASING and d.state.unlocks == [entry]
    d.unlock_all(True)
    await asyncio.sleep(0)  # the settle callback runs on the loop
    assert settled.done() and d.state.entries == {}


async def test_abandon_inflight_then_refused() -> None:
    d = Driver()
    req = d.ask(FakeHandle(timeout=0))
    settled = d.state.abandon(req)
    assert settled is not None
    (entry,), _ = d.batch()
    d.state.locked(entry, HOLDER, PID, False)
    assert settled.done() and not req.fut.done()


async def test_abandon_twice_gives_the_same_future() -> None:
    d = Driver()
    req = d.ask(FakeHandle())
    first = d.state.abandon(req)
    assert first is not None and d.state.abandon(req) is first


async def test_abandon_waiting_cancels_its_task() -> None:
    d = Driver()
    req = d.ask(FakeHandle(timeout=30))
    (entry,), _ = d.batch()
    d.state.locked(entry, HOLDER, PID, False)
    never = asyncio.Event()

    async def wait() -> None:
        await never.wait()

    task = asyncio.get_running_loop().create_task(wait())
    req.task = task
    settled = d.state.abandon(req)
    assert settled is not None and req.state is RequestState.ABANDONED
    await asyncio.wait({task}, timeout=10)
    assert task.cancelled()
    d.state.wait_ended(entry, req, None)  # what the task reports
    assert settled.done() and d.state.entries == {}


async def test_abandon_waiting_granted_late_is_released() -> None:
    d = Driver()
    req = d.ask(FakeHandle(timeout=30))
    (entry,), _ = d.batch()
    d.state.locked(entry, HOLDER, PID, False)
    settled = d.state.abandon(req)
    assert settled is not None
    dedicated = Dedicated()
    d.state.dedicated_held(entry, req, dedicated, 99)
    assert dedicated.release.is_set() and entry.state is EntryState.RELEASING
    d.state.dedicated_done(entry, dedicated, True)
    await asyncio.sleep(0)
    assert settled.done() and d.state.entries == {}


async def test_abandon_granted_releases() -> None:
    d = Driver()
    h = FakeHandle()
    req = d.held(h)
    wait = d.state.abandon(req)
    assert wait is not None and req.state is RequestState.DONE
    assert d.state.entries[1].state is EntryState.RELEASING
    d.unlock_all(True)
    assert wait.result() is True


async def test_abandon_done_is_nothing() -> None:
    d = Driver()
    req = d.ask(FakeHandle(timeout=0))
    (entry,), _ = d.batch()
    d.state.locked(entry, HOLDER, PID, False)
    assert req.state is RequestState.DONE
    assert d.state.abandon(req) is None


async def test_cancelled_waiter_is_skipped_at_hand_over() -> None:
    d = Driver()
    first = FakeHandle()
    d.held(first)
    gone = d.ask(FakeHandle())
    gone.fut.cancel()  # the caller's wait was cancelled; abandon() not yet run
    nxt = FakeHandle()
    req = d.ask(nxt)
    assert d.state.release(first) is None
    assert gone.state is RequestState.ABANDONED
    assert gone.settled is not None and gone.settled.done()
    assert req.fut.result() is True and nxt.acquired


async def test_cancelled_waiter_is_dropped_when_idle() -> None:
    d = Driver()
    first = FakeHandle(shared=True)
    d.held(first)
    gone = d.ask(FakeHandle())
    gone.fut.cancel()
    wait = d.state.release(first)
    assert wait is not None
    d.unlock_all(True)
    assert gone.state is RequestState.ABANDONED and d.state.entries == {}


# --------------------------------------------------------------------------- losses


async def test_holder_death_loses_its_keys_and_their_release_is_local() -> None:
    d = Driver()
    a, b = FakeHandle(1), FakeHandle(2)
    d.held(a)
    d.held(b)
    d.state.lose_on(HOLDER, "gone")
    assert a.lost == ["gone"] and b.lost == ["gone"]
    assert d.state.entries[1].lost
    assert d.state.release(a) is None  # nothing to unlock on a dead connection
    assert 1 not in d.state.entries


async def test_lost_key_is_not_shared_in_place() -> None:
    d = Driver()
    d.held(FakeHandle(shared=True))
    d.state.lose_on(HOLDER, "gone")
    req = d.state.request(FakeHandle(shared=True))
    assert isinstance(req, Request) and req.state is RequestState.QUEUED


async def test_retire_answers_unlocks_of_the_dead_connection() -> None:
    d = Driver()
    h = FakeHandle()
    d.held(h)
    wait = d.state.release(h)
    assert wait is not None
    d.state.retire(HOLDER)
    assert wait.result() is False and d.state.unlocks == []


async def test_batch_undone_asks_again() -> None:
    d = Driver()
    h = FakeHandle()
    d.held(h)
    wait = d.state.release(h)
    req = d.ask(FakeHandle(2))
    locks, unlocks = d.batch()
    d.state.batch_undone(locks, unlocks)
    assert wait is not None and wait.result() is False
    assert d.state.locks == locks and req.state is RequestState.INFLIGHT


async def test_dedicated_death_loses_then_idles() -> None:
    d = Driver()
    h = FakeHandle(timeout=30)
    req = d.ask(h)
    (entry,), _ = d.batch()
    d.state.locked(entry, HOLDER, PID, False)
    dedicated = Dedicated()
    d.state.dedicated_held(entry, req, dedicated, 99)
    d.state.dedicated_died(entry, dedicated, "closed")
    d.state.dedicated_died(entry, dedicated, "twice")  # once only
    assert h.lost == ["closed"] and dedicated.release.is_set()
    d.state.dedicated_done(entry, dedicated, False)
    assert h.lost == ["closed", "closed"]
    assert d.state.release(h) is None and d.state.entries == {}


async def test_fail_locks() -> None:
    d = Driver()
    req = d.ask(FakeHandle())
    error = OSError("no connection")
    d.state.fail_locks(error)
    assert req.fut.exception() is error and d.state.entries == {}


# --------------------------------------------------------------------------- closing


async def test_close_fails_everything_and_loses_what_is_held() -> None:
    d = Driver()
    held = FakeHandle(1)
    d.held(held)
    queued = d.ask(FakeHandle(1))
    gone = d.ask(FakeHandle(1))
    gone.fut.cancel()
    releasing = FakeHandle(2)
    d.held(releasing)
    wait = d.state.release(releasing)
    unsent = d.ask(FakeHandle(3))
    unlocks = d.state.close()
    assert d.state.closed and held.lost == ["the Locker was closed"]
    assert isinstance(unsent.fut.exception(), UsageError)
    assert [e.key for e in unlocks] == [2] and d.state.unlocks == []
    d.state.closed_down(unlocks)
    assert wait is not None and wait.result() is True
    assert isinstance(queued.fut.exception(), UsageError)
    assert gone.state is RequestState.ABANDONED


async def test_closed_refuses_contended_waits() -> None:
    d = Driver()
    req = d.ask(FakeHandle(timeout=30))
    (entry,), _ = d.batch()
    d.state.closed = True
    assert d.state.locked(entry, HOLDER, PID, False) is None
    assert isinstance(req.fut.exception(), UsageError)


async def test_closed_wait_ended_is_an_error() -> None:
    d = Driver()
    req = d.ask(FakeHandle(timeout=30))
    (entry,), _ = d.batch()
    d.state.locked(entry, HOLDER, PID, False)
    d.state.closed = True
    d.state.wait_ended(entry, req, None)
    assert isinstance(req.fut.exception(), UsageError)


# ------------------------------------------------------------------- a cancelled unlock wait


async def test_rewait_after_an_interrupted_unlock_wait() -> None:
    d = Driver()
    h = FakeHandle()
    d.held(h)
    entry = h._entry
    wait = d.state.release(h)
    assert wait is not None
    wait.cancel()
    again = d.state.rewait(entry, wait)
    assert isinstance(again, asyncio.Future) and entry is not None
    assert entry.release is again
    d.unlock_all(False)
    assert again.result() is False


async def test_rewait_when_answered_meanwhile() -> None:
    d = Driver()
    h = FakeHandle()
    d.held(h)
    entry = h._entry
    wait = d.state.release(h)
    assert wait is not None and entry is not None
    wait.cancel()  # the caller's wait, cancelled before the answer came
    d.unlock_all(False)
    assert d.state.rewait(entry, wait) is False  # the answer kept for it
    other: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    other.cancel()
    assert d.state.rewait(entry, other) is True


async def test_rewait_when_answered_before() -> None:
    d = Driver()
    h = FakeHandle()
    d.held(h)
    wait = d.state.release(h)
    assert wait is not None
    d.unlock_all(False)
    assert d.state.rewait(None, wait) is False


async def test_closing_fails_the_queue_as_the_key_goes_idle() -> None:
    d = Driver()
    held = FakeHandle()
    d.held(held)
    queued = d.ask(FakeHandle())
    d.state.closed = True
    d.state.lose_on(HOLDER, "gone")
    assert d.state.release(held) is None
    assert isinstance(queued.fut.exception(), UsageError)
    assert d.state.locks == [] and d.state.entries == {}


async def test_a_late_timer_leaves_a_granted_request_alone() -> None:
    d = Driver()
    d.held(FakeHandle())
    h = FakeHandle(timeout=30)
    req = d.ask(h)
    entry = d.state.entries[1]
    d.state.release(next(iter(entry.holders)))  # handed over to h
    d.state.expire(entry, req)  # a timer that fired as it was disarmed
    assert req.fut.result() is True and req.state is RequestState.GRANTED and h.acquired


# --------------------------------------------------------------------------- the records


async def test_request_timer_is_armed_once_and_disarmed_one_way() -> None:
    loop = asyncio.get_running_loop()
    fired: list[Request] = []
    entry = Entry(1, False)
    req = Request(FakeHandle(timeout=30), loop)
    req.arm(loop, lambda _e, r: fired.append(r), entry)
    timer = req.timer
    assert timer is not None and req.remaining(loop) is not None
    req.arm(loop, lambda _e, r: fired.append(r), entry)  # armed already: kept
    assert req.timer is timer
    req.disarm()
    assert req.timer is None and timer.cancelled()
    req.disarm()  # twice: nothing
    untimed = Request(FakeHandle(), loop)
    untimed.arm(loop, lambda _e, r: fired.append(r), entry)
    assert untimed.timer is None and untimed.remaining(loop) is None
    expiring = Request(FakeHandle(timeout=0.001), loop)
    expiring.arm(loop, lambda _e, r: fired.append(r), entry)
    await asyncio.sleep(0.01)
    assert fired == [expiring] and expiring.remaining(loop) == 0.0


async def test_request_abandoned_is_one_future() -> None:
    loop = asyncio.get_running_loop()
    req = Request(FakeHandle(), loop)
    assert not req.gone()
    settled = req.abandoned(loop)
    assert req.state is RequestState.ABANDONED and req.gone() and not settled.done()
    assert req.abandoned(loop) is settled
    settle(settled)
    settle(settled)  # twice: nothing
    assert settled.result() is None


async def test_request_answer_disarms() -> None:
    loop = asyncio.get_running_loop()
    entry = Entry(1, False)
    granted, refused, failed = (Request(FakeHandle(timeout=30), loop) for _ in range(3))
    error = RuntimeError("boom")
    for req, (ok, err) in (
        (granted, (True, None)),
        (refused, (False, None)),
        (failed, (False, error)),
    ):
        req.arm(loop, lambda _e, _r: None, entry)
        req.answer(ok, err)
        assert req.timer is None
    assert granted.state is RequestState.GRANTED and granted.fut.result() is True
    assert refused.state is RequestState.DONE and refused.fut.result() is False
    assert failed.state is RequestState.DONE and failed.fut.exception() is error


async def test_entry_hold_and_reset() -> None:
    entry = Entry(1, True)
    entry.pid = PID
    h = FakeHandle(shared=True)
    entry.hold(h)
    assert entry.holders == {h} and h._entry is entry and h.pid == PID and h.acquired
    entry.state, entry.where, entry.lost, entry.handoffs = EntryState.HELD, HOLDER, True, 3
    entry.reset()
    assert (entry.state, entry.where, entry.pid, entry.lost, entry.handoffs) == (
        EntryState.IDLE,
        None,
        None,
        False,
        0,
    )


async def test_a_failed_unsent_try_lock_leaves_no_timer() -> None:
    """Every answer disarms: a try-lock failed while it waited for a holder
    connection does not keep its expiry armed."""
    d = Driver(holder_ready=False)
    req = d.ask(FakeHandle(timeout=30))
    timer = req.timer
    assert timer is not None
    d.state.fail_locks(OSError("no connection"))
    assert req.timer is None and timer.cancelled()


def test_the_state_does_no_io() -> None:
    """The bookkeeping imports nothing that talks to a server or runs tasks."""
    import ast
    import pathlib

    import aiopglock

    root = pathlib.Path(aiopglock.__file__).parent
    for name in ("_locker_entry.py", "_locker_keys.py", "_locker_state.py"):
        tree = ast.parse((root / name).read_text())
        imported = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert imported <= {
            "__future__",
            "asyncio",
            "collections",
            "collections.abc",
            "contextvars",
            "enum",
            "typing",
            "_errors",
            "_keys",
            "_locker_entry",
            "_locker_keys",
        }, (name, imported)
