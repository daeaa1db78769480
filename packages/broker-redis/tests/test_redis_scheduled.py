"""``inspect scheduled`` and ``purge`` see messages parked until their ETA (issue 9)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from celeriac.protocol import encode_task
from celeriac.routing import Queue
from celeriac_redis import RedisBroker


def test_parked_messages_are_listed_and_purged(redis_url: str, broker_conf: Callable[..., dict[str, Any]]) -> None:
    broker = RedisBroker(redis_url, broker_conf(native_delay=True))  # parks at publish time
    try:
        queue, other = Queue("sched"), Queue("other")
        broker.declare(queue)
        broker.declare(other)
        later, sooner, elsewhere = (encode_task("proj.add", str(uuid.uuid4()), [i], {}) for i in range(3))
        now = time.time()
        broker.publish(later, "", "sched", queue=queue, not_before=now + 120)
        broker.publish(sooner, "", "sched", queue=queue, not_before=now + 60)
        broker.publish(elsewhere, "", "other", queue=other, not_before=now + 60)
        broker.publish(encode_task("proj.add", str(uuid.uuid4()), [9], {}), "", "sched", queue=queue)
        listed = broker.scheduled(["sched"])
        assert [m.headers["id"] for _, m in listed] == [sooner.headers["id"], later.headers["id"]]
        assert abs(listed[0][0] - (now + 60)) < 1
        assert broker.purge("sched") == 3  # one ready + two parked
        assert broker.scheduled(["sched"]) == []
        assert [m.headers["id"] for _, m in broker.scheduled(["other", "sched"])] == [elsewhere.headers["id"]]
    finally:
        broker.close()
