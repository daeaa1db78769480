"""Liveness probes see a stalled consumer: ``worker --heartbeat-file`` and ``inspect ping``.

The worker reaches its broker through the proxy; freezing the proxy stalls it (its connection
half-open, the process alive) for 20 s. The heartbeat file must pass the probe's age (the
interval) within 2 intervals, ``celeriac inspect ping -d NODE`` must exit non-zero, and both must
be healthy again once the network is back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faultkit import NETWORK, Flow, Target, Worker, flow_for, wait_until
from faultproxy import FaultProxy

pytestmark = pytest.mark.parametrize("target", NETWORK, indirect=True)


def ping(flow: Flow, worker: Worker) -> int:
    """``celeriac -A faultproj inspect ping -d NODE``'s exit code (the client is not proxied)."""
    env = {**os.environ, "PYTHONPATH": str(flow.dir), "FAULTS_BROKER": flow.target.url,
           "FAULTS_CONF": json.dumps(flow.target.conf), "FAULTS_OUT": str(flow.dir)}
    done = subprocess.run([sys.executable, "-m", "celeriac", "-A", "faultproj", "inspect", "ping",
                           "-d", worker.node, "-t", "2"], cwd=flow.dir, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    return done.returncode


STALL = 20.0  # seconds the network stays frozen

def _answers_within(flow: Flow, worker: Worker, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ping(flow, worker) == 0:
            return True
        time.sleep(0.5)
    return False


def test_stalled_consumer_fails_the_probes(target: Target, proxy: FaultProxy, tmp_path: Path,
                                           request: pytest.FixtureRequest) -> None:
    with flow_for(tmp_path, target, "liveness") as flow:
        w = flow.worker("w1", target.proxied(proxy.port))
        wait_until(lambda: w.heartbeat_age() < w.interval, 10, "a fresh heartbeat file")
        healthy_ping = wait_until(lambda: ping(flow, w) == 0, 30, "a ping reply from a healthy worker")
        sender = flow.send_in_thread(200, 40)
        time.sleep(1)
        assert w.heartbeat_age() < w.interval
        frozen = time.monotonic()
        proxy.freeze()
        wait_until(lambda: w.heartbeat_age() >= w.interval, 4 * w.interval + 10, "a stale heartbeat file",
                   interval=0.05)
        detected = round(time.monotonic() - frozen, 2)
        stalled_ping = ping(flow, w)
        time.sleep(max(0.0, frozen + STALL - time.monotonic()))  # a stall, not a blip
        proxy.reset_all()
        proxy.thaw()
        healed = time.monotonic()
        wait_until(lambda: w.heartbeat_age() < w.interval, 45, "a fresh heartbeat file after the heal")
        fresh_after = round(time.monotonic() - healed, 2)
        recovered_ping = _answers_within(flow, w, 20)
        sender.join()
        figures = flow.finish(fresh_after, drain=30, probe_detected_s=detected, heartbeat_file_interval_s=w.interval,
                              ping_exit_stalled=stalled_ping, ping_recovered=recovered_ping)
    assert healthy_ping
    assert recovered_ping, "inspect ping got no reply within 20 s of the heal"
    assert stalled_ping != 0, "inspect ping succeeded for a stalled worker"
    assert detected <= 2 * w.interval + 0.5, f"the heartbeat file went stale after {detected} s"
    assert figures["lost"] == 0, figures
