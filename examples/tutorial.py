"""Run the seed's "Next Steps" tutorial end to end against a real worker.

Starts ``celeriac -A proj worker -l info -Q celery,hipri,lopri`` in a subprocess, makes every
call of the tutorial from this process, prints each call with its result, checks the answers,
then stops the worker with SIGTERM (a warm shutdown) and checks it exited with 0.

With no environment set it uses the embedded SQLite broker and result backend in a temporary
directory, so no server is needed. Set CELERIAC_BROKER_URL / CELERIAC_RESULT_BACKEND to run the
same tutorial on another broker (e.g. redis://localhost:6379/0).

Exit code 0 when every answer matched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
FAILURES: list[str] = []


def show(code: str, value: Any, expected: Any = ...) -> None:
    """Print one tutorial call and its result; remember a mismatch."""
    mark = ""
    if expected is not ... and value != expected:
        mark = f"   <-- expected {expected!r}"
        FAILURES.append(code)
    print(f">>> {code}\n{value!r}{mark}", flush=True)


def start_worker(env: dict[str, str]) -> tuple[subprocess.Popen[str], list[str]]:
    """Start the worker and wait for its 'ready.' log line."""
    cmd = [sys.executable, "-m", "celeriac", "-A", "proj", "worker", "-l", "info",
           "-Q", "celery,hipri,lopri", "-c", "4", "-P", "threads"]
    print("$ celeriac -A proj worker -l info -Q celery,hipri,lopri -c 4 -P threads", flush=True)
    proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if os.environ.get("TUTORIAL_WORKER_LOG") or not ready.is_set():
                print("    | " + line.rstrip(), flush=True)
            if "ready." in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + 60
    while not ready.wait(0.1) and proc.poll() is None and time.monotonic() < deadline:
        pass
    if not ready.is_set():
        proc.kill()
        raise SystemExit("The worker did not become ready:\n" + "".join(lines))
    return proc, lines


def run_tutorial() -> None:
    """Every call of the tutorial, in its order."""
    from celeriac import chain, chord, group
    from proj.celery import app
    from proj.tasks import add, flaky, mul, slow_add, xsum

    print("\n## Calling tasks", flush=True)
    show("add.delay(2, 2).get(timeout=10)", add.delay(2, 2).get(timeout=10), 4)
    res = add.apply_async((2, 2), queue="lopri", countdown=2)
    start = time.monotonic()
    value = res.get(timeout=20)
    show("add.apply_async((2, 2), queue='lopri', countdown=2).get()", value, 4)
    waited = time.monotonic() - start
    print(f"    (arrived after {waited:.1f} s)")
    if waited < 1.9:
        FAILURES.append("countdown ran early")
    res = add.delay(2, 2)
    show("res = add.delay(2, 2); res.get(timeout=10)", res.get(timeout=10), 4)
    show("res.id (a UUID4 string)", len(res.id) == 36 and res.id.count("-") == 4, True)
    res = add.delay(2, "2")
    try:
        res.get(timeout=10)
        show("add.delay(2, '2').get()  # raises TypeError", "no error", "TypeError")
    except TypeError as exc:
        show("add.delay(2, '2').get()  # raises TypeError", f"TypeError: {exc}")
    show("res.get(propagate=False)", repr(res.get(propagate=False)))
    show("res.failed()", res.failed(), True)
    show("res.successful()", res.successful(), False)
    show("res.state", res.state, "FAILURE")
    try:
        add.delay(2)
        show("add.delay(2)  # wrong argument count", "sent", "TypeError in the caller")
    except TypeError as exc:
        show("add.delay(2)  # wrong argument count: TypeError in the caller", f"TypeError: {exc}")

    print("\n## States", flush=True)
    res = slow_add.delay(1, 1, delay=1.5)
    deadline = time.monotonic() + 10
    state = res.state
    while state == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.05)
        state = res.state
    show("slow_add.delay(1, 1).state  # track_started=True", state, "STARTED")
    show("slow_add result", res.get(timeout=10), 2)
    res = flaky.delay(succeed_on=2)
    seen = set()
    deadline = time.monotonic() + 20
    while not res.ready() and time.monotonic() < deadline:
        seen.add(res.state)
        time.sleep(0.02)
    show("flaky.delay(succeed_on=2): saw RETRY", "RETRY" in seen, True)
    show("flaky result", res.get(timeout=10), "succeeded after 2 retries")
    show("app.AsyncResult('this-id-does-not-exist').state", app.AsyncResult("this-id-does-not-exist").state, "PENDING")

    print("\n## Signatures", flush=True)
    show("add.signature((2, 2), countdown=1)", add.signature((2, 2), countdown=1))
    show("add.s(2, 2)", add.s(2, 2))
    show("add.s(2, 2).delay().get()", add.s(2, 2).delay().get(timeout=10), 4)
    show("add.s(2).delay(8).get()  # partial", add.s(2).delay(8).get(timeout=10), 10)
    show("add.s(2, 2).apply_async(countdown=1).get()", add.s(2, 2).apply_async(countdown=1).get(timeout=10), 4)

    print("\n## The primitives", flush=True)
    show("group(add.s(i, i) for i in range(10))().get()",
         group(add.s(i, i) for i in range(10))().get(timeout=20), list(range(0, 20, 2)))
    g = group(add.s(i) for i in range(10))
    show("group(add.s(i) for i in range(10))(10).get()", g(10).get(timeout=20), list(range(10, 20)))
    show("chain(add.s(4, 4) | mul.s(8))().get()", chain(add.s(4, 4) | mul.s(8))().get(timeout=20), 64)
    g = chain(add.s(4) | mul.s(8))
    show("chain(add.s(4) | mul.s(8))(4).get()", g(4).get(timeout=20), 64)
    show("(add.s(4, 4) | mul.s(8))().get()", (add.s(4, 4) | mul.s(8))().get(timeout=20), 64)
    show("chord((add.s(i, i) for i in range(10)), xsum.s())().get()",
         chord((add.s(i, i) for i in range(10)), xsum.s())().get(timeout=20), 90)
    show("(group(add.s(i, i) for i in range(10)) | xsum.s())().get()",
         (group(add.s(i, i) for i in range(10)) | xsum.s())().get(timeout=20), 90)
    show("add.chunks(zip(range(6), range(6)), 2)().get()",
         add.chunks(zip(range(6), range(6)), 2)().get(timeout=20), [[0, 2], [4, 6], [8, 10]])

    print("\n## Routing", flush=True)
    app.conf.update(task_routes={"proj.tasks.mul": {"queue": "hipri"}})
    show("task_routes={'proj.tasks.mul': {'queue': 'hipri'}}; mul.delay(3, 3).get()",
         mul.delay(3, 3).get(timeout=10), 9)
    show("add.apply_async((2, 2), queue='hipri').get()", add.apply_async((2, 2), queue="hipri").get(timeout=10), 4)
    app.conf.update(task_routes=None)

    print("\n## Remote control", flush=True)
    inspect = app.control.inspect(timeout=2.0)
    pings = inspect.ping() or {}
    show("app.control.inspect().ping()", pings)
    if list(pings.values()) != [{"ok": "pong"}]:
        FAILURES.append("inspect ping")
    queues = inspect.active_queues() or {}
    show("app.control.inspect().active_queues() (names)", sorted(q["name"] for qs in queues.values() for q in qs),
         ["celery", "hipri", "lopri"])
    registered = inspect.registered() or {}
    show("'proj.tasks.add' in app.control.inspect().registered()",
         any("proj.tasks.add" in names for names in registered.values()), True)
    later = add.apply_async((1, 1), countdown=3)
    time.sleep(0.5)
    app.control.revoke(later.id)
    from celeriac.exceptions import TaskRevokedError

    try:
        later.get(timeout=10)
        show("app.control.revoke(res.id); res.get()", "ran", "TaskRevokedError")
    except TaskRevokedError:
        show("app.control.revoke(res.id); res.state", later.state, "REVOKED")

    print("\n## Many tasks", flush=True)
    start = time.monotonic()
    results = [add.delay(i, i) for i in range(500)]
    from celeriac.result import ResultSet

    values = ResultSet(results).get(timeout=60)
    show("500 x add.delay(i, i): all results", values == [2 * i for i in range(500)], True)
    print(f"    ({time.monotonic() - start:.2f} s for 500 round trips)")


def main() -> int:
    """Run the tutorial; return the exit code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    tmp = tempfile.mkdtemp(prefix="celeriac-tutorial-")
    env.setdefault("CELERIAC_BROKER_URL", f"sqlite:///{tmp}/broker.db")
    env.setdefault("CELERIAC_RESULT_BACKEND", f"sqlite:///{tmp}/results.db")
    os.environ.update({k: env[k] for k in ("CELERIAC_BROKER_URL", "CELERIAC_RESULT_BACKEND")})
    sys.path.insert(0, HERE)
    print(f"broker:  {env['CELERIAC_BROKER_URL']}\nresults: {env['CELERIAC_RESULT_BACKEND']}\n")
    proc, lines = start_worker(env)
    try:
        run_tutorial()
    except Exception as exc:
        FAILURES.append(f"{type(exc).__name__}: {exc}")
        import traceback

        traceback.print_exc()
    finally:
        print("\n$ kill -TERM <worker>   # warm shutdown", flush=True)
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = -9
        tail = [line.rstrip() for line in lines if "shutdown" in line.lower()]
        for line in tail:
            print("    | " + line)
        print(f"worker exit code: {code}")
        if code != 0:
            FAILURES.append(f"worker exit code {code}")
    if FAILURES:
        print(f"\nFAILED: {len(FAILURES)} call(s) did not give the expected answer: {FAILURES}")
        return 1
    print("\nAll tutorial calls gave the expected answers.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
