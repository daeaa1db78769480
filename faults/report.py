"""Write RELIABILITY.md's tables from faults/results/*.json (the last run of each scenario).

    python faults/report.py > /tmp/tables.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BROKERS = [("sqlite", "Embedded SQLite (`sqlite://`)"), ("redis", "Redis (celeriac-redis, `redis://`)"),
           ("amqp", "RabbitMQ (celeriac-amqp, `amqp://`)"),
           ("qpid", "AMQP 1.0 (celeriac-qpid on RabbitMQ's AMQP 1.0 plugin, `qpid://`)")]


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict) and "tracebacks" in value:
        return f"{value['tracebacks']} tracebacks/{value['problem_lines']} warning lines"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _notes(d: dict[str, object]) -> str:
    keys = ["noticed_s", "heartbeat_file_interval_s", "probe_detected_s", "ping_exit_stalled", "resets",
            "kills", "redelivered",
            "redelivery_delay_median_s", "redelivery_delay_max_s", "partition_s", "outage_s",
            "lock_held_s", "completed_while_full", "refused", "impatient_sent", "ping_recovered", "log"]
    parts = [f"{k}={_cell(d[k])}" for k in keys if isinstance(d.get(k), bool) or d.get(k) not in (None, 0, [], {})]
    return ", ".join(parts)


def main() -> int:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    for key, title in BROKERS:
        mine = [r for r in rows if r.get("broker") == key]
        if not mine:
            continue
        print(f"### {title}\n")
        print("| scenario | mode | sent | completed | duplicates | lost | recovery (s) | notes |")
        print("|---|---|---:|---:|---:|---:|---:|---|")
        for r in sorted(mine, key=lambda r: str(r["scenario"])):
            print(f"| {r['scenario']} | {r['mode']} | {r['sent']} | {r['completed']} | {r['duplicates']} | "
                  f"{r['lost']} | {_cell(r.get('recovery_s'))} | {_notes(r)} |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
