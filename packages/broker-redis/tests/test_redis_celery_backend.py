"""Result layout compatibility with Celery's own Redis backend (celery 5.6.2, test-only)."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import celery
import pytest
import redis
from celery.app.task import Context

from celeriac import states
from celeriac.backends.base import decode_exception, make_meta
from celeriac_redis import RedisBackend


@pytest.fixture
def ours(redis_url: str, broker_conf: Callable[..., dict[str, Any]]) -> Iterator[RedisBackend]:
    b = RedisBackend(redis_url, broker_conf())
    yield b
    b.close()


@pytest.fixture
def capp(redis_url: str, prefix: str) -> Iterator[celery.Celery]:
    app = celery.Celery("compat", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.result_backend_transport_options = {"global_keyprefix": prefix}
    app.conf.broker_transport_options = {"global_keyprefix": prefix}
    yield app
    app.close()


def _id() -> str:
    return str(uuid.uuid4())


def test_celery_reads_our_results(ours: RedisBackend, capp: celery.Celery, raw: redis.Redis,
                                  prefix: str) -> None:
    ok, bad = _id(), _id()
    ours.store(ok, make_meta(ok, states.SUCCESS, {"n": [1, 2]}))
    ours.store(bad, make_meta(bad, states.FAILURE, KeyError("nope"), traceback="Traceback ..."))
    assert 0 < raw.ttl(prefix + "celery-task-meta-" + ok) <= 86400
    assert capp.AsyncResult(ok).get(timeout=5) == {"n": [1, 2]}
    with pytest.raises(KeyError):
        capp.AsyncResult(bad).get(timeout=5)
    assert capp.AsyncResult(bad).traceback == "Traceback ..."


def test_we_read_celerys_results_and_success_is_final(ours: RedisBackend,
                                                      capp: celery.Celery) -> None:
    ok, bad = _id(), _id()
    capp.backend.store_result(ok, [3, "x"], states.SUCCESS)
    capp.backend.store_result(bad, ValueError("bad", 42), states.FAILURE)
    got = ours.wait([ok, bad], timeout=5)
    assert got[ok]["result"] == [3, "x"]
    exc = decode_exception(got[bad]["result"])
    assert isinstance(exc, ValueError) and exc.args == ("bad", 42)
    ours.store(ok, make_meta(ok, states.FAILURE, ValueError("late")))
    assert capp.AsyncResult(ok).get(timeout=5) == [3, "x"]


def test_saved_groups_are_shared(ours: RedisBackend, capp: celery.Celery) -> None:
    a, b = _id(), _id()
    gid = _id()
    ours.save_group(gid, [[gid, None], [[[a, None], None], [[b, None], None]]])
    restored = capp.GroupResult.restore(gid)
    assert [r.id for r in restored.results] == [a, b]
    other = capp.GroupResult(_id(), [capp.AsyncResult(a)])
    other.save()
    assert ours.restore_group(other.id) == [[other.id, None], [[[a, None], None]]]


def _request(gid: str, index: int, body: dict[str, Any] | None = None) -> Context:
    return Context(id=_id(), group=gid, group_index=index, chord=body)


def test_mixed_chord_completed_by_us(ours: RedisBackend, capp: celery.Celery) -> None:
    gid = _id()
    ours.set_chord_size(gid, 4)
    body = capp.signature("proj.tsum")
    capp.backend.on_chord_part_return(_request(gid, 2, body), states.SUCCESS, 20)
    capp.backend.on_chord_part_return(_request(gid, 0, body), states.SUCCESS, 0)
    assert ours.chord_part_return(gid, 3, _id(), states.SUCCESS, 30) is None
    entries = ours.chord_part_return(gid, 1, _id(), states.SUCCESS, 10)
    assert entries is not None
    assert [e[2] for e in entries] == [0, 10, 20, 30]


def test_mixed_chord_completed_by_celery_sends_the_body(ours: RedisBackend, capp: celery.Celery,
                                                        raw: redis.Redis, prefix: str) -> None:
    gid = _id()
    capp.backend.set_chord_size(gid, 3)
    assert raw.get(prefix + "celery-taskset-meta-" + gid + ".s") == b"3"
    assert ours.chord_part_return(gid, 1, _id(), states.SUCCESS, "b") is None
    assert ours.chord_part_return(gid, 0, _id(), states.SUCCESS, "a") is None
    body = capp.signature("proj.join", options={"task_id": "body-" + gid})
    capp.backend.on_chord_part_return(_request(gid, 2, body), states.SUCCESS, "c")
    sent = [json.loads(m) for m in raw.lrange(prefix + "celery", 0, -1)]
    bodies = [m for m in sent if m["headers"]["id"] == "body-" + gid]
    assert len(bodies) == 1
    args = json.loads(base64.b64decode(bodies[0]["body"]))[0]
    assert args == [["a", "b", "c"]]


def test_wait_is_pushed_by_celerys_publish(ours: RedisBackend, capp: celery.Celery) -> None:
    import threading

    task_id = _id()
    ours.on_task_call(task_id, None)
    timer = threading.Timer(0.2, lambda: capp.backend.store_result(task_id, 5, states.SUCCESS))
    timer.start()
    got = ours.wait([task_id], timeout=5)
    timer.join()
    assert got[task_id]["result"] == 5
