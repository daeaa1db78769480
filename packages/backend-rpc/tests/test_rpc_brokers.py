"""rpc:// over the embedded brokers (any broker declaring reply_queues), and its refusals."""

from __future__ import annotations

import threading
import uuid

import pytest
from celeriac import states
from celeriac.backends.base import make_meta
from celeriac.exceptions import ImproperlyConfigured

from celeriac_rpc import RPCBackend


@pytest.mark.parametrize("broker_url", ["memory://rpc-test", "sqlite:///{tmp}/broker.db"])
def test_results_over_embedded_brokers(broker_url: str, tmp_path: object) -> None:
    url = broker_url.format(tmp=tmp_path)
    client = RPCBackend("rpc://", {"broker_url": url})
    worker = RPCBackend("rpc://", {"broker_url": url})
    try:
        reply_to = str(uuid.uuid4())
        ids = [str(uuid.uuid4()) for _ in range(5)]
        for task_id in ids:
            client.on_task_call(task_id, reply_to)

        def work() -> None:
            for n, task_id in enumerate(ids):
                worker.store(task_id, make_meta(task_id, states.SUCCESS, n), reply_to=reply_to,
                             correlation_id=task_id)

        thread = threading.Thread(target=work)
        thread.start()
        got = client.wait(ids, timeout=10)
        thread.join()
        assert [got[t]["result"] for t in ids] == [0, 1, 2, 3, 4]
    finally:
        client.close()
        worker.close()


def test_chord_over_embedded_broker(tmp_path: object) -> None:
    backend = RPCBackend("rpc://", {"broker_url": f"sqlite:///{tmp_path}/chord.db"})
    try:
        gid = str(uuid.uuid4())
        backend.set_chord_size(gid, 3)
        assert backend.chord_part_return(gid, 2, "c", states.SUCCESS, 3) is None
        assert backend.chord_part_return(gid, 0, "a", states.SUCCESS, 1) is None
        done = backend.chord_part_return(gid, 1, "b", states.SUCCESS, 2)
        assert done == [("a", "SUCCESS", 1), ("b", "SUCCESS", 2), ("c", "SUCCESS", 3)]
    finally:
        backend.close()


def test_no_broker_url_is_a_clear_error() -> None:
    backend = RPCBackend("rpc://", {})
    with pytest.raises(ImproperlyConfigured, match="broker_url"):
        backend.on_task_call("x", "reply")
