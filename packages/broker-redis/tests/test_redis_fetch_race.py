"""A connection that breaks while the consumer waits for a message must not lose the message.

The consumer used to wait with BRPOP, which pops: when the connection broke after Redis popped
and before the reply arrived, the message was in neither the queue nor ``unacked`` (the fault
suite's connection-reset scenario lost about one task in 600 that way). It now waits without
taking (BLMOVE key key RIGHT RIGHT) and takes with the atomic FETCH script.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import redis

from celeriac.protocol import encode_task
from celeriac.routing import Queue
from celeriac_redis import RedisBroker


def test_reply_lost_during_the_blocking_wait_loses_nothing(
        redis_url: str, broker_conf: Callable[..., dict[str, Any]], raw: redis.Redis, prefix: str) -> None:
    broker = RedisBroker(redis_url, broker_conf())
    try:
        queue = Queue("race")
        consumer = broker.consumer([queue], prefetch=10)
        real = broker.client.execute_command
        broken = []

        def execute(*args: Any, **options: Any) -> Any:
            result = real(*args, **options)  # Redis ran the command ...
            if str(args[0]).upper() in ("BLMOVE", "BRPOP") and not broken:
                broken.append(args[0])
                raise redis.ConnectionError("connection reset (test)")  # ... the reply is lost
            return result

        broker.client.execute_command = execute  # type: ignore[method-assign]
        message = encode_task("proj.add", str(uuid.uuid4()), [1, 2], {})
        publisher = RedisBroker(redis_url, broker_conf())  # arrives while the consumer waits
        timer = threading.Timer(0.3, lambda: publisher.publish(message, "", "race", queue=queue))
        timer.start()
        got = []
        for _ in range(20):
            got += consumer.fetch(10, 0.5)
            if got:
                break
        assert broken, "the blocking wait was not exercised"
        assert [d.message.headers["id"] for d in got] == [message.headers["id"]]
        consumer.ack(got[0])
        consumer.close()
        timer.join()
        publisher.close()
    finally:
        broker.close()
