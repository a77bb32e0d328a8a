"""Render the Markdown tables of the README's "Benchmarks" section from the
JSON that ``benchmarks/bench.py --json PATH`` writes.

    python benchmarks/table.py results.json [more.json ...] > table.md

With several files (say three runs, or one per loop) every cell shows the
range over the runs, lowest to highest; the contenders, limits and memory
rows are those of all the runs, in the order of the first.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

#: The limit rows, and the contender's workload each is set against.
AGAINST: dict[str, tuple[str, str, str]] = {
    "one round trip per cycle (1 connection)": (
        "aiopglock.Locker",
        "sequential cycles (1 task)",
        "Locker sequential",
    ),
    "asyncio floor, no I/O": (
        "aiopglock.Locker",
        "1,000 tasks, distinct keys, pool of 10",
        "Locker distinct keys",
    ),
}
MANY = "aiopglock.advisory_many of 1,000 keys (pool)"
UNNEST = "try-lock + unlock batched over unnest() (1 connection)"


def _span(values: Iterable[float | None], show: Callable[[float], str]) -> str:
    got = sorted(v for v in values if v is not None)
    if not got:
        return "\N{EM DASH}"
    low, high = show(got[0]), show(got[-1])
    return low if low == high else f"{low}\N{EN DASH}{high}"


def _ratio(value: float) -> str:
    return f"{value:.2f}x" if value < 10 else f"{value:.1f}x"


def _rate(value: float) -> str:
    return f"{value:,.0f}/s"


def _bytes(value: float) -> str:
    return f"{value:,.0f} B"


def _percent(value: float) -> str:
    return f"{value:.0%}"


def _union(
    runs: list[dict[str, Any]], pick: Callable[[dict[str, Any]], Iterable[str]]
) -> list[str]:
    names: list[str] = []
    for run in runs:
        for name in pick(run):
            if name not in names:
                names.append(name)
    return names


def workloads_table(runs: list[dict[str, Any]]) -> list[str]:
    baseline = runs[0]["baseline"]
    contenders = [n for n in _union(runs, lambda r: r["contenders"]) if n != baseline]
    workloads = _union(runs, lambda r: r["workloads"])
    lines = [
        "| workload | " + " | ".join([baseline, *contenders]) + " |",
        "|---" * (len(contenders) + 2) + "|",
    ]
    for workload in workloads:
        cells = [workload]
        rows = [run["workloads"].get(workload, {}) for run in runs]
        cells.append(_span((row.get(baseline, {}).get("per_second") for row in rows), _rate))
        for name in contenders:
            got = [row[name] for row in rows if name in row and "failed" not in row[name]]
            if not got:
                failed = any(name in row for row in rows)
                cells.append("failed" if failed else "n/a")
                continue
            if all(g["ratio"] is not None for g in got):
                cell = _span((g["ratio"] for g in got), _ratio)
            else:  # no baseline in this workload: the rate itself
                cell = _span((g["per_second"] for g in got), _rate)
            connections = {g["connections"] for g in got if g.get("connections") is not None}
            if connections:
                cell += f" ({_span(connections, str)} conn)"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def limits_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| limit (no aiopglock in it) | best round | what aiopglock reaches of it |",
        "|---|---|---|",
    ]
    for name in _union(runs, lambda r: r["limits"]):
        entries = [run["limits"][name] for run in runs if name in run["limits"]]
        measured = [e for e in entries if "per_second" in e]
        if not measured:
            reason = entries[0].get("skipped", "not measured")
            lines.append(f"| {name} | skipped: {reason} | |")
            continue
        unit = measured[0]["unit"]
        rate = _span((e["per_second"] for e in measured), lambda v, unit=unit: f"{v:,.0f} {unit}/s")
        reached = ""
        if name in AGAINST:
            contender, workload, label = AGAINST[name]
            shares = []
            for run in runs:
                limit = run["limits"].get(name, {}).get("per_second")
                got = run["workloads"].get(workload, {}).get(contender)
                if limit and got:
                    shares.append(got["per_second"] / limit)
            if shares:
                reached = f"{label}: {_span(shares, _percent)}"
        elif name == UNNEST:
            shares = []
            for run in runs:
                limit = run["limits"][name].get("per_second")
                many = run["limits"].get(MANY, {}).get("per_second")
                if limit and many:
                    shares.append(many / limit)
            if shares:
                reached = f"advisory_many: {_span(shares, _percent)}"
        lines.append(f"| {name} | {rate} | {reached} |")
    return lines


def memory_table(runs: list[dict[str, Any]]) -> list[str]:
    names = _union(runs, lambda r: r.get("memory", {}))
    if not names:
        return []
    lines = ["| locks held | Python memory per held lock |", "|---|---|"]
    for name in names:
        entries = [run["memory"][name] for run in runs if name in run.get("memory", {})]
        measured = [e for e in entries if "bytes_per_lock" in e]
        if measured:
            cell = _span((e["bytes_per_lock"] for e in measured), _bytes)
            stack = [e.get("exit_stack_bytes_per_entry") for e in measured]
            if any(v is not None for v in stack):
                cell += f" (the benchmark's exit stack: {_span(stack, _bytes)})"
        else:
            cell = f"failed: {entries[0].get('failed', '?')}"
        lines.append(f"| {name} | {cell} |")
    return lines


SEQ = "sequential cycles (1 task)"
DISTINCT = "1,000 tasks, distinct keys, pool of 10"
HOT = "50 tasks, one hot key, pool of 10"
LOCKER = "aiopglock.Locker"
ADVISORY = "aiopglock.advisory"


def _of(run: dict[str, Any], workload: str, name: str) -> float | None:
    got = run["workloads"].get(workload, {}).get(name)
    return None if got is None else float(got["per_second"])


def _share(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _limit(run: dict[str, Any], name: str) -> float | None:
    value = run["limits"].get(name, {}).get("per_second")
    return None if value is None else float(value)


def _memory(run: dict[str, Any], prefix: str) -> float | None:
    for name, got in run.get("memory", {}).items():
        if name.startswith(prefix) and "bytes_per_lock" in got:
            return float(got["bytes_per_lock"])
    return None


#: Issue 13's targets: what, the bar, whether higher is better, the value in a run.
TARGETS: list[tuple[str, float, bool, Callable[[dict[str, Any]], float | None]]] = [
    (
        "Locker sequential / django-pglock",
        1.0,
        True,
        lambda r: _share(_of(r, SEQ, LOCKER), _of(r, SEQ, "django-pglock")),
    ),
    ("Locker sequential / by hand", 2.5, True, lambda r: _ratio_of(r, SEQ)),
    ("Locker distinct keys / by hand", 15, True, lambda r: _ratio_of(r, DISTINCT)),
    (
        "Locker distinct keys / redis-py",
        25,
        True,
        lambda r: _share(_of(r, DISTINCT, LOCKER), _of(r, DISTINCT, "redis-py Lock")),
    ),
    ("Locker hot key / by hand", 10, True, lambda r: _ratio_of(r, HOT)),
    (
        "advisory(db=pool) / by hand, worst workload",
        1.0,
        True,
        lambda r: min(
            (v for v in (_ratio_of(r, w, ADVISORY) for w in (SEQ, DISTINCT, HOT)) if v),
            default=None,
        ),
    ),
    (
        "advisory_many of 1,000 keys / batched unnest",
        0.5,
        True,
        lambda r: _share(_limit(r, MANY), _limit(r, UNNEST)),
    ),
    ("Locker, bytes per held lock", 2048, False, lambda r: _memory(r, LOCKER)),
    ("advisory(db=conn), bytes per held lock", 2048, False, lambda r: _memory(r, "advisory(db=")),
]


def _ratio_of(run: dict[str, Any], workload: str, name: str = LOCKER) -> float | None:
    got = run["workloads"].get(workload, {}).get(name)
    return None if got is None or got["ratio"] is None else float(got["ratio"])


def targets_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = ["| target (issue 13) | bar | got | met in |", "|---|---|---|---|"]
    for what, bar, higher, value in TARGETS:
        got = [value(run) for run in runs]
        measured = [v for v in got if v is not None]
        met = sum(1 for v in measured if (v >= bar if higher else v <= bar))
        show: Callable[[float], str] = _ratio
        if "bytes" in what:
            show = _bytes
        elif "unnest" in what:
            show = _percent
        cell = _span(measured, show)
        bar_text = f"{'>=' if higher else '<='} {show(bar)}"
        lines.append(f"| {what} | {bar_text} | {cell} | {met}/{len(measured)} runs |")
    return lines


def render(runs: list[dict[str, Any]], targets: bool = False) -> str:
    metas = [run["meta"] for run in runs]
    loops = sorted({m["loop"] for m in metas})
    servers = sorted({str(m["server_version"]).split()[0] for m in metas})
    lines = [
        f"{len(runs)} run(s) of {_span((m['rounds'] for m in metas), str)} round(s), "
        f"{', '.join(loops)} loop, PostgreSQL {', '.join(servers)}, "
        f"Python {metas[0]['python']}, {metas[0]['cpus']} CPUs, "
        f"pool of {metas[0]['pool_size']}; the baseline's column is its rate, the others "
        "are ratios to it (higher is better).",
        "",
        *workloads_table(runs),
        "",
        *limits_table(runs),
    ]
    memory = memory_table(runs)
    if memory:
        lines += ["", *memory]
    if targets:
        lines += ["", *targets_table(runs)]
    skipped = {name: reason for run in runs for name, reason in run.get("skipped", {}).items()}
    if skipped:
        lines.append("")
        lines += [f"- {name}: skipped ({reason})" for name, reason in skipped.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", type=Path, help="output of bench.py --json")
    parser.add_argument(
        "--targets", action="store_true", help="add issue 13's targets, met or not, per run"
    )
    args = parser.parse_args(argv)
    runs = [json.loads(path.read_text()) for path in args.json]
    sys.stdout.write(render(runs, targets=args.targets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
