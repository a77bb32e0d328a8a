"""benchmarks/bench.py imports, runs end to end at a tiny size against the real
server (no peers), leaves no lock behind, and benchmarks/table.py renders its
JSON. Rates are not asserted: this is not a timed test."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import pytest

from tests._helpers import PgServer

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = _load("bench")
table = _load("table")


def test_help_runs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        bench.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--loop" in out and "--json" in out


async def _advisory_locks_of_bench(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_locks AS l JOIN pg_stat_activity AS a USING (pid) "
            "WHERE l.locktype = 'advisory' AND a.application_name = $1",
            bench.APPLICATION_NAME,
        )
        return count
    finally:
        await conn.close()


async def test_tiny_run_and_table(
    pg_server: PgServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(
        bench,
        "WORKLOADS",
        {name: (kind, 100) for name, (kind, _) in bench.WORKLOADS.items()},
    )
    monkeypatch.setattr(
        bench,
        "LIMITS",
        {name: (unit, what, 1000) for name, (unit, what, _) in bench.LIMITS.items()},
    )
    monkeypatch.setattr(bench, "HELD_FOR_MEMORY", 100)
    monkeypatch.setattr(bench, "FAILOVER_ROUNDS", 3)
    monkeypatch.setattr(bench, "SEMAPHORE_WAKEUPS", 5)
    monkeypatch.setattr(bench, "SERVER_NAMES_CYCLES", 20)
    run = bench.Run(
        dsn=pg_server.dsn,
        rounds=1,
        progress=bench.Progress(quiet=True),
        skip=["django", "sqlalchemy", "redis"],
    )
    results: dict[str, Any] = await bench.measure(run, "asyncio", True)
    assert set(results["skipped"]) == {bench.DJANGO, bench.SQLALCHEMY, bench.REDIS}
    workloads = results["workloads"]
    assert set(workloads) == set(bench.WORKLOADS)
    for rows in workloads.values():
        assert all(row["per_second"] > 0 for row in rows.values())
    held = workloads["10,000 locks held at once"]
    assert set(held) == {bench.LOCKER}  # the pinning contenders sit it out
    # The Locker held its 100 locks on the server, on few connections.
    assert 1 <= held[bench.LOCKER]["connections"] <= 2
    limits = results["limits"]
    many = limits["aiopglock.advisory_many of 1,000 keys (pool)"]
    import aiopglock

    assert ("skipped" in many) == (not hasattr(aiopglock, "advisory_many"))
    assert all("per_second" in got for name, got in limits.items() if got is not many)
    for got in results["memory"].values():
        assert got["held_on_server"] == 100
        assert got["bytes_per_lock"] > 0
    failover = results["failover"]
    assert len(failover["ms"]) == 3 and failover["median_ms"] > 0
    names = results["server_names"]
    assert set(names["per_second"]) == {"named", "unnamed", "int key"} and names["ratio"] > 0
    assert aiopglock._names.enabled()  # the measurement puts the default back
    assert await _advisory_locks_of_bench(pg_server.dsn) == 0

    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    rendered = table.render([json.loads(path.read_text())] * 2, targets=True)
    assert "| sequential cycles (1 task) |" in rendered
    assert "asyncio floor, no I/O" in rendered
    assert "| Locker hot key / by hand | >= 10.0x |" in rendered
    for got in results["memory"].values():
        assert got["exit_stack_bytes_per_entry"] > 0
    assert bench.report(results).startswith("workload")
    assert "leader failover (terminate to new term): median" in bench.report(results)


async def test_a_failing_contender_is_noted_and_the_run_goes_on(pg_server: PgServer) -> None:
    import contextlib
    from collections.abc import AsyncIterator

    @contextlib.asynccontextmanager
    async def broken(pool: Any) -> AsyncIterator[Any]:
        async def cycle(key: int, inside: Any) -> None:
            raise asyncpg.exceptions.OutOfMemoryError("out of shared memory")

        yield cycle

    run = bench.Run(dsn=pg_server.dsn, rounds=2, progress=bench.Progress(quiet=True))
    run.contenders = {bench.BASELINE: bench.by_hand, "broken": broken}
    pool = await asyncpg.create_pool(pg_server.dsn, min_size=1, max_size=bench.POOL_SIZE)
    admin = await asyncpg.connect(pg_server.dsn)
    try:
        got = await bench.measure_workload(run, pool, admin, "hot", "hot", 100)
    finally:
        await admin.close()
        await pool.close()
    assert got["broken"] == {"failed": "OutOfMemoryError: out of shared memory"}
    assert len(got[bench.BASELINE]["rounds"]) == 2
    results = {
        "meta": {
            "loop": "asyncio",
            "rounds": 2,
            "server_version": "18",
            "python": "3",
            "cpus": 2,
            "pool_size": 10,
        },
        "baseline": bench.BASELINE,
        "contenders": {bench.BASELINE: "", "broken": ""},
        "skipped": {},
        "workloads": {"hot": got},
        "limits": {},
        "memory": {},
    }
    assert "failed broken on hot" in bench.report(results)
    assert "| hot |" in table.render([results]) and "| failed |" in table.render([results])
