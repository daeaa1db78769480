"""Soak: tasks through 2 workers, one SIGKILLed every few seconds and restarted at once.

Full: 100,000 tasks, a kill every 10 s. Short: a few thousand tasks, a couple of kills.
Counts duplicates (tasks a killed worker had started run again: at-least-once) and the
redelivery delay: from the kill to the completion elsewhere of each task the killed worker had
started and not finished.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from faultkit import ALL, FULL, Target, flow_for, size

pytestmark = pytest.mark.parametrize("target", ALL, indirect=True)


def test_soak_with_kills(target: Target, tmp_path: Path) -> None:
    count = size(2000, 100_000)
    period = 10.0 if FULL else 3.0
    kills = size(2, 10_000)  # full: kill every period until the flow ends
    with flow_for(tmp_path, target, "soak-kill") as flow:
        workers = [flow.worker("w1", ready=False), flow.worker("w2", ready=False)]
        for w in workers:
            w.wait_ready()
        rate = size(count / (period * (kills + 1)), 400.0)
        sender = flow.send_in_thread(count, rate, sleep=0.01)
        killed: list[tuple[int, float]] = []  # (pid, when)
        turn = 0
        while sender.is_alive() and len(killed) < kills:
            time.sleep(period)
            if not sender.is_alive():
                break
            victim = workers[turn % 2]
            killed.append((victim.proc.pid, time.time()))
            victim.kill()
            replacement = flow.worker(victim.name, ready=False)
            workers[turn % 2] = replacement
            turn += 1
        sender.join()
        flow.drain(size(180, 1200))
        delays = _redelivery_delays(flow, killed)
        figures = flow.finish(max(delays) if delays else None, kills=len(killed), kill_period_s=period,
                              redelivered=len(delays),
                              redelivery_delay_max_s=max(delays) if delays else None,
                              redelivery_delay_median_s=sorted(delays)[len(delays) // 2] if delays else None)
    assert len(killed) >= min(kills, 1)
    assert figures["lost"] == 0, figures


def _redelivery_delays(flow, killed: list[tuple[int, float]]) -> list[float]:  # type: ignore[no-untyped-def]
    """For each killed worker: tasks it started and did not finish, and when they finished."""
    delays = []
    for pid, when in killed:
        path = flow.dir / f"record-{pid}.log"
        if not path.exists():
            continue
        started, finished = set(), set()
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:
                (started if parts[0] == "S" else finished).add(int(parts[1]))
        _, dones = flow.records()
        for n in started - finished:
            later = [t for t in dones.get(n, []) if t > when]
            if later:
                delays.append(round(min(later) - when, 2))
    return delays
