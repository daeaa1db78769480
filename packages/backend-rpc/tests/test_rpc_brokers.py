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


def test_a_replaced_task_answers_its_caller(tmp_path: object) -> None:
    """``Task.replace`` in a worker: the replacement's result (a task's, a chain's last step's)
    goes to the reply queue of the client that sent the replaced task, not to the worker's."""
    from celeriac import Celeriac
    from celeriac.testing.plugin import start_worker

    app = Celeriac("rpc_replace", broker=f"sqlite:///{tmp_path}/broker.db", backend="rpc://")

    @app.task(name="rr.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="rr.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    @app.task(name="rr.replacer", bind=True)
    def replacer(self: object, kind: str) -> object:
        sig = add.s(2, 3) if kind == "task" else add.s(1, 1) | mul.s(10)
        return self.replace(sig)  # type: ignore[attr-defined]

    worker = start_worker(app, concurrency=2)
    try:
        assert replacer.delay("task").get(timeout=10) == 5
        assert replacer.delay("chain").get(timeout=10) == 20
    finally:
        worker.stop()
        app.close()
