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
from celeriac import Celeriac
from faultkit import (
    FULL,
    Flow,
    PrivateRabbit,
    PrivateRedis,
    Target,
    assert_calm,
    flow_for,
    size,
    target_conf,
    unique,
)


def _during_outage(flow: Flow, impatient: Celeriac, down: float) -> None:
    """Sleep ``down`` s while a client that gives up after 0.5 s sends 3 tasks: each must
    either be accepted (and then run) or raise a clear error."""
    began = time.monotonic()
    flow.extra["impatient_sent"] = flow.send(3, client=impatient)
    time.sleep(max(0.0, down - (time.monotonic() - began)))


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
            server.shutdown_nosave()
            _during_outage(flow, impatient, down)
            server.start()
        how = "SHUTDOWN NOSAVE, restart (appendonly yes, appendfsync always)"
    else:
        node: PrivateRabbit = request.getfixturevalue("rabbit")
        scheme = "amqp" if broker == "amqp" else "qpid"
        target = Target(broker, f"{scheme}://guest:guest@127.0.0.1:{node.port}//", node.port,
                        target_conf(broker, unique()))

        def restart() -> None:
            try:
                node.stop_app()
                _during_outage(flow, impatient, down)
            finally:
                node.start_app()
        how = "rabbitmqctl stop_app, start_app (private node)"
    with flow_for(tmp_path, target, "broker-restart") as flow:
        options = {**target.conf.get("broker_transport_options", {}), "publish_retry_timeout": 0.5}
        impatient = Flow.make_client(Target(broker, target.url, target.port,
                                            {**target.conf, "broker_transport_options": options}))
        request.addfinalizer(impatient.close)
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
    assert figures["sent"] + figures["refused"] == count + 3
    for error in figures["refused_errors"]:  # a refusal must say what happened
        assert "BrokerConnectionError" in error, error
