"""Mixed fleets on Redis (issue 10, item 13): a Celeriac client's delayed task runs on time on a
Celery worker, and a Celeriac worker still keeps far-future ETAs out of its memory.

Delayed messages are published as Celery publishes them (straight into the queue, ``eta``
header); a Celeriac consumer parks far ETAs on fetch. ``native_delay=True`` (parking at publish
time) stays available for fleets of Celeriac workers and keeps its conformance test.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis_support import wait_for

from celeriac.protocol import encode_task, to_timestamp
from celeriac.routing import Queue
from celeriac.testing.broker_kit import BrokerConformance
from celeriac_redis import RedisBroker
from celeriac_redis.layout import decode_envelope, eta_timestamp

VENV_BIN = Path(sys.executable).parent


class TestRedisBrokerNativeDelay(BrokerConformance):
    """``native_delay=True``: the broker parks at publish time and declares ``delay``."""

    @pytest.fixture
    def broker(self, redis_url: str, broker_conf: Callable[..., dict[str, Any]]) -> Iterator[RedisBroker]:
        b = RedisBroker(redis_url, broker_conf(native_delay=True))
        b.connect()
        yield b
        b.close()

    def test_declares_delay(self, broker: RedisBroker) -> None:
        assert broker.has("delay")


for _name in dir(BrokerConformance):
    if _name.startswith("test_") and _name not in ("test_delay_not_delivered_before_not_before",
                                                   "test_capabilities_are_known_names"):
        setattr(TestRedisBrokerNativeDelay, _name, None)


def test_redis_plugin_uses_the_cores_eta_parser() -> None:
    """One ETA parser: the plugin reads ``eta`` headers with ``celeriac.protocol``'s."""
    for text in ("2026-11-30T07:25:17Z", "2026-11-30T07:25:17.123456789+01:00", "2026-11-30 07:25"):
        assert eta_timestamp({"eta": text}) == to_timestamp(text)
    assert eta_timestamp({"eta": "garbage"}) is None and eta_timestamp({}) is None


def test_delayed_message_is_published_as_celery_publishes_it(
        redis_url: str, broker_conf: Callable[..., dict[str, Any]], raw: redis.Redis,
        prefix: str) -> None:
    broker = RedisBroker(redis_url, broker_conf())
    try:
        assert not broker.has("delay")
        eta = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=3600)
        message = encode_task("proj.add", str(uuid.uuid4()), [1, 2], {}, eta=eta.isoformat())
        broker.publish(message, "", "celery", queue=Queue("celery"), not_before=eta.timestamp())
        wait_for(lambda: raw.hlen(prefix + "unacked") == 0, 5, "the ack")
        (stored,) = raw.lrange(prefix + "celery", 0, -1)
        decoded, _, routing_key, _, _ = decode_envelope(stored)
        assert routing_key == "celery" and decoded.headers["eta"] == eta.isoformat()
    finally:
        broker.close()


def test_far_eta_from_our_client_is_parked_by_our_worker(
        redis_url: str, broker_conf: Callable[..., dict[str, Any]], raw: redis.Redis,
        prefix: str) -> None:
    from celeriac import Celeriac
    from celeriac.testing.plugin import start_worker

    app = Celeriac("mixed", broker=redis_url, backend=redis_url,
                   **broker_conf(visibility_timeout=30.0))

    @app.task(name="mixed.later", bind=True)
    def later(self: Any) -> Any:
        return ["done", self.request.delivery_info["redelivered"]]

    worker = start_worker(app)
    try:
        sent = time.time()
        result = later.apply_async(countdown=4)
        tag = wait_for(lambda: raw.hkeys(prefix + "unacked"), 5, "the worker to fetch it")[0]
        # The fetch records it with score "now"; parking moves it to "eta - visibility_timeout".
        wait_for(lambda: (raw.zscore(prefix + "unacked_index", tag) or sent) < sent - 10, 5,
                 "the worker to park it")
        score = raw.zscore(prefix + "unacked_index", tag)
        assert score is not None and abs(score + 30.0 - (sent + 4)) < 1.0  # due at the ETA
        consumer = worker.task_consumer
        assert consumer is not None and not consumer.held  # not in the worker's memory
        assert raw.llen(prefix + "celery") == 0
        assert b'"celeriac_not_before": ' in raw.hget(prefix + "unacked", tag)
        # It comes back at its ETA, and not as a redelivery: no task ever ran it.
        assert result.get(timeout=10) == ["done", False]
        assert time.time() >= sent + 4
        wait_for(lambda: raw.hlen(prefix + "unacked") == 0, 5, "the ack")
    finally:
        worker.stop()
        worker._thread.join(10)  # type: ignore[attr-defined]
        app.close()


# -- a real Celery worker in a subprocess -----------------------------------------------------

TASKS = '''
import time
from {kind} import {cls}

app = {cls}("mixed", broker={url!r}, backend={url!r})
app.conf.update(
    broker_transport_options={{"global_keyprefix": {prefix!r}, "visibility_timeout": {vt!r}}},
    result_backend_transport_options={{"global_keyprefix": {prefix!r}}},
    task_default_queue={queue!r},
)


@app.task(name="mixed.stamp")
def stamp(tag):
    return [tag, time.time()]
'''


@pytest.fixture
def modules(tmp_path: Path, redis_url: str, prefix: str,
            monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str, str]:
    """A Celery and a Celeriac app module with the same task, queue and key prefix."""
    suffix = uuid.uuid4().hex[:8]
    queue = f"mixed{suffix}"
    names = (f"mixed_celery_{suffix}", f"mixed_celeriac_{suffix}")
    for name, kind, cls in zip(names, ("celery", "celeriac"), ("Celery", "Celeriac"), strict=True):
        (tmp_path / f"{name}.py").write_text(TASKS.format(kind=kind, cls=cls, url=redis_url,
                                                          prefix=prefix, queue=queue, vt=60.0))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path, names[0], names[1]


def _celery_worker(spawn_worker: Callable[..., Any], root: Path, module: str) -> Any:
    # kombu's defaults: its unacked sweep runs only every ~100 s (5.6) / 60 s (5.7).
    worker = spawn_worker([str(VENV_BIN / "celery"), "-A", module, "worker", "-l", "info", "-P",
                           "threads", "-c", "2", "-n", f"c{uuid.uuid4().hex[:6]}@%h",
                           "--without-gossip", "--without-mingle", "--without-heartbeat"], root)
    worker.wait_ready(60)
    return worker


def _send_and_check(module: Any, countdowns: tuple[float, ...]) -> None:
    sent = []
    for i, countdown in enumerate(countdowns):
        before = time.time()  # the ETA is computed between these two instants
        result = module.stamp.apply_async((i,), countdown=countdown)
        sent.append((result, before + countdown, time.time() + countdown))
    for result, earliest, latest in sent:
        tag, ran_at = result.get(timeout=max(countdowns) + 20)
        assert earliest - 0.05 <= ran_at <= latest + 1.0, \
            f"task {tag} ran {ran_at - earliest:+.2f} s from its ETA"


def test_our_countdown_runs_on_time_on_a_celery_worker(
        modules: tuple[Path, str, str], spawn_worker: Callable[..., Any]) -> None:
    root, celery_module, celeriac_module = modules
    worker = _celery_worker(spawn_worker, root, celery_module)
    import importlib

    ours = importlib.import_module(celeriac_module)
    try:
        _send_and_check(ours, (2.0, 4.0))
    except BaseException:
        print(worker.log()[-3000:])
        raise
    finally:
        ours.app.close()


def test_mixed_fleet_runs_our_countdowns_on_time(
        modules: tuple[Path, str, str], spawn_worker: Callable[..., Any]) -> None:
    """A Celeriac worker that parks a far ETA does not make it late for the Celery worker."""
    root, celery_module, celeriac_module = modules
    worker = _celery_worker(spawn_worker, root, celery_module)
    ours_worker = spawn_worker([str(VENV_BIN / "celeriac"), "-A", celeriac_module, "worker", "-l",
                                "info", "-P", "threads", "-c", "2"], root)
    ours_worker.wait_ready(60)
    import importlib

    ours = importlib.import_module(celeriac_module)
    try:
        _send_and_check(ours, (1.0, 4.0, 4.0, 5.0))
    except BaseException:
        print(worker.log()[-2000:], ours_worker.log()[-2000:])
        raise
    finally:
        ours.app.close()
