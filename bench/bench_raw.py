"""The raw-broker ceiling: the bare client library moving the same number of messages with no task
queue in between. Run as ``python bench_raw.py redis|amqp URL N``; prints one JSON object of
messages/s figures. Each message is a ``BODY_SIZE``-byte body (about a Celery task message).

redis (redis-py): ``lpush_one`` / ``brpop_one`` one command per message, ``lpush_pipe`` pipelines
of 100 LPUSH, ``lmpop_batch`` LMPOP of 100 (Redis 7; a pipeline of 100 RPOP before that).
amqp (pika, BlockingConnection): ``publish`` basic_publish without confirms, ``consume``
basic_consume with prefetch 1000 and one ``multiple=True`` ack per 100 messages.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["BODY_SIZE", "amqp_ceiling", "pika_parameters", "redis_ceiling"]

BODY_SIZE = 1000
BATCH = 100


def pika_parameters(url: str) -> Any:
    """pika connection parameters for a kombu-style URL (``amqp://u:p@host:port//`` = vhost ``/``)."""
    import pika

    parts = urlsplit(url)
    vhost = unquote(parts.path[1:]) if parts.path not in ("", "/") else "/"
    return pika.ConnectionParameters(
        host=parts.hostname or "127.0.0.1", port=parts.port or 5672, virtual_host=vhost or "/",
        credentials=pika.PlainCredentials(unquote(parts.username or "guest"), unquote(parts.password or "guest")))


def redis_ceiling(url: str, n: int) -> dict[str, float]:
    """LPUSH/BRPOP one by one and batched on a fresh key, deleted afterwards."""
    import redis

    client = redis.Redis.from_url(url)
    key = f"bench-raw-{uuid.uuid4().hex}"
    body = b"x" * BODY_SIZE
    out: dict[str, float] = {}
    clock = time.perf_counter
    try:
        start = clock()
        for _ in range(n):
            client.lpush(key, body)
        out["lpush_one"] = n / (clock() - start)
        start = clock()
        for _ in range(n):
            client.brpop([key], timeout=5)
        out["brpop_one"] = n / (clock() - start)
        start = clock()
        for first in range(0, n, BATCH):
            pipe = client.pipeline(transaction=False)
            for _ in range(min(BATCH, n - first)):
                pipe.lpush(key, body)
            pipe.execute()
        out["lpush_pipe"] = n / (clock() - start)
        has_lmpop = int(str(client.info("server")["redis_version"]).split(".")[0]) >= 7
        got = 0
        start = clock()
        while got < n:
            if has_lmpop:
                reply = client.execute_command("LMPOP", 1, key, "RIGHT", "COUNT", BATCH)
                got += len(reply[1]) if reply else 0
            else:
                pipe = client.pipeline(transaction=False)
                for _ in range(BATCH):
                    pipe.rpop(key)
                got += sum(1 for item in pipe.execute() if item is not None)
        out["lmpop_batch"] = n / (clock() - start)
    finally:
        client.delete(key)
        client.close()
    return out


def amqp_ceiling(url: str, n: int) -> dict[str, float]:
    """Publish ``n`` messages to a fresh queue, consume them with batched acks, delete the queue."""
    import pika

    conn = pika.BlockingConnection(pika_parameters(url))
    channel = conn.channel()
    queue = f"bench-raw-{uuid.uuid4().hex}"
    channel.queue_declare(queue, durable=False, auto_delete=False)
    body = b"x" * BODY_SIZE
    props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
    out: dict[str, float] = {}
    clock = time.perf_counter
    try:
        start = clock()
        for _ in range(n):
            channel.basic_publish("", queue, body, props)
        # A round trip to the server so every publish has been received.
        channel.queue_declare(queue, passive=True)
        out["publish"] = n / (clock() - start)
        channel.basic_qos(prefetch_count=1000)
        count = 0

        def on_message(ch: object, method: pika.spec.Basic.Deliver, properties: object, body: bytes) -> None:
            nonlocal count
            count += 1
            if count % BATCH == 0 or count == n:
                channel.basic_ack(method.delivery_tag, multiple=True)
            if count == n:
                channel.stop_consuming()

        start = clock()
        channel.basic_consume(queue, on_message)
        channel.start_consuming()
        out["consume"] = n / (clock() - start)
    finally:
        try:
            channel.queue_delete(queue)
        finally:
            conn.close()
    return out


def main(argv: list[str]) -> int:
    """``bench_raw.py redis|amqp URL N``: print the figures as JSON."""
    kind, url, n = argv[0], argv[1], int(argv[2])
    figures = redis_ceiling(url, n) if kind == "redis" else amqp_ceiling(url, n)
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
