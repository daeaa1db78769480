"""Figures: one :class:`Record` per measured value, medians and ranges per row, the same-run ratios
Celeriac/Celery and Celeriac/Dramatiq, the printed table and the JSON file."""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["PEERS", "TARGETS", "Record", "Row", "format_table", "format_targets", "summarize", "target_rows",
           "write_json"]


@dataclasses.dataclass
class Record:
    """One measured value (or one failure: ``value`` None and ``error`` set)."""

    broker: str
    pool: str
    system: str
    workload: str
    metric: str
    unit: str
    better: str  # "higher" or "lower"
    rep: int
    value: float | None
    error: str | None = None


PEERS = ("celery", "dramatiq")


@dataclasses.dataclass
class Row:
    """The medians of one (broker, pool, workload, metric) across repetitions, per system."""

    broker: str
    pool: str
    workload: str
    metric: str
    unit: str
    better: str
    medians: dict[str, float | None]
    values: dict[str, list[float]]
    failures: dict[str, int]
    #: per system, the values in the order measured, keyed by repetition (for same-run ratios)
    by_rep: dict[str, dict[int, list[float]]] = dataclasses.field(default_factory=dict)

    def ratio_of(self, peer: str) -> float | None:
        """Celeriac's median divided by ``peer``'s (None when either is missing)."""
        ours, theirs = self.medians.get("celeriac"), self.medians.get(peer)
        if ours is None or theirs is None or theirs == 0:
            return None
        return ours / theirs

    def paired_ratios(self, peer: str) -> list[float]:
        """Celeriac/peer for each pair measured in the same repetition (the i-th value of each)."""
        ours, theirs = self.by_rep.get("celeriac", {}), self.by_rep.get(peer, {})
        out = []
        for rep in sorted(set(ours) & set(theirs)):
            for a, b in zip(ours[rep], theirs[rep]):
                if b:
                    out.append(a / b)
        return out

    def ratio_stats(self, peer: str) -> dict[str, Any] | None:
        """``{"median", "min", "max", "n"}`` of the same-repetition ratios Celeriac/peer.

        The median of the paired ratios, so a noisy repetition moves both systems together.
        """
        pairs = self.paired_ratios(peer)
        if not pairs:
            return None
        return {"median": statistics.median(pairs), "min": min(pairs), "max": max(pairs), "n": len(pairs)}

    @property
    def ratio(self) -> float | None:
        """Celeriac/Celery, the median of the same-repetition ratios."""
        stats = self.ratio_stats("celery")
        return None if stats is None else float(stats["median"])

    @property
    def advantage(self) -> float | None:
        """How many times better Celeriac is than Celery (>1 better, whatever the metric's direction)."""
        ratio = self.ratio
        if ratio is None or ratio == 0:
            return None
        return ratio if self.better == "higher" else 1 / ratio


def summarize(records: Iterable[Record]) -> list[Row]:
    """Group records into rows, keeping the order in which rows first appear."""
    rows: dict[tuple[str, str, str, str], Row] = {}
    for rec in records:
        key = (rec.broker, rec.pool, rec.workload, rec.metric)
        row = rows.get(key)
        if row is None:
            row = rows[key] = Row(rec.broker, rec.pool, rec.workload, rec.metric, rec.unit, rec.better,
                                  {}, {}, {})
        row.values.setdefault(rec.system, [])
        row.failures.setdefault(rec.system, 0)
        if rec.value is None:
            row.failures[rec.system] += 1
        else:
            row.values[rec.system].append(rec.value)
            row.by_rep.setdefault(rec.system, {}).setdefault(rec.rep, []).append(rec.value)
    for row in rows.values():
        for system, values in row.values.items():
            row.medians[system] = statistics.median(values) if values else None
    return list(rows.values())


def _num(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _fmt(values: list[float] | None, failures: int = 0, missing: str = "-") -> str:
    """Median, with the range when there is more than one value."""
    if not values:
        return "FAILED" if failures else missing
    text = _num(statistics.median(values))
    if len(values) > 1:
        text += f" ({_num(min(values))}-{_num(max(values))})"
    return text + (f" ({failures} failed)" if failures else "")


def _fmt_ratio(stats: dict[str, Any] | None) -> str:
    if stats is None:
        return "-"
    text = f"{stats['median']:.2f}"
    if stats["n"] > 1:
        text += f" ({stats['min']:.2f}-{stats['max']:.2f})"
    return text


#: What a system has no equivalent for: (system, workload) -> the cell's text.
NOT_EQUIVALENT = {("dramatiq", "chord"): "n/a"}


def format_table(rows: list[Row]) -> str:
    """A markdown table: medians (ranges), same-run ratios Celeriac/peer; raw ceilings at the end."""
    systems = [s for s in ("celery", "celeriac", "dramatiq") if any(s in r.values for r in rows)] or ["celeriac"]
    peers = [p for p in PEERS if p in systems]
    head = (["broker", "pool", "workload", "metric", "unit"] + [s.capitalize() for s in systems]
            + [f"Celeriac/{p.capitalize()}" for p in peers])
    lines = [head]
    raw = []
    for row in rows:
        if row.workload == "raw":
            raw.append(row)
            continue
        cells = [row.broker, row.pool, row.workload, row.metric, row.unit]
        for system in systems:
            missing = NOT_EQUIVALENT.get((system, row.workload), "-") if row.broker != "sqlite" else "-"
            cells.append(_fmt(row.values.get(system), row.failures.get(system, 0), missing))
        cells += [_fmt_ratio(row.ratio_stats(p)) for p in peers]
        lines.append(cells)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]

    def render(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [render(lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [render(line) for line in lines[1:]]
    if raw:
        out.append("")
        out.append("Raw-broker ceiling (bare client library, messages/s, medians):")
        for row in raw:
            out.append(f"  {row.broker:<6} {row.metric:<12} {_fmt(row.values.get('raw'), row.failures.get('raw', 0))}")
    return "\n".join(out)


#: The figures of issue 13: (label, pool, workload, metric, peer, target, direction of the target).
TARGETS = (
    ("drain, threads x8 vs Celery", "threads", "drain", "tasks/s from start", "celery", 3.0, ">="),
    ("drain, processes x2 vs Celery", "prefork", "drain", "tasks/s from start", "celery", 2.0, ">="),
    ("drain, processes x2 vs Dramatiq", "prefork", "drain", "tasks/s from start", "dramatiq", 1.2, ">="),
    ("drain, threads x8 vs Dramatiq", "threads", "drain", "tasks/s from start", "dramatiq", 1.5, ">="),
    ("enqueue vs Celery", "-", "enqueue", "tasks/s", "celery", 2.0, ">="),
    ("enqueue vs Dramatiq", "-", "enqueue", "tasks/s", "dramatiq", None, ">="),
    ("round trip p50 vs Celery (threads)", "threads", "roundtrip", "p50", "celery", 0.5, "<="),
    ("round trip p50 vs Celery (prefork)", "prefork", "roundtrip", "p50", "celery", 0.5, "<="),
    ("round trip p50 vs Dramatiq (threads)", "threads", "roundtrip", "p50", "dramatiq", None, "<="),
    ("chord vs Celery (threads)", "threads", "chord", "seconds", "celery", 0.33, "<="),
    ("chord vs Celery (prefork)", "prefork", "chord", "seconds", "celery", 0.33, "<="),
)


def target_rows(rows: list[Row], brokers: tuple[str, ...] = ("redis", "amqp")) -> list[dict[str, Any]]:
    """Issue 13's figures: per broker the same-run ratio Celeriac/peer (median, range) and the verdict."""
    by_key = {(r.broker, r.pool, r.workload, r.metric): r for r in rows}
    out = []
    for label, pool, workload, metric, peer, target, sense in TARGETS:
        item: dict[str, Any] = {"figure": label, "target": None if target is None else f"{sense} {target}"}
        for broker in brokers:
            row = by_key.get((broker, pool, workload, metric))
            stats = None if row is None else row.ratio_stats(peer)
            met = None
            if stats is not None and target is not None:
                met = stats["median"] >= target if sense == ">=" else stats["median"] <= target
            item[broker] = {"ratio": stats, "met": met}
        out.append(item)
    return out


def format_targets(rows: list[Row]) -> str:
    """The table of issue 13 (only the rows that were measured)."""
    brokers = tuple(b for b in ("redis", "amqp") if any(r.broker == b for r in rows))
    items = [i for i in target_rows(rows, brokers) if any(i[b]["ratio"] for b in brokers)]
    if not items:
        return ""
    names = {"redis": "Redis", "amqp": "RabbitMQ"}
    out = ["| figure | " + " | ".join(names[b] for b in brokers) + " | target |",
           "|---|" + "---|" * len(brokers) + "---|"]
    for item in items:
        cells = []
        for broker in brokers:
            text = _fmt_ratio(item[broker]["ratio"])
            if item[broker]["met"] is not None:
                text += " met" if item[broker]["met"] else " **missed**"
            cells.append(text)
        out.append(f"| {item['figure']} | " + " | ".join(cells) + f" | {item['target'] or '-'} |")
    return "\n".join(out)


def write_json(path: Path, meta: dict[str, Any], records: list[Record], rows: list[Row],
               series: dict[str, Any] | None = None) -> None:
    """Write every record and the summary rows (with medians and ratios) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = []
    for row in rows:
        item = dataclasses.asdict(row)
        item.pop("by_rep")
        item["ranges"] = {k: [min(v), max(v)] for k, v in row.values.items() if v}
        item["ratio"] = row.ratio
        item["advantage"] = row.advantage
        item["ratios"] = {p: row.ratio_stats(p) for p in PEERS if p in row.values}
        summary.append(item)
    data = {"meta": meta, "summary": summary, "targets": target_rows(rows),
            "records": [dataclasses.asdict(r) for r in records], "series": series or {}}
    path.write_text(json.dumps(data, indent=2) + "\n")
