"""The broker-side chord join of rpc:// over RabbitMQ: exactly once across processes' worth of
connections, and a token holder that dies gives the token back."""

from __future__ import annotations

import threading
import uuid

from celeriac import states
from celeriac.plugins import create_broker
from celeriac.routing import Exchange, Queue

from celeriac_rpc import RPCBackend
from celeriac_rpc.chord import PREFIX


def test_two_workers_join_exactly_once(amqp_url: str) -> None:
    client = RPCBackend("rpc://", {"broker_url": amqp_url})
    workers = [RPCBackend("rpc://", {"broker_url": amqp_url}) for _ in range(2)]
    gid = str(uuid.uuid4())
    size = 40
    client.set_chord_size(gid, size)
    wins: list[list[tuple[str, str, object]]] = []
    lock = threading.Lock()

    def member(backend: RPCBackend, index: int) -> None:
        found = backend.chord_part_return(gid, index, f"t{index}", states.SUCCESS, index)
        if found is not None:
            with lock:
                wins.append(found)

    threads = [threading.Thread(target=member, args=(workers[i % 2], i)) for i in range(size)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(wins) == 1
        assert [e[2] for e in wins[0]] == list(range(size))
        # a late duplicate (a redelivered member) is not counted again
        assert workers[0].chord_part_return(gid, 3, "t3", states.SUCCESS, 3) is None
    finally:
        for backend in (client, *workers):
            backend.close()
        cleanup = create_broker(amqp_url, {})
        cleanup.delete_queue(PREFIX + gid + ".token")
        cleanup.delete_queue(PREFIX + gid)
        cleanup.close()


def test_token_comes_back_when_its_holder_dies(amqp_url: str) -> None:
    backend = RPCBackend("rpc://", {"broker_url": amqp_url})
    gid = str(uuid.uuid4())
    backend.set_chord_size(gid, 2)
    token = Queue(PREFIX + gid + ".token", Exchange(""), PREFIX + gid + ".token",
                  durable=True, expires=backend.expires)
    doomed = create_broker(amqp_url, {})
    try:
        consumer = doomed.consumer([token], 1)
        held = []
        for _ in range(40):
            held = consumer.fetch(1, 0.25)
            if held:
                break
        assert held, "the token should be there"
        doomed.close()  # dies holding the token, without ack
        assert backend.chord_part_return(gid, 0, "a", states.SUCCESS, "x") is None
        done = backend.chord_part_return(gid, 1, "b", states.SUCCESS, "y")
        assert done == [("a", states.SUCCESS, "x"), ("b", states.SUCCESS, "y")]
    finally:
        backend.broker.delete_queue(token.name)
        backend.broker.delete_queue(PREFIX + gid)
        backend.close()
