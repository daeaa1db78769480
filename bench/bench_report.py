"""Figures: one :class:`Record` per measured value, medians per row, the Celeriac/Celery ratio,
the printed table and the JSON file."""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["Record", "Row", "format_table", "summarize", "write_json"]


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

    @property
    def ratio(self) -> float | None:
        """Celeriac's median divided by Celery's (None when either is missing)."""
        ours, theirs = self.medians.get("celeriac"), self.medians.get("celery")
        if ours is None or theirs is None or theirs == 0:
            return None
        return ours / theirs

    @property
    def advantage(self) -> float | None:
        """How many times better Celeriac is (>1 better, whatever the metric's direction)."""
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
    for row in rows.values():
        for system, values in row.values.items():
            row.medians[system] = statistics.median(values) if values else None
    return list(rows.values())


def _fmt(value: float | None, failures: int = 0) -> str:
    if value is None:
        return "FAILED" if failures else "-"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return text + (f" ({failures} failed)" if failures else "")


def format_table(rows: list[Row]) -> str:
    """A plain-text (markdown) table: one line per row, raw ceilings at the end."""
    head = ["broker", "pool", "workload", "metric", "unit", "Celery", "Celeriac", "Celeriac/Celery", "advantage"]
    lines = [head]
    raw = []
    for row in rows:
        if row.workload == "raw":
            raw.append(row)
            continue
        ratio, adv = row.ratio, row.advantage
        lines.append([row.broker, row.pool, row.workload, row.metric, row.unit,
                      _fmt(row.medians.get("celery"), row.failures.get("celery", 0)),
                      _fmt(row.medians.get("celeriac"), row.failures.get("celeriac", 0)),
                      "-" if ratio is None else f"{ratio:.2f}",
                      "-" if adv is None else f"{adv:.2f}x {'better' if adv >= 1 else 'worse'}"])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]

    def render(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [render(lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [render(line) for line in lines[1:]]
    if raw:
        out.append("")
        out.append("Raw-broker ceiling (bare client library, messages/s, medians):")
        for row in raw:
            out.append(f"  {row.broker:<6} {row.metric:<12} {_fmt(row.medians.get('raw'), row.failures.get('raw', 0))}")
    return "\n".join(out)


def write_json(path: Path, meta: dict[str, Any], records: list[Record], rows: list[Row]) -> None:
    """Write every record and the summary rows (with medians and ratios) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = []
    for row in rows:
        item = dataclasses.asdict(row)
        item["ratio"] = row.ratio
        item["advantage"] = row.advantage
        summary.append(item)
    data = {"meta": meta, "summary": summary, "records": [dataclasses.asdict(r) for r in records]}
    path.write_text(json.dumps(data, indent=2) + "\n")
