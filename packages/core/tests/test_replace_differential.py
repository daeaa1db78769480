"""``Task.replace``, ``Task.add_to_chord`` and revoked chord members, run on Celery and on Celeriac, outcomes compared.

One app module serves both libraries (``RD_LIB`` picks ``celery`` or ``celeriac``); one worker per
system (``-P threads -c 4``) on the live Redis, as broker and result backend. A driver per system
(this file run as a script) runs every scenario of :data:`SCENARIOS` and writes what a user sees:
the final state, the value or the exception's class name at ``get()``, and the callbacks that
ran (recorded in a Redis list: how often, with which arguments). Celeriac's outcome of each
scenario must equal Celery's.

Redis: ``CELERIAC_TEST_REPLACE_REDIS_URL`` (default db 9); the suite skips when Redis is down
unless ``CELERIAC_REQUIRE_BROKERS=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celeriac.testing.process import WorkerProcess, require_server

REDIS_URL = os.environ.get("CELERIAC_TEST_REPLACE_REDIS_URL", "redis://127.0.0.1:6379/9")
SYSTEMS = ("celery", "celeriac")
VENV_BIN = Path(sys.executable).parent

#: The tasks, for both libraries. ``replacer(kind)`` replaces itself by the canvas ``kind``
#: names; ``record`` and ``record_error`` append their arguments to the run's Redis list.
APP = '''
import json, os
import redis as _redis

if os.environ["RD_LIB"] == "celery":
    from celery import Celery as App, chain, chord, group
else:
    from celeriac import Celeriac as App, chain, chord, group

app = App("rdapp", broker=os.environ["RD_REDIS"], backend=os.environ["RD_REDIS"])
app.conf.task_default_queue = os.environ["RD_QUEUE"]
app.conf.result_expires = 600
_calls = _redis.Redis.from_url(os.environ["RD_REDIS"])


@app.task(name="rd.add")
def add(x, y):
    return x + y


@app.task(name="rd.mul")
def mul(x, y):
    return x * y


@app.task(name="rd.xsum")
def xsum(values):
    return sum(values)


@app.task(name="rd.boom")
def boom():
    raise ValueError("boom")


@app.task(name="rd.record")
def record(value, tag):
    _calls.rpush(os.environ["RD_QUEUE"] + ":calls", json.dumps([tag, value]))


@app.task(name="rd.record_error")
def record_error(task_id):
    _calls.rpush(os.environ["RD_QUEUE"] + ":calls", json.dumps(["eb", task_id]))


def replacement(kind):
    if kind == "task":
        return add.s(2, 3)
    if kind == "chain":
        return add.s(1, 1) | mul.s(10)
    if kind == "group":
        return group(add.s(1, 1), add.s(2, 2))
    if kind == "chord":
        return chord([add.s(1, 1), add.s(2, 2)], xsum.s())
    if kind == "fail":
        return boom.s()
    if kind == "twice":
        return replacer.s("task")
    if kind == "failing_chain":
        return add.s(1, 1) | boom.si()
    raise ValueError(kind)


@app.task(name="rd.adder", bind=True)
def adder(self, lazy):
    sig = self.add_to_chord(add.si(10, 10), lazy=lazy)
    if lazy:
        sig.delay()
    return 1


@app.task(name="rd.replacer", bind=True)
def replacer(self, kind):
    return self.replace(replacement(kind))
'''

#: Scenario names, run in this order by each driver (see :func:`_send`).
SCENARIOS = (
    "task", "chain", "group", "chord", "twice", "fail",
    "in_chain", "in_chain_then_fails", "chord_member", "chord_member_group", "group_member",
    "link", "link_chain", "link_error", "link_error_in_chain", "chain_in_chord_member",
    "revoked_chord_member", "eager", "add_to_chord", "add_to_chord_lazy", "add_to_chord_outside",
)


def _send(mod: Any, name: str) -> Any:
    """Start scenario ``name``; return its result handle (an ``AsyncResult`` or a value)."""
    r, add, mul, xsum, record = mod.replacer, mod.add, mod.mul, mod.xsum, mod.record
    if name in ("task", "chain", "group", "chord", "twice", "fail"):
        return r.delay(name)
    if name == "in_chain":
        return mod.chain(add.s(1, 1), r.si("task"), mul.s(3)).delay()
    if name == "in_chain_then_fails":
        return mod.chain(r.si("failing_chain"), mul.s(3), record.s("after")).delay()
    if name == "chord_member":
        return mod.chord([r.si("task"), add.si(1, 1), r.si("chain")], xsum.s())()
    if name == "chord_member_group":
        return mod.chord([r.si("group"), add.si(1, 1)], record.s("body"))()
    if name == "group_member":
        return mod.group(r.si("group"), add.si(1, 1), r.si("chord"))()
    if name == "link":
        return r.apply_async(("task",), link=record.s("cb"))
    if name == "link_chain":
        return r.apply_async(("chain",), link=record.s("cb"))
    if name == "link_error":
        return r.apply_async(("fail",), link_error=mod.record_error.s())
    if name == "link_error_in_chain":
        return r.apply_async(("failing_chain",), link_error=mod.record_error.s())
    if name == "chain_in_chord_member":
        return mod.chord([mod.chain(r.si("chain"), add.s(1)), add.si(0, 0)], xsum.s())()
    if name == "revoked_chord_member":
        result = mod.chord([add.si(1, 1), add.si(2, 2).set(countdown=2)], xsum.s())()
        time.sleep(0.5)
        member = result.parent.results[1]
        mod.app.control.revoke(member.id)
        return result
    if name in ("add_to_chord", "add_to_chord_lazy"):
        return mod.chord([mod.adder.si(name.endswith("lazy")), add.si(1, 1)], xsum.s())()
    if name == "add_to_chord_outside":
        return mod.adder.delay(False)
    if name == "eager":
        return r.apply(("chain",)).get()
    raise ValueError(name)


def _state(result: Any) -> Any:
    """A result's state; a group's, the list of its members' states."""
    if hasattr(result, "results"):
        return [_state(member) for member in result.results]
    return result.state


def _outcome(result: Any) -> dict[str, Any]:
    if not hasattr(result, "get"):
        return {"value": result}
    try:
        value = result.get(timeout=25, propagate=True)
    except Exception as exc:  # the user-visible failure: its class name
        # get() may raise a parent's error before this result settles (a revoked chord member
        # fails the body when Celery's worker reaches the member's ETA): wait for it.
        deadline = time.monotonic() + 15
        while not result.ready() and time.monotonic() < deadline:
            time.sleep(0.1)
        return {"state": _state(result), "exc": type(exc).__name__}
    return {"state": _state(result), "value": value}


def drive(out_path: str) -> None:
    """Run every scenario with the library ``RD_LIB`` names; write the outcomes as JSON."""
    import importlib

    import redis

    mod = importlib.import_module(os.environ["RD_MODULE"])
    calls_key = os.environ["RD_QUEUE"] + ":calls"
    client = redis.Redis.from_url(os.environ["RD_REDIS"])
    outcomes: dict[str, Any] = {}
    for name in SCENARIOS:
        client.delete(calls_key)
        try:
            handle = _send(mod, name)
        except Exception as exc:
            outcomes[name] = {"call": type(exc).__name__, "detail": str(exc)[:200]}
            continue
        outcome = _outcome(handle)
        time.sleep(0.5)  # callbacks sent after the result was stored
        outcome["calls"] = sorted(json.loads(c) for c in client.lrange(calls_key, 0, -1))
        if name.startswith("link_error") and outcome["calls"]:
            # An errback gets the failed task's id: the replaced task's own id here.
            outcome["calls"] = [[tag, arg == handle.id] for tag, arg in outcome["calls"]]
        outcomes[name] = outcome
    Path(out_path).write_text(json.dumps(outcomes))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict[str, Any]]]:
    """Every scenario's outcome, by system (both systems run at the same time)."""
    import redis

    url = require_server("Redis", REDIS_URL, 6379, "CELERIAC_TEST_REPLACE_REDIS_URL")
    root = tmp_path_factory.mktemp("replace-diff")
    run = uuid.uuid4().hex[:8]
    module = f"rdapp_{run}"
    (root / f"{module}.py").write_text(APP)
    procs: list[WorkerProcess] = []
    envs: dict[str, dict[str, str]] = {}
    try:
        workers = {}
        for system in SYSTEMS:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERIAC_BROKER", "CELERIAC_RESULT"))}
            env.update(RD_LIB=system, RD_REDIS=url, RD_QUEUE=f"rd.{run}.{system}", RD_MODULE=module,
                       PYTHONPATH=os.pathsep.join([str(root), env.get("PYTHONPATH", "")]))
            envs[system] = env
            argv = [str(VENV_BIN / system), "-A", module, "worker", "-l", "info", "-P", "threads", "-c", "4",
                    "-n", f"{system}-{run}@%h"]
            if system == "celery":
                argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
            workers[system] = WorkerProcess(argv, str(root), env, str(root / f"{system}.log"))
            procs.append(workers[system])
        for worker in workers.values():
            worker.wait_ready(60)
        drivers = {system: WorkerProcess([sys.executable, __file__, str(root / f"{system}.json")], str(root),
                                         envs[system], str(root / f"{system}-driver.log"))
                   for system in SYSTEMS}
        procs.extend(drivers.values())
        results: dict[str, dict[str, Any]] = {}
        for system, driver in drivers.items():
            try:
                code = driver.proc.wait(30 * len(SCENARIOS))
            except subprocess.TimeoutExpired:
                code = -1
            if code != 0:
                pytest.fail(f"{system} driver failed ({code}):\n{driver.log()[-4000:]}")
            results[system] = json.loads((root / f"{system}.json").read_text())
        results["logs"] = {s: workers[s].log()[-3000:] for s in SYSTEMS}
        yield results
    finally:
        for proc in procs:
            proc.stop()
        client = redis.Redis.from_url(url, socket_timeout=5)
        for key in client.scan_iter(match=f"*{run}*", count=1000):
            client.delete(key)
        client.close()


#: Where Celeriac differs from Celery on purpose (docs/differences.md, "Task.replace"): Celery's
#: outcome, then Celeriac's.
INTENDED = {
    # Celery links the replaced task's callback to the replacing chain twice (on the chain and
    # on its last step): it runs twice. Celeriac runs it once.
    "link_chain": ({"state": "SUCCESS", "value": 20, "calls": [["cb", 20], ["cb", 20]]},
                   {"state": "SUCCESS", "value": 20, "calls": [["cb", 20]]}),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_same_outcome_as_celery(outcomes: dict[str, dict[str, Any]], scenario: str) -> None:
    theirs, ours = outcomes["celery"][scenario], outcomes["celeriac"][scenario]
    if scenario in INTENDED:
        assert [theirs, ours] == list(INTENDED[scenario])
        return
    assert ours == theirs, (f"{scenario}: celery {json.dumps(theirs)}\nceleriac {json.dumps(ours)}\n"
                            f"celeriac worker log:\n{outcomes['logs']['celeriac']}")


def test_the_scenarios_show_what_replace_does(outcomes: dict[str, dict[str, Any]]) -> None:
    """Pinned values (Celery gives the same, by the test above): the replacement's result reaches
    the caller, the chain goes on after it, a chord counts it."""
    ours = outcomes["celeriac"]
    assert ours["task"] == {"state": "SUCCESS", "value": 5, "calls": []}
    assert ours["chain"]["value"] == 20 and ours["group"]["value"] == [2, 4]
    assert ours["in_chain"]["value"] == 15 and ours["chord_member"]["value"] == 27
    assert ours["link"]["calls"] == [["cb", 5]] and ours["link_chain"]["calls"] == [["cb", 20]]
    assert ours["link_error"]["calls"] == [["eb", True]]
    assert ours["revoked_chord_member"] == {"state": "FAILURE", "exc": "TaskRevokedError", "calls": []}
    assert ours["eager"] == {"value": 20, "calls": []}
    assert ours["chord"]["value"] == 6 and ours["twice"]["value"] == 5
    assert ours["fail"]["exc"] == "ValueError" and ours["link_error_in_chain"]["calls"] == [["eb", True]]
    assert ours["in_chain_then_fails"]["exc"] == "ValueError" and ours["in_chain_then_fails"]["calls"] == []
    assert ours["chord_member_group"]["calls"] == [["body", [[2, 4], 2]]]
    assert ours["group_member"]["value"] == [[2, 4], 2, 6]
    assert ours["chain_in_chord_member"]["value"] == 21
    assert ours["add_to_chord"]["value"] == ours["add_to_chord_lazy"]["value"] == 23
    assert ours["add_to_chord_outside"]["exc"] == "ValueError"


if __name__ == "__main__":  # the driver of one system, started by the fixture above
    drive(sys.argv[1])
