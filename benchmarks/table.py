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
            got = [row[name] for row in rows if name in row]
            if not got:
                cells.append("n/a")
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
        "| limit (no aiopglock in it) | rate | what aiopglock reaches of it |",
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
            cell = _span((e["bytes_per_lock"] for e in measured), lambda v: f"{v:,.0f} B")
        else:
            cell = f"failed: {entries[0].get('failed', '?')}"
        lines.append(f"| {name} | {cell} |")
    return lines


def render(runs: list[dict[str, Any]]) -> str:
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
    skipped = {name: reason for run in runs for name, reason in run.get("skipped", {}).items()}
    if skipped:
        lines.append("")
        lines += [f"- {name}: skipped ({reason})" for name, reason in skipped.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", type=Path, help="output of bench.py --json")
    args = parser.parse_args(argv)
    runs = [json.loads(path.read_text()) for path in args.json]
    sys.stdout.write(render(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
