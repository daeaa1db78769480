"""Network faults between the worker and its broker, through the fault proxy: 100 ms latency,
connection resets every few seconds, a half-open connection, a partition that heals.

The client sends straight to the broker, the worker goes through the proxy; every task sent
must complete (acks_late), and the worker must recover by itself with a few log lines per event.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from faultkit import FULL, HEARTBEAT, NETWORK, Target, assert_calm, flow_for, size
from faultproxy import FaultProxy

pytestmark = pytest.mark.parametrize("target", NETWORK, indirect=True)


def test_latency_100ms(target: Target, proxy: FaultProxy, tmp_path: Path) -> None:
    proxy.latency = 0.1
    with flow_for(tmp_path, target, "latency-100ms") as flow:
        flow.worker("w1", target.proxied(proxy.port))
        count = size(300, 3000)
        flow.send(count, rate=size(60, 150))
        figures = flow.finish(None, drain=size(90, 300), proxy_latency_s=0.1)
        assert_calm(flow, events=0)
    assert figures["lost"] == 0 and figures["sent"] == count


def test_connection_resets(target: Target, proxy: FaultProxy, tmp_path: Path) -> None:
    period, resets = size(2.5, 3.0), size(3, 20)
    with flow_for(tmp_path, target, "resets") as flow:
        flow.worker("w1", target.proxied(proxy.port))
        rate = 40.0
        sender = flow.send_in_thread(int(rate * period * (resets + 1)), rate)
        begin = time.time()
        done = 0
        for _ in range(resets):
            time.sleep(period)
            done += proxy.reset_all() > 0
            flow.note("reset")
        sender.join()
        end = time.time()
        flow.drain(size(90, 300))
        gap = flow.longest_gap(begin, end)
        # A reset while the worker is still reconnecting finds no connection to cut.
        figures = flow.finish(gap, resets=done, reset_period_s=period)
        # A reset cuts each of the worker's connections (tasks, remote control, the liveness
        # probe's): a line when each is lost and one when it is back is not a storm.
        calm = assert_calm(flow, events=resets, per_event=6)
    assert done >= 1
    assert figures["lost"] == 0, figures
    assert calm["tracebacks"] == 0


def test_half_open_connection(target: Target, proxy: FaultProxy, tmp_path: Path,
                              request: pytest.FixtureRequest) -> None:
    """The proxy stops forwarding without closing: the worker must notice (heartbeats, socket
    timeouts) within 2 heartbeat intervals, and recover once the network is back. On Redis,
    which has no protocol heartbeat, the interval is ``socket_timeout`` (set to HEARTBEAT)."""
    with flow_for(tmp_path, target, "half-open") as flow:
        w = flow.worker("w1", target.proxied(proxy.port))
        sender = flow.send_in_thread(size(200, 2000), size(40, 100))
        time.sleep(2)
        before = w.log()
        frozen_at = time.monotonic()
        proxy.freeze()
        noticed = None
        deadline = frozen_at + 6 * HEARTBEAT + 10
        while time.monotonic() < deadline:
            new = w.log()[len(before):]
            lines = [ln for ln in new.splitlines() if ("WARNING" in ln or "ERROR" in ln)
                     and "Liveness" not in ln]
            if lines:
                noticed = round(time.monotonic() - frozen_at, 2)
                break
            time.sleep(0.1)
        # The connections the worker had are gone for good (the peer vanished); new ones work.
        proxy.reset_all()
        healed = time.time()
        proxy.thaw()
        sender.join()
        flow.drain(size(120, 300))
        figures = flow.finish(flow.first_done_after(healed), noticed_s=noticed,
                              heartbeat_s=HEARTBEAT)
        assert_calm(flow, events=1, per_event=6)
    assert figures["lost"] == 0, figures
    assert noticed is not None, "the worker never noticed its connection was half-open"
    # 2 intervals, plus the log poll and scheduling on a loaded 2-core machine
    assert noticed <= 2 * HEARTBEAT + 1.5, f"noticed after {noticed} s, heartbeat {HEARTBEAT} s"


def test_partition_heals(target: Target, proxy: FaultProxy, tmp_path: Path,
                         request: pytest.FixtureRequest) -> None:
    seconds = 30.0 if FULL else 5.0
    with flow_for(tmp_path, target, f"partition-{seconds:.0f}s") as flow:
        flow.worker("w1", target.proxied(proxy.port))
        sender = flow.send_in_thread(size(400, 3000), size(50, 60))
        time.sleep(2)
        proxy.freeze()
        time.sleep(seconds)
        healed = time.time()
        proxy.thaw()
        sender.join()
        flow.drain(size(120, 300))
        figures = flow.finish(flow.first_done_after(healed), partition_s=seconds)
        assert_calm(flow, events=2, per_event=6)
    assert figures["lost"] == 0, figures
