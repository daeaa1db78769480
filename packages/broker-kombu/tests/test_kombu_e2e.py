"""End to end through the real command lines on kombu transports.

* ``examples/tutorial.py`` (every call of the seed tutorial, remote control included) on
  ``kombu+filesystem://`` with ``rpc://`` results;
* the seed project's calls through ``celeriac -A proj worker`` on ``kombu+sqla+postgresql://``
  and ``kombu+zookeeper://`` (neither has fanout, so no remote control there);
* interop both ways with a real Celery 5.6 worker on the same kombu transport: Celery's client
  sends to a Celeriac worker and Celeriac's client to a Celery worker, chains included.

Task modules are generated per test (own queue, own output file) so the same task names exist
in a Celery app and in a Celeriac app. Tasks write what they computed to a file, so the tests
need no result backend shared by both programs.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from celeriac.testing.process import WorkerProcess

VENV_BIN = Path(sys.executable).parent
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"

COMMON = '''
import json

CELERIAC_URL, CELERY_URL, OPTIONS, QUEUE, OUT = {celeriac_url!r}, {celery_url!r}, {options!r}, {queue!r}, {out!r}


def configure(app, side):
    app.conf.update(broker_transport_options=OPTIONS, task_default_queue=QUEUE)

    def record(name, args, result):
        with open(OUT, "a") as handle:
            handle.write(json.dumps({{"task": name, "args": list(args), "result": result, "by": side}}) + "\\n")
        return result

    @app.task(name="kombu_e2e.add")
    def add(x, y):
        return record("add", (x, y), x + y)

    @app.task(name="kombu_e2e.mul")
    def mul(x, y):
        return record("mul", (x, y), x * y)

    return add, mul
'''

CELERIAC_APP = '''
from celeriac import Celeriac
from {common} import CELERIAC_URL, configure
app = Celeriac("celeriac_side", broker=CELERIAC_URL)
add, mul = configure(app, "celeriac")
'''

CELERY_APP = '''
from celery import Celery
from {common} import CELERY_URL, configure
app = Celery("celery_side", broker=CELERY_URL)
app.conf.task_ignore_result = True
add, mul = configure(app, "celery")
'''


def _clean_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(EXAMPLES), env.get("PYTHONPATH", "")])
    env.pop("CELERIAC_BROKER_URL", None)
    env.pop("CELERIAC_RESULT_BACKEND", None)
    return env


class Project:
    """Generated Celery and Celeriac task modules sharing one kombu transport, and workers."""

    def __init__(self, root: Path, celeriac_url: str, celery_url: str, options: dict[str, Any]) -> None:
        self.root = root
        self.celeriac_url = celeriac_url
        suffix = uuid.uuid4().hex[:8]
        self.queue = f"kombu-e2e-{suffix}"
        self.out = root / "out.jsonl"
        self.common = f"kombu_common_{suffix}"
        self.celeriac_mod = f"kombu_celeriac_{suffix}"
        self.celery_mod = f"kombu_celery_{suffix}"
        (root / f"{self.common}.py").write_text(COMMON.format(
            celeriac_url=celeriac_url, celery_url=celery_url, options=options, queue=self.queue,
            out=str(self.out)))
        (root / f"{self.celeriac_mod}.py").write_text(CELERIAC_APP.format(common=self.common))
        (root / f"{self.celery_mod}.py").write_text(CELERY_APP.format(common=self.common))
        self.workers: list[WorkerProcess] = []
        self.modules: list[ModuleType] = []

    def start(self, argv: list[str], name: str) -> WorkerProcess:
        worker = WorkerProcess(argv, str(self.root), _clean_env(self.root), str(self.root / f"{name}.log"))
        self.workers.append(worker)
        worker.wait_ready(60)
        return worker

    def celeriac_worker(self) -> WorkerProcess:
        return self.start([str(VENV_BIN / "celeriac"), "-A", self.celeriac_mod, "worker", "-l", "info",
                           "-P", "threads", "-c", "2", "-n", f"celeriac-{self.queue}@%h"], "celeriac")

    def celery_worker(self) -> WorkerProcess:
        return self.start([str(VENV_BIN / "celery"), "-A", self.celery_mod, "worker", "-l", "info",
                           "-P", "threads", "-c", "2", "-n", f"celery-{self.queue}@%h",
                           "--without-gossip", "--without-mingle", "--without-heartbeat"], "celery")

    def module(self, name: str) -> ModuleType:
        if str(self.root) not in sys.path:
            sys.path.insert(0, str(self.root))
        module = importlib.import_module(name)
        self.modules.append(module)
        return module

    def records(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]

    def wait_records(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = self.records()
            if len(records) >= count:
                return records
            time.sleep(0.05)
        raise AssertionError(f"{len(self.records())} of {count} tasks ran:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {w.log_path}\n{w.log()[-3000:]}" for w in self.workers)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        for module in self.modules:
            app = getattr(module, "app", None)
            close = getattr(app, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    pass
        if str(self.root) in sys.path:
            sys.path.remove(str(self.root))
        if self.celeriac_url.startswith("kombu+sqla"):  # kombu's SQLAlchemy transport keeps acked rows
            from celeriac_kombu import KombuBroker

            with KombuBroker(self.celeriac_url, {}) as broker:
                broker.delete_queue(self.queue)


def _filesystem(tmp_path: Path) -> tuple[str, str, dict[str, Any]]:
    spool = tmp_path / "spool"
    options = {"data_folder_in": str(spool / "data"), "data_folder_out": str(spool / "data"),
               "control_folder": str(spool / "control")}
    for folder in set(options.values()):
        os.makedirs(folder, exist_ok=True)
    return f"kombu+filesystem://{spool}", "filesystem://", options


@pytest.fixture(params=["filesystem", "sqla"])
def project(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Project]:
    if request.param == "filesystem":
        celeriac_url, celery_url, options = _filesystem(tmp_path)
    else:
        celeriac_url = request.getfixturevalue("sqla_url")
        celery_url, options = celeriac_url.removeprefix("kombu+"), {}
    proj = Project(tmp_path, celeriac_url, celery_url, options)
    yield proj
    proj.close()


def _exercise(project: Project, module: ModuleType, chain: Callable[..., Any], by: str) -> None:
    """Send add, a countdown and a chain; check the other side ran each (and advanced the chain)."""
    module.add.delay(2, 2)
    start = time.time()
    module.add.apply_async((1, 1), countdown=1)
    chain(module.add.s(4, 4), module.mul.s(8)).apply_async()
    records = project.wait_records(4)
    assert {(r["task"], tuple(r["args"]), r["result"]) for r in records} == {
        ("add", (2, 2), 4), ("add", (1, 1), 2), ("add", (4, 4), 8), ("mul", (8, 8), 64)}, records
    assert {r["by"] for r in records} == {by}, records
    assert time.time() - start >= 0.95


def test_celery_client_to_celeriac_worker(project: Project) -> None:
    project.celeriac_worker()
    import celery

    _exercise(project, project.module(project.celery_mod), celery.chain, "celeriac")


def test_celeriac_client_to_celery_worker(project: Project) -> None:
    project.celery_worker()
    import celeriac

    _exercise(project, project.module(project.celeriac_mod), celeriac.chain, "celery")


def test_the_repository_tutorial_on_filesystem(tmp_path: Path) -> None:
    """``examples/tutorial.py``, every call (remote control, revoke, chords, 500 round trips) on
    ``kombu+filesystem://``, results through ``rpc://`` (reply queues on the same transport)."""
    env = dict(os.environ, CELERIAC_BROKER_URL=f"kombu+filesystem://{tmp_path / 'spool'}",
               CELERIAC_RESULT_BACKEND="rpc://")
    done = subprocess.run([sys.executable, str(EXAMPLES / "tutorial.py")], env=env, check=False,
                          capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "All tutorial calls gave the expected answers." in done.stdout


@pytest.mark.parametrize("url_fixture", ["sqla_url", "zookeeper_url"])
def test_seed_tutorial_through_the_cli(url_fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The seed project (``celeriac -A proj worker``) on kombu's SQLAlchemy (PostgreSQL) and
    Zookeeper transports: calls, countdown, group, chain, chord, retries and a burst, results in
    SQLite. Neither transport has fanout, so no remote control. Its own queue name keeps the test
    apart from other users of the server."""
    sqla_url = request.getfixturevalue(url_fixture)
    suffix = uuid.uuid4().hex[:8]
    queue = f"kombu-seed-{suffix}"
    results = f"sqlite:///{tmp_path / 'results.db'}"
    (tmp_path / "seedconf.py").write_text(f"task_default_queue = {queue!r}\n")
    env = _clean_env(tmp_path)
    env["CELERIAC_BROKER_URL"] = sqla_url
    env["CELERIAC_RESULT_BACKEND"] = results
    worker = WorkerProcess([str(VENV_BIN / "celeriac"), "-A", "proj", "--config", "seedconf", "worker",
                            "-l", "info", "-P", "threads", "-c", "4"], str(tmp_path), env,
                           str(tmp_path / "seed.log"))
    sys.path.insert(0, str(EXAMPLES))
    try:
        worker.wait_ready(60)
        from proj.celery import app
        from proj.tasks import add, flaky, mul, xsum

        from celeriac import chain, chord, group

        app.close()  # other packages' tests may have used the shared seed app: restore it after
        changed = {"broker_url": sqla_url, "result_backend": results, "task_default_queue": queue}
        saved = {key: app.conf.get(key) for key in changed}
        app.conf.update(changed)
        try:
            assert add.delay(4, 4).get(timeout=15) == 8
            start = time.monotonic()
            assert mul.apply_async((3, 3), countdown=1).get(timeout=15) == 9
            assert time.monotonic() - start >= 0.95
            assert group(add.s(i, i) for i in range(5))().get(timeout=15) == [0, 2, 4, 6, 8]
            assert chain(add.s(4, 4) | mul.s(8))().get(timeout=15) == 64
            assert chord((add.s(i, i) for i in range(5)), xsum.s())().get(timeout=15) == 20
            assert flaky.delay().get(timeout=15) == "succeeded after 2 retries"
            burst = [add.delay(i, i) for i in range(100)]
            assert [r.get(timeout=30) for r in burst] == [2 * i for i in range(100)]
        except BaseException:
            print(worker.log()[-4000:])
            raise
        finally:
            app.close()
            app.conf.update(saved)
    finally:
        sys.path.remove(str(EXAMPLES))
        worker.stop()
        from celeriac_kombu import KombuBroker

        with KombuBroker(sqla_url, {}) as broker:  # kombu's SQLAlchemy transport keeps acked rows
            broker.delete_queue(queue)
