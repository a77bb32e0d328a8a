"""OpenTelemetry metrics, spans and log fields, recorded against real locks.

An SDK ``MeterProvider`` (in-memory reader) and ``TracerProvider``
(in-memory exporter) are installed once for this process (OpenTelemetry
lets a provider be set only once); each test reads what changed since it
started. That the instrumentation costs nothing without an SDK is shown in a
subprocess, where no provider is set.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import asyncpg
import opentelemetry.sdk.metrics as sdk_metrics
import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import StatusCode

import aiopglock
from aiopglock import _otel
from tests._helpers import PgServer, holders, wait_for_waiter, wait_until

_READER = InMemoryMetricReader()
_SPANS = InMemorySpanExporter()


def _install() -> None:
    if not isinstance(metrics.get_meter_provider(), sdk_metrics.MeterProvider):
        metrics.set_meter_provider(sdk_metrics.MeterProvider(metric_readers=[_READER]))
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_SPANS))
        trace.set_tracer_provider(provider)


Point = tuple[str, tuple[tuple[str, Any], ...]]


def _snapshot() -> dict[Point, float]:
    """Every data point now: (metric, sorted attributes) -> value (a
    histogram's count, a counter's sum)."""
    data = _READER.get_metrics_data()
    out: dict[Point, float] = {}
    if data is None:
        return out
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    attrs = tuple(sorted(dict(point.attributes or {}).items()))
                    value = getattr(point, "count", None)
                    if value is None:
                        value = point.value
                    out[metric.name, attrs] = float(value)
    return out


class Recorder:
    """What changed since the test started."""

    def __init__(self) -> None:
        self.start = _snapshot()
        _SPANS.clear()

    def delta(self, name: str, **attrs: str) -> float:
        """The change of metric ``name`` over points whose attributes include ``attrs``."""
        now = _snapshot()
        total = 0.0
        for (metric, point_attrs), value in now.items():
            if metric != name:
                continue
            d = dict(point_attrs)
            if all(d.get(f"aiopglock.{k.replace('_', '.')}") == v for k, v in attrs.items()):
                total += value - self.start.get((metric, point_attrs), 0.0)
        return total

    def spans(self) -> list[Any]:
        return [s for s in _SPANS.get_finished_spans() if s.name == "aiopglock.wait"]


@pytest.fixture
def otel() -> Iterator[Recorder]:
    _install()
    yield Recorder()
    _otel.set_record_names(False)


async def test_an_acquired_lock_records_its_wait_hold_and_count(
    otel: Recorder, pool: asyncpg.Pool
) -> None:
    async with aiopglock.advisory("otel:acquired", db=pool) as lock:
        assert lock
        assert otel.delta("aiopglock.locks.held", lock_kind="advisory") == 1
    assert otel.delta("aiopglock.locks.held", lock_kind="advisory") == 0
    assert (
        otel.delta(
            "aiopglock.lock.wait.duration",
            lock_kind="advisory",
            lock_mode="exclusive",
            lock_outcome="acquired",
        )
        == 1
    )
    assert (
        otel.delta("aiopglock.lock.hold.duration", lock_kind="advisory", lock_outcome="released")
        == 1
    )
    (span,) = otel.spans()
    assert span.status.status_code is StatusCode.OK
    assert span.attributes["aiopglock.lock.key"] == aiopglock.advisory_key("otel:acquired")
    assert "aiopglock.lock.name" not in span.attributes


async def test_a_busy_key_records_not_acquired(
    otel: Recorder, pool: asyncpg.Pool, connect: Any
) -> None:
    other = await connect()
    key = aiopglock.advisory_key("otel:busy")
    await other.execute("SELECT pg_advisory_lock($1)", key)
    async with aiopglock.advisory("otel:busy", db=pool, timeout=0, shared=True) as lock:
        assert not lock
    assert (
        otel.delta(
            "aiopglock.lock.wait.duration",
            lock_kind="advisory",
            lock_mode="shared",
            lock_outcome="not_acquired",
        )
        == 1
    )
    assert otel.delta("aiopglock.locks.held") == 0
    assert otel.delta("aiopglock.lock.hold.duration") == 0
    (span,) = otel.spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["aiopglock.lock.outcome"] == "not_acquired"


async def test_a_cancelled_wait_records_cancelled(
    otel: Recorder, pool: asyncpg.Pool, connect: Any, admin: asyncpg.Connection
) -> None:
    other = await connect()
    key = aiopglock.advisory_key("otel:cancel")
    await other.execute("SELECT pg_advisory_lock($1)", key)

    async def wait() -> None:
        async with aiopglock.advisory("otel:cancel", db=pool):
            raise AssertionError("granted while held elsewhere")

    task = asyncio.create_task(wait())
    await wait_for_waiter(admin, key)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (
        otel.delta("aiopglock.lock.wait.duration", lock_kind="advisory", lock_outcome="cancelled")
        == 1
    )
    assert otel.delta("aiopglock.locks.held") == 0
    assert await holders(admin, key) == [other.get_server_pid()]


async def test_a_lost_lock_counts_and_logs_its_fields(
    otel: Recorder,
    pool: asyncpg.Pool,
    admin: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="aiopglock")
    with pytest.raises(aiopglock.LockLost):
        async with aiopglock.advisory("otel:lost", db=pool) as lock:
            assert lock.pid is not None
            await admin.execute("SELECT pg_terminate_backend($1)", lock.pid)
            await asyncio.sleep(30)  # cancelled by the loss
    assert otel.delta("aiopglock.locks.lost", lock_kind="advisory") == 1
    assert otel.delta("aiopglock.lock.hold.duration", lock_outcome="lost") == 1
    assert otel.delta("aiopglock.locks.held") == 0
    lost = [r for r in caplog.records if getattr(r, "outcome", None) == "lost"]
    assert lost, [r.getMessage() for r in caplog.records]
    record = lost[0]
    assert record.key == aiopglock.advisory_key("otel:lost")  # type: ignore[attr-defined]
    assert record.pid == lock.pid  # type: ignore[attr-defined]
    assert record.kind == "advisory"  # type: ignore[attr-defined]


async def test_table_and_rows_record_their_kind_and_mode(
    otel: Recorder, pool: asyncpg.Pool, tables: Any
) -> None:
    name = "otel_t"
    await tables.create(name)
    await tables.admin.execute(f"INSERT INTO {name} SELECT g, 'v' FROM generate_series(1, 3) g")
    async with aiopglock.table(name, db=pool, mode="SHARE") as t:
        assert t
        assert otel.delta("aiopglock.locks.held", lock_kind="table", lock_mode="SHARE") == 1
    async with aiopglock.rows(f"SELECT * FROM {name}", db=pool, strength="share") as r:
        assert r
    assert (
        otel.delta("aiopglock.lock.wait.duration", lock_kind="table", lock_outcome="acquired") == 1
    )
    assert (
        otel.delta(
            "aiopglock.lock.wait.duration",
            lock_kind="rows",
            lock_mode="SHARE",
            lock_outcome="acquired",
        )
        == 1
    )
    assert otel.delta("aiopglock.locks.held") == 0


async def test_a_locker_records_like_advisory(otel: Recorder, pool: asyncpg.Pool) -> None:
    async with aiopglock.Locker(pool) as locker:
        for i in range(5):
            async with locker.advisory((7, i)) as lock:
                assert lock
    assert (
        otel.delta("aiopglock.lock.wait.duration", lock_kind="advisory", lock_outcome="acquired")
        == 5
    )
    assert otel.delta("aiopglock.locks.held") == 0
    keys = sorted(tuple(span.attributes["aiopglock.lock.key"]) for span in otel.spans())
    assert keys == [(7, i) for i in range(5)]


async def test_names_are_recorded_only_when_asked(otel: Recorder, pool: asyncpg.Pool) -> None:
    aiopglock.configure(record_names=True)
    try:
        async with aiopglock.advisory("otel:<b>named</b>", db=pool) as lock:
            assert lock
    finally:
        aiopglock.configure(record_names=False)
    (span,) = otel.spans()
    assert span.attributes["aiopglock.lock.name"] == "otel:<b>named</b>"


def test_record_names_is_validated() -> None:
    with pytest.raises(TypeError, match="record_names"):
        aiopglock.configure(record_names="yes")


def test_without_an_sdk_nothing_is_made(pg_server: PgServer) -> None:
    """No provider set: the lock works and aiopglock made no instrument."""
    script = textwrap.dedent(
        f"""
        import asyncio, asyncpg, aiopglock
        from aiopglock import _otel

        async def main():
            pool = await asyncpg.create_pool({pg_server.dsn!r}, min_size=1, max_size=1)
            async with aiopglock.advisory("otel:nosdk", db=pool) as lock:
                assert lock
            await pool.close()
            assert _otel._instruments is None, _otel._instruments
            print("ok")

        asyncio.run(main())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


async def test_the_monitor_counts_its_actions(
    otel: Recorder, pool: asyncpg.Pool, connect: Any, admin: asyncpg.Connection
) -> None:
    blocker = await connect()
    key = aiopglock.advisory_key("otel:watchdog")
    await blocker.execute("SELECT pg_advisory_lock($1)", key)
    waiter = await connect()
    wait = asyncio.create_task(waiter.execute("SELECT pg_advisory_lock($1)", key))
    await wait_for_waiter(admin, key)
    acted = asyncio.Event()
    async with aiopglock.Watchdog(
        pool,
        max_wait=0.05,
        interval=0.05,
        action=aiopglock.Terminate,
        dry_run=True,
        callback=lambda _i: acted.set(),
    ):
        await asyncio.wait_for(acted.wait(), 10)

    async def counted() -> bool:
        return (
            otel.delta("aiopglock.monitor.actions", monitor="watchdog", monitor_action="dry_run")
            >= 1
        )

    await wait_until(counted)
    wait.cancel()
    await asyncio.gather(wait, return_exceptions=True)


async def test_nested_entries_count_one_lock_and_one_loss(
    otel: Recorder, pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    """Three nested entries of one key hold one server lock: held counts 1,
    and its loss counts once, when it is noticed (before the exit)."""
    spec = aiopglock.advisory("otel:nested", db=pool, cancel_on_lost=False)
    with pytest.raises(aiopglock.LockLost):
        async with spec as outer, spec, spec:
            assert otel.delta("aiopglock.locks.held", lock_kind="advisory") == 1
            await admin.execute("SELECT pg_terminate_backend($1)", outer.pid)

            async def lost_counted() -> bool:
                return otel.delta("aiopglock.locks.lost", lock_kind="advisory") == 1

            await wait_until(lost_counted)  # noticed while the block still runs
    assert otel.delta("aiopglock.locks.lost", lock_kind="advisory") == 1
    assert otel.delta("aiopglock.locks.held") == 0
    assert otel.delta("aiopglock.lock.wait.duration", lock_outcome="acquired") == 3


async def test_a_lost_semaphore_slot_is_a_semaphore_loss(
    otel: Recorder,
    pool: asyncpg.Pool,
    admin: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="aiopglock")
    with pytest.raises(aiopglock.LockLost):
        async with aiopglock.semaphore("otel:slot", 2, db=pool) as slot:
            await admin.execute("SELECT pg_terminate_backend($1)", slot.pid)
            await asyncio.sleep(30)  # cancelled by the loss
    assert otel.delta("aiopglock.locks.lost", lock_kind="semaphore") == 1
    assert otel.delta("aiopglock.locks.lost", lock_kind="advisory") == 0
    assert otel.delta("aiopglock.locks.held") == 0
    kinds = [getattr(r, "kind", None) for r in caplog.records if "lost" in r.getMessage()]
    assert kinds == ["semaphore"]
