"""Broker restarts during a flow: Redis SHUTDOWN NOSAVE then start (a private redis-server with
append-only persistence), RabbitMQ and AMQP 1.0 stop_app/start_app (a private node).

Workers recover by themselves; the client keeps sending through the outage: each ``delay()``
either succeeds after reconnecting or raises a clear error (counted as refused), never returns
for a task that is then lost.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from faultkit import FULL, PrivateRabbit, PrivateRedis, Target, assert_calm, flow_for, size, target_conf, unique


def _restart_redis(server: PrivateRedis, down: float) -> None:
    server.shutdown_nosave()
    time.sleep(down)
    server.start()


@pytest.mark.parametrize("broker", ["redis", "amqp", "qpid"])
def test_broker_restart_during_flow(broker: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    down = 5.0 if FULL else 2.0
    count = size(900, 10000)
    if broker == "redis":
        server = PrivateRedis(tmp_path, appendonly=True)
        server.start()
        request.addfinalizer(server.stop)
        target = Target("redis", server.url, server.port, target_conf("redis", unique()))

        def restart() -> None:
            _restart_redis(server, down)
        how = "SHUTDOWN NOSAVE, restart (appendonly yes, appendfsync always)"
    else:
        node: PrivateRabbit = request.getfixturevalue("rabbit")
        scheme = "amqp" if broker == "amqp" else "qpid"
        target = Target(broker, f"{scheme}://guest:guest@127.0.0.1:{node.port}//", node.port,
                        target_conf(broker, unique()))

        def restart() -> None:
            try:
                node.stop_app()
                time.sleep(down)
            finally:
                node.start_app()
        how = "rabbitmqctl stop_app, start_app (private node)"
    with flow_for(tmp_path, target, "broker-restart") as flow:
        flow.worker("w1")
        rate = size(150.0, 400.0)
        sender = flow.send_in_thread(count, rate)
        time.sleep(count / rate / 3)
        flow.note("restart")
        restart()
        back = time.time()
        sender.join()
        flow.drain(size(120, 600))
        figures = flow.finish(flow.first_done_after(back), outage_s=down, how=how)
        assert_calm(flow, events=2, per_event=6)
    assert figures["lost"] == 0, figures
    assert figures["sent"] + figures["refused"] == count
    for error in figures["refused_errors"]:  # a refusal must say what happened
        assert "BrokerConnectionError" in error, error
