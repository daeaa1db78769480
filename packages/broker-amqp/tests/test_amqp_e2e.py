"""End to end through the real ``celeriac`` command line over the live RabbitMQ.

The seed tutorial on ``amqp://guest@localhost:5672//`` with ``rpc://``; a worker killed with
SIGKILL while holding ``acks_late`` work; RabbitMQ restarted while thousands of tasks flow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from celeriac_amqp import AMQPBroker

SEED = Path(__file__).resolve().parents[3] / "examples" / "proj"
CELERIAC = [sys.executable, "-m", "celeriac.cli.main"]

pytestmark = pytest.mark.skipif(
    not (Path(__file__).resolve().parents[2] / "core" / "src" / "celeriac" / "cli" / "main.py").exists(),
    reason="the celeriac CLI is not there yet")


def _queue() -> str:
    return f"celeriac-e2e-{uuid.uuid4().hex[:10]}"


def _run_client(code: str, cwd: Path, env: dict[str, str], timeout: float = 120) -> dict:
    full_env = {**os.environ, **env, "PYTHONPATH": str(cwd)}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=full_env,
                         capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, f"client failed:\n{out.stdout}\n{out.stderr[-4000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _delete_queue(url: str, name: str) -> None:
    broker = AMQPBroker(url, {})
    broker.delete_queue(name)
    broker.close()


@pytest.fixture
def seed_project(tmp_path: Path, amqp_url: str) -> Iterator[tuple[Path, str]]:
    """A copy of the seed's project whose default queue is unique to this test (deleted after
    the workers stopped: request this fixture before ``spawn_worker``)."""
    shutil.copytree(SEED, tmp_path / "proj", ignore=shutil.ignore_patterns("__pycache__"))
    queue = _queue()
    with open(tmp_path / "proj" / "celery.py", "a") as handle:
        handle.write(f"\napp.conf.task_default_queue = {queue!r}  # test isolation\n")
    yield tmp_path, queue
    _delete_queue(amqp_url, queue)


def test_seed_tutorial_over_rabbitmq_and_rpc(amqp_url: str, seed_project: tuple[Path, str],
                                             spawn_worker: Callable[..., object]) -> None:
    cwd, _queue_name = seed_project
    env = {"CELERIAC_BROKER_URL": "amqp://guest@localhost:5672//",
           "CELERIAC_RESULT_BACKEND": "rpc://"}
    worker = spawn_worker([*CELERIAC, "-A", "proj", "worker", "-l", "info", "-c", "2",
                           "-P", "threads"], cwd, env)
    worker.wait_ready()  # type: ignore[attr-defined]
    assert "amqp://guest@localhost:5672//" in worker.log()  # type: ignore[attr-defined]
    got = _seed_client(cwd, env)
    assert got["add"] == 8 and got["ready"] is True
    assert got["mul"] == 21 and got["xsum"] == 6
    assert got["group"] == [i + i for i in range(10)]
    assert got["countdown"] == 2 and got["waited"] >= 1.0
    assert got["flaky"] == "succeeded after 2 retries"
    assert got["slow"] == 3 and "STARTED" in got["slow_states"]
    assert got["chain"] == 64
    assert got["chord"] == 90


def _seed_client(cwd: Path, env: dict[str, str]) -> dict:
    """The tutorial's calls, from a separate client process."""
    return _run_client("""
        import json, time
        from celeriac import chain, chord, group
        from proj.tasks import add, mul, xsum, slow_add, flaky
        out = {}
        res = add.delay(4, 4)
        out["add"] = res.get(timeout=20)
        out["ready"] = res.ready()
        out["mul"] = mul.delay(3, 7).get(timeout=20)
        out["xsum"] = xsum.delay([1, 2, 3]).get(timeout=20)
        out["group"] = group(add.s(i, i) for i in range(10))().get(timeout=20)
        started = time.time()
        out["countdown"] = add.apply_async((1, 1), countdown=1).get(timeout=20)
        out["waited"] = time.time() - started
        out["flaky"] = flaky.delay().get(timeout=20)
        slow = slow_add.delay(1, 2, 1.0)
        states = set()
        while not slow.ready():
            states.add(slow.state)
            time.sleep(0.05)
        out["slow_states"] = sorted(states)
        out["slow"] = slow.get(timeout=20)
        out["chain"] = chain(add.s(4, 4), mul.s(8))().get(timeout=20)
        out["chord"] = chord((add.s(i, i) for i in range(10)), xsum.s())().get(timeout=20)
        print(json.dumps(out))
    """, cwd, env)


E2E_APP = """
import os, time
from celeriac import Celeriac

app = Celeriac("e2eapp", broker=os.environ["E2E_BROKER"], backend=os.environ.get("E2E_BACKEND") or None)
app.conf.task_default_queue = os.environ["E2E_QUEUE"]


@app.task(acks_late=True)
def work(i, delay=0.0):
    if delay:
        time.sleep(delay)
    return i


@app.task(ignore_result=True)
def record(i):
    fd = os.open(os.environ["E2E_TALLY"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{i}\\n".encode())
    finally:
        os.close(fd)
"""


@pytest.fixture
def e2e_app(tmp_path: Path, amqp_url: str) -> Iterator[tuple[Path, dict[str, str]]]:
    """The test app module; its queue is deleted after the workers stopped."""
    (tmp_path / "e2eapp.py").write_text(E2E_APP)
    env = {"E2E_BROKER": amqp_url, "E2E_QUEUE": _queue(), "E2E_TALLY": str(tmp_path / "tally")}
    yield tmp_path, env
    _delete_queue(amqp_url, env["E2E_QUEUE"])


def _worker_argv(concurrency: int = 4) -> list[str]:
    return [*CELERIAC, "-A", "e2eapp", "worker", "-l", "info", "-c", str(concurrency),
            "-P", "threads"]


def test_kill_9_with_acks_late_work_is_redelivered_at_once(
        e2e_app: tuple[Path, dict[str, str]], spawn_worker: Callable[..., object]) -> None:
    cwd, env = e2e_app
    env = {**env, "E2E_BACKEND": "rpc://"}
    doomed = spawn_worker(_worker_argv(2), cwd, env)
    doomed.wait_ready()  # type: ignore[attr-defined]
    code = """
        import json, time, sys
        from e2eapp import app, work
        results = [work.delay(i, 1.5) for i in range(2)]
        print(json.dumps([r.id for r in results]), flush=True)
        sys.stdin.readline()          # the test kills the first worker, starts another
        started = time.time()
        values = [r.get(timeout=30) for r in results]
        print(json.dumps({"values": values, "took": time.time() - started}))
    """
    full_env = {**os.environ, **env, "PYTHONPATH": str(cwd)}
    client = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=full_env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdin is not None
        ids = json.loads(client.stdout.readline())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # both tasks are running in the doomed worker
            log = doomed.log()  # type: ignore[attr-defined]
            if all(f"[{i}] received" in log for i in ids):
                break
            time.sleep(0.05)
        doomed.kill()  # type: ignore[attr-defined]
        survivor = spawn_worker(_worker_argv(2), cwd, env)
        survivor.wait_ready()  # type: ignore[attr-defined]
        client.stdin.write("go\n")
        client.stdin.flush()
        out = json.loads(client.stdout.readline())
        assert out["values"] == [0, 1]
        assert out["took"] < 15
    finally:
        client.kill()
        client.wait(10)


def test_10000_tasks_two_workers_one_killed_lose_none(
        e2e_app: tuple[Path, dict[str, str]], spawn_worker: Callable[..., object]) -> None:
    cwd, env = e2e_app
    env = {**env, "E2E_BACKEND": "rpc://"}
    first = spawn_worker(_worker_argv(4), cwd, env)
    second = spawn_worker(_worker_argv(4), cwd, env)
    first.wait_ready()  # type: ignore[attr-defined]
    second.wait_ready()  # type: ignore[attr-defined]
    total = 10_000
    killed = threading.Event()

    def killer() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if first.log().count("succeeded") > 1500:  # type: ignore[attr-defined]
                first.kill()  # type: ignore[attr-defined]
                killed.set()
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        got = _run_client(f"""
            import json
            from e2eapp import app, work
            ids = [work.delay(i).id for i in range({total})]
            metas = app.backend.wait(ids, timeout=150)
            values = sorted(m["result"] for m in metas.values())
            print(json.dumps({{"n": len(metas), "ok": values == list(range({total}))}}))
        """, cwd, env, timeout=200)
        thread.join()
        assert killed.is_set(), "the first worker was not killed mid-run"
        assert got == {"n": total, "ok": True}
        assert "succeeded" in second.log()  # type: ignore[attr-defined]
    finally:
        thread.join()


def test_rabbitmq_restart_while_5000_tasks_flow(
        e2e_app: tuple[Path, dict[str, str]], spawn_worker: Callable[..., object],
        restart_rabbitmq: Callable[[], None]) -> None:
    cwd, env = e2e_app
    worker = spawn_worker(_worker_argv(4), cwd, env)
    worker.wait_ready()  # type: ignore[attr-defined]
    tally = Path(env["E2E_TALLY"])
    total = 5000
    code = f"""
        import json, sys
        from e2eapp import record
        for i in range({total}):
            record.delay(i)
            if i == {total // 4}:
                print("quarter", flush=True)
        print(json.dumps({{"sent": {total}}}), flush=True)
    """
    full_env = {**os.environ, **env, "PYTHONPATH": str(cwd)}
    client = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=full_env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "quarter"
        restart_rabbitmq()
        out, err = client.communicate(timeout=120)
        assert client.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1]) == {"sent": total}
        deadline = time.monotonic() + 90
        done: set[int] = set()
        while time.monotonic() < deadline and len(done) < total:
            if tally.exists():
                done = {int(x) for x in tally.read_text().split()}
            time.sleep(0.2)
        assert len(done) == total, f"{total - len(done)} tasks never ran"
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)
