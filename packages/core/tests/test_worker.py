"""The worker against the in-memory broker and backend: execution, states, canvas, bad input."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from celeriac import chain, chord, group, states
from celeriac.exceptions import ChordError, SoftTimeLimitExceeded, TaskRevokedError
from celeriac.protocol import Message, encode_task
from celeriac.testing.plugin import start_worker


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


@pytest.fixture
def tasks(celeriac_app: Any) -> Any:
    app = celeriac_app

    class Tasks:
        calls: list[Any] = []

        @staticmethod
        @app.task
        def add(x: int, y: int) -> int:
            return x + y

        @staticmethod
        @app.task
        def mul(x: int, y: int) -> int:
            return x * y

        @staticmethod
        @app.task
        def xsum(numbers: list[int]) -> int:
            return sum(numbers)

        @staticmethod
        @app.task
        def fail(message: str = "boom") -> None:
            raise ValueError(message)

        @staticmethod
        @app.task
        def record(value: Any) -> Any:
            Tasks.calls.append(value)
            return value

    return Tasks


def test_delay_get_and_states(celeriac_app: Any, celeriac_worker: Any, tasks: Any) -> None:
    result = tasks.add.delay(2, 2)
    assert result.get(timeout=5) == 4
    assert result.state == states.SUCCESS
    assert result.successful() and not result.failed()
    assert celeriac_app.AsyncResult("never-sent").state == states.PENDING


def test_failure_propagates_with_type(celeriac_worker: Any, tasks: Any) -> None:
    result = tasks.fail.delay("bad input")
    with pytest.raises(ValueError, match="bad input"):
        result.get(timeout=5)
    assert isinstance(result.get(propagate=False), ValueError)
    assert result.failed()
    assert "ValueError: bad input" in (result.traceback or "")


def test_canvas_through_the_worker(celeriac_worker: Any, tasks: Any) -> None:
    add, mul, xsum = tasks.add, tasks.mul, tasks.xsum
    assert group(add.s(i, i) for i in range(10))().get(timeout=10) == list(range(0, 20, 2))
    assert group(add.s(i) for i in range(10))(10).get(timeout=10) == list(range(10, 20))
    assert chain(add.s(4, 4) | mul.s(8))().get(timeout=10) == 64
    assert chain(add.s(4) | mul.s(8))(4).get(timeout=10) == 64
    assert chord((add.s(i, i) for i in range(10)), xsum.s())().get(timeout=10) == 90
    assert (group(add.s(i, i) for i in range(10)) | xsum.s())().get(timeout=10) == 90
    # a chain with a chord in the middle and a group at the end
    workflow = add.s(1, 1) | group(add.s(i) for i in range(3)) | xsum.s() | group(mul.s(2), mul.s(3))
    assert workflow().get(timeout=10) == [18, 27]


def test_invert_sends_and_waits_as_in_the_guide(celeriac_worker: Any, tasks: Any) -> None:
    # Celery's "Next Steps", Map & Starmap: ~xsum.map([range(10), range(100)]).
    assert ~tasks.xsum.map([list(range(10)), list(range(100))]) == [45, 4950]
    assert ~tasks.add.starmap(zip(range(5), range(5), strict=True)) == [0, 2, 4, 6, 8]
    assert ~tasks.add.s(2, 2) == 4
    assert ~(tasks.add.s(2, 2) | tasks.mul.s(8)) == 32
    with pytest.raises(ValueError, match="inverted"):
        ~tasks.fail.s("inverted")


def test_link_and_link_error(celeriac_worker: Any, tasks: Any) -> None:
    tasks.add.apply_async((2, 2), link=tasks.record.s())
    wait_until(lambda: 4 in tasks.calls)
    failed = tasks.fail.apply_async(("x",), link_error=tasks.record.s())
    wait_until(lambda: failed.id in tasks.calls)


def test_chain_failure_reaches_the_last_result(celeriac_worker: Any, tasks: Any) -> None:
    result = (tasks.add.s(1, 1) | tasks.fail.si("middle") | tasks.add.s(1))()
    with pytest.raises(ValueError, match="middle"):
        result.get(timeout=10)


def test_chord_with_a_failed_member_fails_the_body(celeriac_worker: Any, tasks: Any) -> None:
    result = chord([tasks.add.s(1, 1), tasks.fail.si("member")], tasks.xsum.s())()
    # get() raises the failed header member's own error first (it follows parents, as Celery)
    with pytest.raises(ValueError, match="member"):
        result.get(timeout=10)
    with pytest.raises(ChordError, match="member"):
        result.get(timeout=10, follow_parents=False)


def test_chord_joins_exactly_once(celeriac_app: Any, tasks: Any) -> None:
    worker = start_worker(celeriac_app, concurrency=8)
    try:
        body_runs: list[int] = []

        @celeriac_app.task
        def count_body(values: list[int]) -> int:
            body_runs.append(len(values))
            return sum(values)

        result = chord([tasks.add.s(i, 0) for i in range(200)], count_body.s())()
        assert result.get(timeout=20) == sum(range(200))
        time.sleep(0.2)
        assert body_runs == [200]
    finally:
        worker.stop()


def test_retry_and_autoretry(celeriac_app: Any, celeriac_worker: Any) -> None:
    seen: list[int] = []

    @celeriac_app.task(bind=True, max_retries=5, default_retry_delay=0.05)
    def flaky(self: Any) -> str:
        seen.append(self.request.retries)
        if self.request.retries < 2:
            raise self.retry(exc=KeyError("again"))
        return "ok"

    @celeriac_app.task(autoretry_for=(ConnectionError,), max_retries=2, retry_backoff=0.01,
                       retry_jitter=False)
    def always_down() -> None:
        raise ConnectionError("down")

    assert flaky.delay().get(timeout=10) == "ok"
    assert seen == [0, 1, 2]
    with pytest.raises(ConnectionError):
        always_down.delay().get(timeout=10)


def test_max_retries_exceeded_stores_failure(celeriac_app: Any, celeriac_worker: Any) -> None:
    @celeriac_app.task(bind=True, max_retries=1, default_retry_delay=0.01)
    def hopeless(self: Any) -> None:
        raise self.retry(exc=RuntimeError("never works"))

    with pytest.raises(RuntimeError, match="never works"):
        hopeless.delay().get(timeout=10)


def test_countdown_never_runs_early(celeriac_app: Any, celeriac_worker: Any) -> None:
    ran_at: list[float] = []

    @celeriac_app.task
    def stamp() -> None:
        ran_at.append(time.time())

    sent = time.time()
    stamp.apply_async(countdown=0.6).get(timeout=10)
    assert ran_at[0] >= sent + 0.6


def test_expired_task_is_revoked_not_run(celeriac_app: Any, tasks: Any) -> None:
    result = tasks.record.apply_async(("expired",), expires=0.01)
    time.sleep(0.1)
    worker = start_worker(celeriac_app)
    try:
        with pytest.raises(TaskRevokedError):
            result.get(timeout=10)
        assert result.state == states.REVOKED
        assert "expired" not in tasks.calls
    finally:
        worker.stop()


def test_track_started_and_ignore_result(celeriac_app: Any, celeriac_worker: Any) -> None:
    release = threading.Event()

    @celeriac_app.task(track_started=True)
    def slow() -> str:
        release.wait(5)
        return "done"

    @celeriac_app.task(ignore_result=True)
    def quiet() -> int:
        return 1

    result = slow.delay()
    wait_until(lambda: result.state == states.STARTED)
    meta = celeriac_app.backend.get(result.id)
    assert meta["result"]["hostname"] == celeriac_worker.hostname
    release.set()
    assert result.get(timeout=5) == "done"
    quiet_result = quiet.delay()
    tasks_done = celeriac_worker.task_consumer
    wait_until(lambda: tasks_done.processed >= 2)
    assert quiet_result.state == states.PENDING


def test_soft_time_limit_raises_inside_the_task(celeriac_app: Any, celeriac_worker: Any) -> None:
    @celeriac_app.task(soft_time_limit=0.2)
    def long_running() -> str:
        try:
            for _ in range(500):
                time.sleep(0.01)
        except SoftTimeLimitExceeded:
            return "cleaned up"
        return "finished"

    assert long_running.delay().get(timeout=10) == "cleaned up"


def test_rate_limit_spaces_executions(celeriac_app: Any, celeriac_worker: Any) -> None:
    times: list[float] = []

    @celeriac_app.task(rate_limit="20/s")
    def limited() -> None:
        times.append(time.monotonic())

    group(limited.si() for _ in range(5))().get(timeout=10)
    times.sort()
    assert times[-1] - times[0] >= 4 * (1 / 20) * 0.9


def test_wrong_argument_count_from_a_foreign_client_is_a_failure(celeriac_app: Any,
                                                                 celeriac_worker: Any, tasks: Any) -> None:
    # A client without the task's signature (send_task by name) can send bad arguments.
    result = celeriac_app.send_task(tasks.add.name, [1])
    with pytest.raises(TypeError):
        result.get(timeout=5)
    assert tasks.add.delay(1, 1).get(timeout=5) == 2


def _raw(celeriac_app: Any, message: Message) -> None:
    celeriac_app.broker.publish(message, "", "celery", queue=celeriac_app.router.queue("celery"))


def test_hostile_flood_leaves_the_worker_consuming(celeriac_app: Any, celeriac_worker: Any,
                                                   tasks: Any, caplog: Any) -> None:
    good = encode_task(tasks.add.name, "x", [1, 2], {})
    pickled = encode_task(tasks.add.name, "pickled-id", [1, 2], {}, serializer="pickle")
    variants = [
        Message({}, {}, b"\x00\xff garbage"),
        Message({"task": tasks.add.name, "id": "bad-json"}, {}, b"{not json"),
        Message({"task": "no.such.task", "id": "unknown-id"}, {}, good.body),
        Message(dict(pickled.headers), dict(pickled.properties), pickled.body,
                pickled.content_type, pickled.content_encoding),
        Message({"task": tasks.add.name}, {}, good.body),
        Message({"task": tasks.add.name, "id": "wrong-shape"}, {}, b'{"a": 1}'),
        Message({"task": tasks.add.name, "id": "args-not-list"}, {}, b'[5, {}, {}]'),
        Message({"task": tasks.add.name, "id": "bad-eta", "eta": "not a date"}, {}, good.body),
        Message({"task": tasks.add.name, "id": "ctype"}, {}, good.body, "application/x-unknown"),
    ]
    caplog.set_level("ERROR", logger="celeriac.worker")
    # one 10 MB body among them
    _raw(celeriac_app, Message({"task": tasks.add.name, "id": "big"}, {}, b"[" + b"1," * (5 * 1024 * 1024) + b"1]"))
    for index in range(999):
        _raw(celeriac_app, variants[index % len(variants)])
    assert tasks.add.delay(20, 22).get(timeout=60) == 42
    wait_until(lambda: celeriac_worker.task_consumer.reserved == 0, 30)
    errors = [r for r in caplog.records if r.name == "celeriac.worker" and r.levelname == "ERROR"]
    assert len(errors) == 1000  # each bad message logged exactly once
    # the pickle message was refused, not executed, and its state says why
    assert celeriac_app.AsyncResult("pickled-id").state == states.FAILURE
    assert celeriac_app.AsyncResult("unknown-id").state == states.FAILURE
    assert celeriac_app.broker.queue_size("celery") == 0


def test_acks_late_task_is_redelivered_after_cold_shutdown(celeriac_app: Any, tasks: Any) -> None:
    started = threading.Event()
    runs: list[int] = []

    @celeriac_app.task(acks_late=True)
    def careful() -> str:
        runs.append(1)
        if len(runs) == 1:
            started.set()
            time.sleep(3)
        return "done"

    worker = start_worker(celeriac_app)
    result = careful.delay()
    assert started.wait(5)
    worker.stop(warm=False)
    worker._thread.join(5)
    replacement = start_worker(celeriac_app)
    try:
        assert result.get(timeout=10) == "done"
        assert len(runs) >= 2
    finally:
        replacement.stop()


def test_warm_shutdown_finishes_running_tasks(celeriac_app: Any) -> None:
    started = threading.Event()

    @celeriac_app.task
    def slow() -> str:
        started.set()
        time.sleep(0.5)
        return "finished"

    worker = start_worker(celeriac_app)
    result = slow.delay()
    assert started.wait(5)
    worker.stop(warm=True)
    worker._thread.join(10)
    assert result.get(timeout=1) == "finished"
    assert worker.exit_code == 0


def test_results_without_backend_say_how_to_configure_one(celeriac_app: Any, tasks: Any) -> None:
    from celeriac.exceptions import ResultsDisabled

    celeriac_app.conf.result_backend = None
    celeriac_app._backend = None
    with pytest.raises(ResultsDisabled, match="backend='sqlite:///results.db'"):
        tasks.add.delay(1, 1).get(timeout=1)
