"""App, settings, routing, plugins and the eager canvas."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from celeriac import Celeriac, Celery, chain, chord, group, shared_task
from celeriac.exceptions import ImproperlyConfigured, PluginNotFound
from celeriac.routing import Exchange, Queue


def test_celery_alias_and_defaults() -> None:
    app = Celery("proj")
    assert app.__class__ is Celeriac
    conf = app.conf
    assert conf.task_default_queue == "celery"
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.worker_prefetch_multiplier == 4 and conf.task_default_retry_delay == 180
    assert conf.result_backend is None and conf.enable_utc is True
    assert app.broker_url.startswith("sqlite:///")


def test_settings_from_everywhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "proj_settings.py").write_text("broker_url = 'memory://cfg'\ntask_acks_late = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    app = Celeriac("proj", task_track_started=True)
    app.config_from_object("proj_settings")
    app.conf.update(result_expires=3600)
    assert app.conf.broker_url == "memory://cfg" and app.conf.task_acks_late
    assert app.conf.task_track_started and app.conf["result_expires"] == 3600
    monkeypatch.setenv("CELERIAC_BROKER_URL", "memory://env")
    monkeypatch.setenv("CELERIAC_RESULT_BACKEND", "memory://env")
    assert app.broker_url == "memory://env" and app.backend_url == "memory://env"
    with pytest.raises(ImproperlyConfigured, match="proj.celeryconfig"):
        app.config_from_object("no_such_settings_module_here")


def test_unknown_scheme_names_the_package_to_install() -> None:
    # (sqs:// is no longer unknown once celeriac-kombu is installed: it names boto3 instead.)
    app = Celeriac("proj", broker="nosuchbroker://queue.example")
    with pytest.raises(PluginNotFound, match="Installed: .*memory.*sqlite"):
        _ = app.broker
    app = Celeriac("proj", broker="nats://localhost")
    with pytest.raises(PluginNotFound, match="check the spelling"):
        _ = app.broker
    from celeriac.plugins.manager import KNOWN_PROVIDERS, _missing

    assert "pip install celeriac-redis" in str(_missing("broker", "redis", {}))
    assert KNOWN_PROVIDERS["rpc"] == "celeriac-rpc"


def test_import_celeriac_pulls_in_no_broker_client() -> None:
    code = ("import sys, celeriac; from celeriac import Celeriac, group; "
            "app = Celeriac('x'); import celeriac.worker.worker, celeriac.cli.main; "
            "print(sorted(m for m in ('pika', 'redis', 'proton', 'gevent', 'eventlet', 'kombu', 'celery') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_broken_plugin_is_reported_and_others_still_load(tmp_path: Path) -> None:
    dist = tmp_path / "celeriac_broken-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: celeriac-broken\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[celeriac]\nbroken = celeriac_broken_missing_module\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "celeriac", "plugins"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.returncode == 0
    assert "celeriac-broken 1.0" in out.stdout and "FAILED TO LOAD" in out.stdout
    assert "builtin" in out.stdout and "sqlite" in out.stdout


def test_task_names_typing_and_shared_tasks() -> None:
    app = Celeriac("proj", broker="memory://names")

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="custom.name", bind=True)
    def bound(self: Any, value: int) -> Any:
        return self.name, value

    assert add.name == f"{__name__}.add" and add(2, 3) == 5
    assert bound(1) == ("custom.name", 1)
    with pytest.raises(TypeError, match="missing a required argument: 'y'"):
        add.delay(2)
    with pytest.raises(TypeError):
        bound.delay(1, 2)

    @shared_task
    def shared_mul(x: int, y: int) -> int:
        return x * y

    later = Celeriac("later", broker="memory://later")
    assert shared_mul.name in app.tasks and shared_mul.name in later.tasks


def test_routing_precedence() -> None:
    app = Celeriac("proj", broker="memory://routes", task_routes={
        "proj.tasks.add": {"queue": "hipri"},
        "proj.video.*": "video",
        re.compile(r"proj\.(image|audio)\..*"): {"queue": "media"},
    })
    router = app.router
    assert router.route("proj.tasks.add", {}).queue.name == "hipri"
    assert router.route("proj.video.encode", {}).queue.name == "video"
    assert router.route("proj.audio.mix", {}).queue.name == "media"
    assert router.route("proj.other", {}).queue.name == "celery"
    assert router.route("proj.tasks.add", {"queue": "lopri"}).queue.name == "lopri"
    # Celery's shortcut: direct queues go through the default exchange with the queue name
    route = router.route("proj.tasks.add", {})
    assert (route.exchange, route.routing_key) == ("", "hipri")
    route = router.route("x", {"queue": "q", "exchange": "ex", "routing_key": "rk"})
    assert (route.exchange, route.routing_key) == ("ex", "rk")
    app.conf.task_routes = [lambda name, *a, **k: "fn" if name.endswith("fn") else None]
    assert app.router.route("a.fn", {}).queue.name == "fn"
    topic = Queue("logs", Exchange("logs", "topic"), "logs.#")
    app.conf.task_queues = [topic]
    assert app.router.route("t", {"queue": "logs"}).exchange == "logs"


SEED_ANSWERS = [
    ("group(add.s(i, i) for i in range(10))()", list(range(0, 20, 2))),
    ("group(add.s(i) for i in range(10))(10)", list(range(10, 20))),
    ("chain(add.s(4, 4) | mul.s(8))()", 64),
    ("chain(add.s(4) | mul.s(8))(4)", 64),
    ("(add.s(4, 4) | mul.s(8))()", 64),
    ("chord((add.s(i, i) for i in range(10)), xsum.s())()", 90),
    ("(group(add.s(i, i) for i in range(10)) | xsum.s())()", 90),
    ("add.s(2).delay(8)", 10),
    ("add.signature((2, 2), countdown=10).delay()", 4),
]


@pytest.mark.parametrize(("expression", "answer"), SEED_ANSWERS)
def test_eager_canvas_gives_the_seed_answers(expression: str, answer: Any) -> None:
    app = Celeriac("proj", task_always_eager=True)

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    @app.task
    def mul(x: int, y: int) -> int:
        return x * y

    @app.task
    def xsum(numbers: list[int]) -> int:
        return sum(numbers)

    scope = {"add": add, "mul": mul, "xsum": xsum, "group": group, "chain": chain, "chord": chord}
    assert eval(expression, scope).get() == answer


def test_signature_partials_and_repr() -> None:
    app = Celeriac("proj", broker="memory://sigs")

    @app.task(name="proj.tasks.add")
    def add(x: int, y: int, debug: bool = False) -> int:
        return x + y

    partial = add.s(2, debug=True)
    assert repr(add.s(2, 2)) == "proj.tasks.add(2, 2)"
    assert repr(partial) == "proj.tasks.add(2, debug=True)"
    full = partial.clone(args=(8,), kwargs={"debug": False}, countdown=5)
    assert full.args == [8, 2] and full.kwargs == {"debug": False} and full.options["countdown"] == 5
    frozen = add.si(1, 1)
    assert frozen.clone(args=(5,)).args == [1, 1]
    assert add.s(2, 2)(()) if False else add.s(2, 2)() == 4
    assert repr(add.s(1) | add.s(2)) == "proj.tasks.add(1) | proj.tasks.add(2)"


def test_mypy_checks_delay_arguments(tmp_path: Path) -> None:
    mypy = shutil.which("mypy") or str(Path(sys.executable).parent / "mypy")
    if not Path(mypy).exists():
        pytest.skip("mypy is not installed in this environment")
    sample = tmp_path / "sample.py"
    sample.write_text(textwrap.dedent("""
        from celeriac import Celeriac
        app = Celeriac("proj")

        @app.task
        def add(x: int, y: int) -> int:
            return x + y

        add.delay(2, 2)
        add.delay(2, "two")
        add(1)
    """))
    out = subprocess.run([mypy, "--no-incremental", "--hide-error-context", str(sample)],
                         capture_output=True, text=True, timeout=300)
    errors = [line for line in out.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 2, out.stdout
    assert 'sample.py:10' in errors[0] and '"str"' in errors[0]
    assert 'sample.py:11' in errors[1]


def test_timezone_setting_shapes_eta_headers() -> None:
    from celeriac.protocol import Message

    app = Celeriac("proj", broker="memory://tz", timezone="Europe/London")

    @app.task
    def noop() -> None:
        return None

    sent: list[Message] = []
    app.broker.publish = lambda message, *a, **k: sent.append(message)  # type: ignore[method-assign]
    noop.apply_async(countdown=60)
    eta = sent[0].headers["eta"]
    assert eta[-6:] in ("+00:00", "+01:00")
    assert app.now().tzinfo is not None and str(app.timezone) == "Europe/London"
    app.conf.timezone = "Not/AZone"
    with pytest.raises(ImproperlyConfigured, match="IANA"):
        app.now()


def test_a_forked_child_opens_its_own_broker_and_backend(tmp_path: Path) -> None:
    """Connections belong to the process that opened them: after fork() the child gets new
    ones (the parent's stay untouched and usable)."""
    app = Celeriac("forky", broker=f"sqlite:///{tmp_path / 'b.db'}", backend=f"sqlite:///{tmp_path / 'r.db'}")
    parent_broker, parent_backend = app.broker, app.backend
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report whether it got new objects, then leave at once
        same = app.broker is parent_broker or app.backend is parent_backend
        os.write(write, b"same" if same else b"new")
        os._exit(0)
    os.close(write)
    assert os.read(read, 10) == b"new"
    os.waitpid(pid, 0)
    assert app.broker is parent_broker and app.backend is parent_backend
