"""Issue 10, items 5, 6, 8, 11 and 12: retries, times in UTC, the current app, the one ETA parser,
settings that are honoured (or warned about) instead of silently ignored.

The worker tests run on every broker of ``conftest.py`` (memory, SQLite, and Redis and RabbitMQ
when they are up).
"""

from __future__ import annotations

import datetime as dt
import gc
import importlib
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

import pytest

from celeriac import Celeriac, states
from celeriac.broker.base import Delivery
from celeriac.config import DEFAULTS
from celeriac.exceptions import BrokerConnectionError
from celeriac.protocol import Message, TaskMessage, encode_task

CORE_SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGES = Path(__file__).resolve().parents[2]
UTC = dt.timezone.utc


def parse_iso8601(text: str) -> dt.datetime:
    """The core's parser (imported late so that this module loads on older trees)."""
    from celeriac.protocol import parse_iso8601 as parse

    return parse(text)


def to_timestamp(value: Any) -> float | None:
    """The core's header-time parser."""
    from celeriac.protocol import to_timestamp as parse

    return parse(value)


# -- item 5: retry_kwargs, and a final FAILURE whatever the path ---------------------------------

def test_autoretry_honours_retry_kwargs_max_retries(celeriac_app: Any, celeriac_worker: Any) -> None:
    runs: list[int] = []

    @celeriac_app.task(bind=True, autoretry_for=(ValueError,),
                       retry_kwargs={"max_retries": 5, "countdown": 0.01})
    def always_fails(self: Any) -> None:
        runs.append(self.request.retries)
        raise ValueError("always")

    result = always_fails.delay()
    with pytest.raises(ValueError, match="always"):
        result.get(timeout=20)
    assert runs == [0, 1, 2, 3, 4, 5]  # Celery: 1 run + max_retries retries
    assert result.state == states.FAILURE


def test_autoretry_with_backoff_and_retry_kwargs(celeriac_app: Any, celeriac_worker: Any) -> None:
    runs: list[int] = []

    @celeriac_app.task(bind=True, autoretry_for=(KeyError,), retry_backoff=0.01,
                       retry_jitter=False, retry_kwargs={"max_retries": 4})
    def flaky(self: Any) -> str:
        runs.append(self.request.retries)
        if self.request.retries < 4:
            raise KeyError("not yet")
        return "done"

    assert flaky.delay().get(timeout=20) == "done"
    assert runs == [0, 1, 2, 3, 4]


def test_failed_retry_send_stores_failure(celeriac_app: Any, celeriac_worker: Any,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    @celeriac_app.task(autoretry_for=(ValueError,), retry_kwargs={"max_retries": 5, "countdown": 0})
    def doomed() -> None:
        raise ValueError("first")

    send = celeriac_app.send_task

    def failing_send(name: str, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("retries"):
            raise BrokerConnectionError("broker gone while retrying")
        return send(name, *args, **kwargs)

    monkeypatch.setattr(celeriac_app, "send_task", failing_send)
    result = doomed.delay()
    with pytest.raises(BrokerConnectionError, match="broker gone"):
        result.get(timeout=15)
    assert result.state == states.FAILURE


def test_a_retry_is_stored_before_the_task_is_sent_again(celeriac_app: Any, celeriac_worker: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The second run's FAILURE is final even when storing the first run's RETRY is slow: the
    worker stores RETRY, then re-sends (sent first, RETRY could land after the FAILURE)."""
    backend = celeriac_app.backend
    store = backend.store

    def slow_retry_store(task_id: str, meta: dict[str, Any], **kwargs: Any) -> Any:
        if meta["status"] == states.RETRY:
            time.sleep(0.5)
        return store(task_id, meta, **kwargs)

    monkeypatch.setattr(backend, "store", slow_retry_store)

    @celeriac_app.task(bind=True, max_retries=1)
    def hopeless(self: Any) -> None:
        raise self.retry(exc=RuntimeError("never works"), countdown=0)

    result = hopeless.delay()
    with pytest.raises(RuntimeError, match="never works"):
        result.get(timeout=10)
    time.sleep(0.8)
    assert celeriac_app.AsyncResult(result.id).state == states.FAILURE


def test_eager_autoretry_honours_retry_kwargs() -> None:
    app = Celeriac("eager", broker="memory://eager-retry", task_always_eager=True)
    runs: list[int] = []

    @app.task(bind=True, autoretry_for=(ValueError,), retry_kwargs={"max_retries": 5})
    def always_fails(self: Any) -> None:
        runs.append(self.request.retries)
        raise ValueError("x")

    assert always_fails.delay().state == states.FAILURE
    assert runs == [0, 1, 2, 3, 4, 5]


def test_eager_errbacks_get_the_request_or_the_id_as_in_a_worker() -> None:
    """As Celery: an errback taking ``(request, exc, traceback)`` is called with them, one
    taking one argument gets the failed task's id (it used to get the id in both cases, so the
    first kind failed unseen)."""
    app = Celeriac("eager-eb", broker="memory://eager-errbacks")
    seen: list[Any] = []

    @app.task
    def boom() -> None:
        raise ValueError("boom")

    @app.task
    def with_request(request: Any, exc: BaseException, traceback: str) -> None:
        seen.append(("request", request.id, type(exc).__name__, "ValueError" in traceback))

    @app.task
    def with_id(task_id: str) -> None:
        seen.append(("id", task_id))

    result = boom.apply(task_id="t-1", link_error=[with_request.s(), with_id.s()])
    assert result.state == states.FAILURE
    assert seen == [("request", "t-1", "ValueError", True), ("id", "t-1")]


# -- item 6: every time computed in UTC ----------------------------------------------------------

def _capture(app: Celeriac, monkeypatch: pytest.MonkeyPatch) -> list[tuple[Message, float | None]]:
    sent: list[tuple[Message, float | None]] = []

    def publish(message: Message, exchange: str, routing_key: str, **kwargs: Any) -> None:
        sent.append((message, kwargs.get("not_before")))

    monkeypatch.setattr(app.broker, "publish", publish)
    return sent


def _require_tz(name: str) -> None:
    try:
        from zoneinfo import ZoneInfo

        ZoneInfo(name)
    except Exception as exc:  # no zoneinfo module or no time zone database (pip install tzdata)
        pytest.skip(f"time zone {name} is not available: {exc}")


def test_countdown_and_expires_across_a_dst_change(monkeypatch: pytest.MonkeyPatch) -> None:
    _require_tz("Europe/London")
    app = Celeriac("tz", broker="memory://tz-dst", timezone="Europe/London")
    # 00:30 UTC on the day British clocks go forward (01:00 UTC becomes 02:00 BST).
    base = dt.datetime(2026, 3, 29, 0, 30, tzinfo=UTC)
    monkeypatch.setattr(app, "now", lambda: base.astimezone(app.timezone))
    sent = _capture(app, monkeypatch)
    app.send_task("proj.add", (1, 2), countdown=7200, expires=10800)
    message, not_before = sent[0]
    assert parse_iso8601(message.headers["eta"]) == base + dt.timedelta(seconds=7200)
    assert parse_iso8601(message.headers["expires"]) == base + dt.timedelta(seconds=10800)
    assert not_before == (base + dt.timedelta(seconds=7200)).timestamp()
    assert message.headers["eta"].endswith("+00:00")
    assert message.properties["expiration"] == str(10800 * 1000)


def test_naive_datetimes_follow_enable_utc(monkeypatch: pytest.MonkeyPatch) -> None:
    _require_tz("Europe/London")
    naive = dt.datetime(2026, 7, 1, 12, 0)
    utc_app = Celeriac("tz", broker="memory://tz-utc", timezone="Europe/London")
    sent = _capture(utc_app, monkeypatch)
    utc_app.send_task("proj.add", eta=naive)
    utc_app.send_task("proj.add", eta="2026-07-01T12:00:00Z")
    assert [parse_iso8601(m.headers["eta"]) for m, _ in sent] == [naive.replace(tzinfo=UTC)] * 2

    local_app = Celeriac("tz", broker="memory://tz-local", timezone="Europe/London", enable_utc=False)
    sent = _capture(local_app, monkeypatch)
    local_app.send_task("proj.add", eta=naive)
    local_app.send_task("proj.add", eta="2026-07-01 12:00:00")
    # 12:00 in London in July is 11:00 UTC (BST).
    expected = dt.datetime(2026, 7, 1, 11, 0, tzinfo=UTC)
    assert [parse_iso8601(m.headers["eta"]) for m, _ in sent] == [expected, expected]


# -- item 8: the current app ---------------------------------------------------------------------

def test_shared_task_imported_before_the_app_sends_to_the_app(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"shared_mod_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        from celeriac import shared_task

        @shared_task
        def mul(x, y):
            return x * y

        @shared_task(bind=True, name="shared.whoami")
        def whoami(self):
            return self.app.main
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)  # a stray default broker would create celeriac-broker.db here
    module = importlib.import_module(name)
    unique = uuid.uuid4().hex[:8]
    app = Celeriac("django_like", broker=f"memory://{unique}", backend=f"memory://{unique}")
    from celeriac.testing.plugin import start_worker

    assert module.mul.app is app
    assert module.mul.name == f"{name}.mul" and f"{name}.mul" in app.tasks
    assert module.mul(3, 4) == 12
    worker = start_worker(app)
    try:
        assert module.mul.delay(2, 3).get(timeout=10) == 6
        assert module.whoami.delay().get(timeout=10) == "django_like"
    finally:
        worker.stop()
        worker._thread.join(10)
    assert not (tmp_path / "celeriac-broker.db").exists()
    # A later app made current explicitly takes over.
    other = Celeriac("other", broker="memory://other-current", set_as_current=False)
    assert module.mul.app is app
    other.set_current()
    assert module.mul.app is other and f"{name}.mul" in other.tasks
    app.close()


def test_no_app_is_kept_alive_by_the_library() -> None:
    app = Celeriac("short_lived", broker="memory://short-lived")
    ref = weakref.ref(app)
    del app
    gc.collect()
    assert ref() is None


def test_current_app_falls_back_and_explains() -> None:
    from celeriac.current import current_app

    keep = Celeriac("kept", broker="memory://kept")
    temp = Celeriac("temp", broker="memory://temp")
    assert current_app() is temp
    del temp
    gc.collect()
    assert current_app() is not None  # an app still alive becomes current again
    assert keep.set_current() is None and current_app() is keep


def test_signature_by_name_uses_the_current_app() -> None:
    from celeriac import signature

    app = Celeriac("sigs", broker="memory://sigs")
    assert signature("proj.add", (1, 2)).app is app


# -- item 11: one ETA parser ---------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("2026-11-30T07:25:17Z", dt.datetime(2026, 11, 30, 7, 25, 17, tzinfo=UTC)),
    ("2026-11-30T07:25:17.5z", dt.datetime(2026, 11, 30, 7, 25, 17, 500000, tzinfo=UTC)),
    ("2026-11-30T07:25:17.123456789+00:00", dt.datetime(2026, 11, 30, 7, 25, 17, 123456, tzinfo=UTC)),
    ("2026-11-30T08:25:17+0100", dt.datetime(2026, 11, 30, 7, 25, 17, tzinfo=UTC)),
    ("2026-11-30T02:25:17-05", dt.datetime(2026, 11, 30, 7, 25, 17, tzinfo=UTC)),
    ("2026-11-30 07:25:17", dt.datetime(2026, 11, 30, 7, 25, 17, tzinfo=UTC)),
    ("2026-11-30T07:25", dt.datetime(2026, 11, 30, 7, 25, tzinfo=UTC)),
])
def test_eta_parser_accepts_what_senders_write(text: str, expected: dt.datetime) -> None:
    assert parse_iso8601(text) == expected
    assert to_timestamp(text) == expected.timestamp()


def test_eta_parser_rejects_garbage() -> None:
    for bad in ("tomorrow", "2026-13-01T00:00:00", "2026-11-30T07:25:17+25:00x"):
        with pytest.raises(ValueError):
            parse_iso8601(bad)
    assert to_timestamp(None) is None and to_timestamp(12.5) == 12.5


def test_worker_request_reads_a_z_eta() -> None:
    from celeriac.worker.request import Request

    app = Celeriac("eta", broker="memory://eta-z")

    @app.task(name="eta.noop")
    def noop() -> None:
        return None

    message = encode_task("eta.noop", "id-1", [], {}, eta="2026-11-30T07:25:17Z",
                          expires="2026-11-30T08:25:17.25Z")
    decoded = TaskMessage(message.headers, message.properties, [], {})
    request = Request(noop, decoded, Delivery(message, "celery", "t", "", "celery"), "host")
    assert request.eta == dt.datetime(2026, 11, 30, 7, 25, 17, tzinfo=UTC).timestamp()
    assert request.expires == dt.datetime(2026, 11, 30, 8, 25, 17, 250000, tzinfo=UTC).timestamp()


def _python310() -> str | None:
    pyenv = Path(os.environ.get("PYENV_ROOT", "/root/.pyenv")) / "versions"
    if pyenv.is_dir():
        for candidate in sorted(pyenv.glob("3.10*/bin/python3.10")):
            return str(candidate)
    found = shutil.which("python3.10")
    if found and "shims" not in found:  # a pyenv shim fails when 3.10 is not selected
        return found
    return None


def test_z_eta_on_python_310() -> None:
    """The declared minimum: ``datetime.fromisoformat`` rejects ``Z`` before 3.11."""
    python = _python310()
    if python is None:
        pytest.skip("no Python 3.10 interpreter on this machine")
    code = textwrap.dedent("""
        import datetime as dt
        from celeriac.app import Celeriac
        from celeriac.broker.base import Delivery
        from celeriac.protocol import TaskMessage, encode_task
        from celeriac.worker.request import Request

        app = Celeriac("py310", broker="memory://py310")
        task = app.task(name="py310.noop")(lambda: None)
        message = encode_task("py310.noop", "id", [], {}, eta="2026-11-30T07:25:17Z")
        decoded = TaskMessage(message.headers, message.properties, [], {})
        request = Request(task, decoded, Delivery(message, "celery", "t", "", "celery"), "h")
        want = dt.datetime(2026, 11, 30, 7, 25, 17, tzinfo=dt.timezone.utc).timestamp()
        assert request.eta == want, request.eta
        sent = []
        app.broker.publish = lambda m, *a, **k: sent.append(m)
        app.send_task("py310.noop", eta="2026-11-30T07:25:17Z", expires="2026-11-30T08:00:00Z")
        assert sent[0].headers["eta"] == "2026-11-30T07:25:17+00:00", sent[0].headers
        print("ok")
    """)
    site = [p for p in sys.path if p.endswith("site-packages")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(CORE_SRC), *site]),
               CELERIAC_DISABLE_PLUGIN_AUTOLOAD="1")
    env.pop("CELERIAC_BROKER_URL", None)
    done = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout + done.stderr


# -- item 12: settings honoured or warned about --------------------------------------------------

def test_every_default_setting_is_read_somewhere() -> None:
    """A setting in DEFAULTS that no code reads would be accepted and silently ignored."""
    sources = [p for p in PACKAGES.glob("*/src/**/*.py") if p.name != "config.py"]
    text = "\n".join(p.read_text(encoding="utf-8") for p in sources)
    config = (CORE_SRC / "celeriac" / "config.py").read_text(encoding="utf-8")
    unread = []
    for key in DEFAULTS:
        used = re.search(rf"""["']{re.escape(key)}["']|\.{re.escape(key)}\b""", text)
        derived = re.search(rf"""_data\[["']{re.escape(key)}["']\]""", config)
        if not used and not derived:
            unread.append(key)
    assert unread == []
    from celeriac.config import UNSUPPORTED

    assert not set(DEFAULTS) & set(UNSUPPORTED)


def test_unsupported_settings_warn() -> None:
    import celeriac.config

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("celeriac")
    was_disabled, log.disabled = log.disabled, False
    log.addHandler(handler)
    try:
        celeriac.config._warned.discard("worker_deduplicate_successful_tasks")
        app = Celeriac("warn", broker="memory://warn", worker_deduplicate_successful_tasks=True)
    finally:
        log.removeHandler(handler)
        log.disabled = was_disabled
    assert any("worker_deduplicate_successful_tasks" in r.getMessage() and "not supported" in r.getMessage()
               for r in records)
    assert app.conf["worker_deduplicate_successful_tasks"] is True


def test_task_create_missing_queues(monkeypatch: pytest.MonkeyPatch) -> None:
    from celeriac.routing import Queue

    strict = Celeriac("q", broker="memory://q-strict", task_create_missing_queues=False,
                      task_queues=[Queue("known")], task_default_queue="known")
    sent = _capture(strict, monkeypatch)
    strict.send_task("proj.add", queue="known")
    from celeriac.exceptions import QueueNotFound

    with pytest.raises(QueueNotFound, match="not in task_queues"):
        strict.send_task("proj.add", queue="unknown")
    assert len(sent) == 1
    lenient = Celeriac("q", broker="memory://q-lenient")
    sent = _capture(lenient, monkeypatch)
    lenient.send_task("proj.add", queue="anything")
    assert len(sent) == 1


def test_task_store_eager_result() -> None:
    unique = uuid.uuid4().hex[:8]
    app = Celeriac("eager", broker=f"memory://{unique}", backend=f"memory://{unique}",
                   task_always_eager=True, task_store_eager_result=True)

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    result = add.delay(2, 2)
    assert app.backend is not None
    assert app.backend.wait([result.id], timeout=2)[result.id]["result"] == 4


def test_task_send_sent_event() -> None:
    from celeriac.events import EventReceiver

    unique = uuid.uuid4().hex[:8]
    app = Celeriac("sent", broker=f"memory://{unique}", task_send_sent_event=True)
    receiver = EventReceiver(app, "task.#")
    try:
        app.send_task("proj.add", (1, 2), task_id="sent-1")
        captured = list(receiver.itercapture(limit=1, timeout=5))
        assert captured and captured[0]["type"] == "task-sent" and captured[0]["uuid"] == "sent-1"
        assert captured[0]["name"] == "proj.add" and captured[0]["queue"] == "celery"
    finally:
        receiver.close()
