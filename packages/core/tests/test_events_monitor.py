"""The live ``celeriac events`` monitor: its state (pure), its keys, and the real screen in tmux."""

from __future__ import annotations

import curses
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from celeriac import states
from celeriac.app import Celeriac
from celeriac.cli.monitor import Monitor, _clip, detail_lines, format_row, task_columns, task_row, worker_columns
from celeriac.events import EVENT_EXCHANGE
from celeriac.events_state import MAX_FIELD, EventState
from celeriac.protocol import Message
from celeriac.testing.process import WorkerProcess, require_server

TMUX = shutil.which("tmux")
CELERIAC = str(Path(sys.executable).parent / "celeriac")
REDIS_URL = os.environ.get("CELERIAC_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")


def _task_events(uid: str, name: str = "proj.add", host: str = "w1@h", t0: float = 100.0) -> list[dict[str, Any]]:
    return [
        {"type": "task-received", "uuid": uid, "name": name, "args": "(2, 3)", "kwargs": "{}",
         "hostname": host, "timestamp": t0, "retries": 0},
        {"type": "task-started", "uuid": uid, "hostname": host, "timestamp": t0 + 1},
        {"type": "task-succeeded", "uuid": uid, "hostname": host, "timestamp": t0 + 2, "result": "5",
         "runtime": 0.25},
    ]


# -- EventState ---------------------------------------------------------------------------------


def test_task_events_fold_into_one_task_and_mark_the_worker_seen() -> None:
    state = EventState()
    for event in _task_events("t1"):
        assert state.fold(event, now=1000.0)
    task = state.tasks["t1"]
    assert (task.state, task.name, task.hostname, task.args, task.result, task.runtime) == \
        (states.SUCCESS, "proj.add", "w1@h", "(2, 3)", "5", 0.25)
    assert (task.received_at, task.started_at, task.finished_at) == (100.0, 101.0, 102.0)
    assert task.events == ["received", "started", "succeeded"]
    assert dict(task.fields())["Result"] == "5" and dict(task.fields())["Runtime"] == "0.250000s"
    assert state.workers["w1@h"].last_seen == 1000.0
    assert state.event_count == 3 and state.by_type["task-started"] == 1
    assert state.state_counts() == {states.SUCCESS: 1}


def test_failure_and_retry_keep_the_exception_and_a_later_receive_wins() -> None:
    state = EventState()
    state.fold({"type": "task-received", "uuid": "t", "name": "n", "timestamp": 1.0})
    state.fold({"type": "task-retried", "uuid": "t", "exception": "KeyError('x')", "timestamp": 2.0})
    assert state.tasks["t"].state == states.RETRY
    state.fold({"type": "task-received", "uuid": "t", "timestamp": 3.0, "retries": 1})
    state.fold({"type": "task-failed", "uuid": "t", "exception": "ValueError('no')",
                "traceback": "Traceback...\nValueError: no", "timestamp": 4.0})
    task = state.tasks["t"]
    assert (task.state, task.retries, task.exception) == (states.FAILURE, 1, "ValueError('no')")
    assert "Traceback...\nValueError: no" in dict(task.fields()).values()


def test_an_older_event_arriving_late_does_not_move_the_state_back() -> None:
    state = EventState()
    state.fold({"type": "task-succeeded", "uuid": "t", "timestamp": 5.0, "result": "1", "runtime": 0.1})
    state.fold({"type": "task-started", "uuid": "t", "timestamp": 4.0, "hostname": "w"})
    state.fold({"type": "task-received", "uuid": "t", "timestamp": 3.0, "name": "late.name"})
    task = state.tasks["t"]
    assert (task.state, task.name, task.hostname, task.result) == (states.SUCCESS, "late.name", "w", "1")


def test_worker_heartbeats_status_and_offline() -> None:
    state = EventState()
    state.fold({"type": "worker-online", "hostname": "w@h", "freq": 2.0, "active": 0, "processed": 0}, now=10.0)
    state.fold({"type": "worker-heartbeat", "hostname": "w@h", "freq": 2.0, "active": 3, "processed": 40,
                "loadavg": [0.5, 0.25, 0.1], "sw_ident": "py-celery"}, now=12.0)
    worker = state.workers["w@h"]
    assert (worker.active, worker.processed, worker.loadavg, worker.sw_ident) == (3, 40, (0.5, 0.25, 0.1),
                                                                                   "py-celery")
    assert worker.heartbeat_age(now=13.5) == 1.5
    assert worker.status(now=13.0) == "online"
    assert worker.status(now=12.0 + 2.0 * 3 + 0.1) == "lost"
    state.fold({"type": "worker-offline", "hostname": "w@h"}, now=14.0)
    assert worker.status(now=14.0) == "offline"
    state.fold({"type": "worker-heartbeat", "hostname": "w@h"}, now=20.0)
    assert worker.status(now=20.0) == "online"


def test_memory_is_bounded_keeping_the_most_recently_updated_tasks() -> None:
    state = EventState(max_tasks=3, max_workers=2)
    for i in range(4):
        state.fold({"type": "task-received", "uuid": f"t{i}", "hostname": f"w{i}", "timestamp": float(i)},
                   now=float(i))
    assert list(state.tasks) == ["t1", "t2", "t3"]
    assert [t.uuid for t in state.recent_tasks()] == ["t3", "t2", "t1"]
    assert sorted(state.workers) == ["w2", "w3"]
    state.fold({"type": "task-started", "uuid": "t1", "timestamp": 9.0})  # news keeps t1
    state.fold({"type": "task-received", "uuid": "t4", "timestamp": 10.0})
    assert sorted(state.tasks) == ["t1", "t3", "t4"]
    state.fold({"type": "task-succeeded", "uuid": "big", "result": "x" * 100_000, "traceback": ["y"] * 10_000})
    assert len(state.tasks["big"].result or "") == MAX_FIELD
    assert len(state.tasks["big"].traceback or "") == MAX_FIELD


@pytest.mark.parametrize("event", [
    None, "task-received", 42, [], {}, {"type": None}, {"type": 5}, {"type": ["task-received"]},
    {"type": "task-received"}, {"type": "task-received", "uuid": ""}, {"type": "task-received", "uuid": 7},
    {"type": "task-succeeded", "uuid": {"a": 1}}, {"type": "worker-heartbeat"},
    {"type": "worker-online", "hostname": ["w"]}, {"type": "worker-offline", "hostname": ""},
])
def test_malformed_events_are_counted_and_ignored(event: Any) -> None:
    state = EventState()
    assert state.fold(event) is False
    assert (state.malformed, state.unknown, state.event_count, state.tasks, state.workers) == (1, 0, 0, {}, {})


@pytest.mark.parametrize("kind", ["task-custom", "worker-custom", "foo", "", "task-", "TASK-RECEIVED"])
def test_unknown_event_types_are_counted_and_ignored(kind: str) -> None:
    state = EventState()
    assert state.fold({"type": kind, "uuid": "u", "hostname": "w"}) is False
    assert (state.unknown, state.malformed, state.tasks, state.workers) == (1, 0, {}, {})


def test_fields_of_the_wrong_type_are_dropped_not_raised_on() -> None:
    state = EventState()
    assert state.fold({"type": "task-succeeded", "uuid": "t", "timestamp": "never", "runtime": "fast",
                       "retries": -1, "hostname": 3, "name": None, "args": {"x": [1]}, "result": object,
                       "local_received": "soon"})
    assert state.fold({"type": "task-started", "uuid": "t", "timestamp": float("nan"), "runtime": True})
    assert state.fold({"type": "worker-heartbeat", "hostname": "w", "active": "many", "processed": 1.5,
                       "freq": -1, "loadavg": "high", "pid": None, "sw_ver": 3})
    assert state.fold({"type": "worker-heartbeat", "hostname": "w", "loadavg": [1, "x", None, 2, 3]})
    task, worker = state.tasks["t"], state.workers["w"]
    assert (task.runtime, task.retries, task.hostname, task.name, task.args) == (None, None, None, None,
                                                                                 "{'x': [1]}")
    assert task.state == states.STARTED  # no usable timestamps: the latest event wins
    assert (worker.active, worker.processed, worker.freq, worker.loadavg, worker.sw_ver) == \
        (None, 1, 2.0, (1.0,), "3")
    assert state.malformed == 0
    for label, text in task.fields():
        assert isinstance(label, str) and isinstance(text, str)


# -- layout and keys (no terminal needed) -------------------------------------------------------


@pytest.mark.parametrize("width", [80, 100, 120, 200])
def test_rows_fit_the_screen_width(width: int) -> None:
    state = EventState()
    for event in _task_events("0f3e" * 9, name="proj.tasks.a_rather_long_task_name", host="celery@" + "h" * 40):
        state.fold(event)
    task = state.tasks["0f3e" * 9]
    columns = task_columns(width)
    assert len(task_row(task, columns)) == width
    assert len(format_row([c.title for c in worker_columns(width)], worker_columns(width))) == width
    assert (task.uuid in task_row(task, columns)) == (width >= 120)
    task.traceback = "Traceback (most recent call last):\n\tline one\x1b[31m red\n" + "word " * 100
    assert all(len(line) <= max(width, 24) for line in detail_lines(task, width))
    assert not any("\x1b" in line or "\t" in line for line in detail_lines(task, width))


def test_wide_characters_are_clipped_by_terminal_cells() -> None:
    assert _clip("日本語abc", 5) == "日本" and _clip("日本語abc", 8) == "日本語ab" and _clip("plain", 3) == "pla"
    assert _clip("e\u0301e\u0301x", 2) == "e\u0301e\u0301"  # combining accents take no cell


def test_keys_select_follow_open_and_close_the_detail_and_quit() -> None:
    state = EventState()
    monitor = Monitor(state, "test")
    assert monitor.handle_key(ord("j")) is False  # nothing to select yet: no crash
    assert monitor.handle_key(10) is False and monitor.detail is None
    for i in range(3):
        state.fold({"type": "task-received", "uuid": f"t{i}", "timestamp": float(i)})
    monitor.handle_key(10)
    assert monitor.detail == "t2"  # following the newest
    monitor.handle_key(27)
    assert monitor.detail is None
    monitor.handle_key(ord("j"))
    monitor.handle_key(curses.KEY_DOWN)
    assert monitor.selected == "t0"
    monitor.handle_key(ord("k"))
    assert monitor.selected == "t1"
    state.fold({"type": "task-received", "uuid": "t3", "timestamp": 3.0})  # arrives above
    monitor.handle_key(curses.KEY_ENTER)
    assert monitor.detail == "t1"  # the selection stays on its task
    monitor.handle_key(ord("j"))  # scrolls the detail, does not change the task
    assert monitor.detail == "t1"
    monitor.handle_key(curses.KEY_BACKSPACE)
    monitor.handle_key(curses.KEY_END)
    assert monitor.selected == "t0"
    monitor.handle_key(ord("g"))
    assert monitor.selected is None
    monitor.fold(ConnectionError("broker went away"))
    assert "broker went away" in monitor.notices[-1][1]
    monitor.fold({"type": 1})
    assert state.malformed == 1
    assert monitor.handle_key(ord("q")) is True


def test_without_a_terminal_it_says_to_use_dump_and_exits_2(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "celeriac", "events"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 2
    assert out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and "--dump" in out.stderr


# -- the real screen, in tmux -------------------------------------------------------------------

BAD_EVENTS = [b"not json", b'["a list", 1, null]', b'{"type": "task-succeeded"}', b'{"no": "type"}',
              b'{"type": "worker-heartbeat", "hostname": 5}', b'{"type": "spam-eggs", "uuid": "x"}',
              b'[{"type": "task-failed", "uuid": ["x"]}, {"type": 7}]']
BAD_EVENT_COUNT = 6  # the receiver drops the undecodable body and the list's non-dict items


class Tmux:
    """A private tmux server (its own socket) with one session running ``command``."""

    def __init__(self, command: str, cwd: Path, width: int = 80, height: int = 24) -> None:
        assert TMUX is not None
        self.base = [TMUX, "-L", f"celeriac-test-{uuid.uuid4().hex[:12]}", "-f", "/dev/null"]
        self.run("new-session", "-d", "-x", str(width), "-y", str(height), "-c", str(cwd), command)
        self.socket = self.run("display-message", "-p", "#{socket_path}").strip()

    def run(self, *args: str) -> str:
        out = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=10)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def screen(self) -> str:
        return self.run("capture-pane", "-p")

    def wait_for(self, check: Callable[[str], bool], what: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if check(screen):
                return screen
            if time.monotonic() > deadline:
                size = self.run("display-message", "-p", "#{window_width}x#{window_height}").strip()
                raise AssertionError(f"timed out waiting for {what}; the screen ({size}):\n{screen}")
            time.sleep(0.1)

    def keys(self, *keys: str) -> None:
        self.run("send-keys", *keys)

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=10)
        if self.socket:
            Path(self.socket).unlink(missing_ok=True)  # tmux leaves it behind


@pytest.fixture
def tmux_sessions() -> Iterator[list[Tmux]]:
    sessions: list[Tmux] = []
    yield sessions
    for session in sessions:
        session.kill()


def _broker_url(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/broker.db"
    if importlib.util.find_spec("celeriac_redis") is None:
        pytest.skip("celeriac-redis is not installed")
    if kind == "celery-redis" and importlib.util.find_spec("celery") is None:
        pytest.skip("celery is not installed (it is a test-only dependency)")
    return require_server("Redis", REDIS_URL, 6379, "CELERIAC_TEST_REDIS_URL")


APP_MODULE = {
    "celeriac": """
        from celeriac import Celeriac
        app = Celeriac("evapp", task_default_queue={queue!r})
    """,
    "celery": """
        from celery import Celery
        app = Celery("evapp", broker={url!r})
        app.conf.task_default_queue = {queue!r}
    """,
}


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed")
@pytest.mark.parametrize("kind", ["sqlite", "redis", "celery-redis"])
def test_live_screen_in_a_real_terminal(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        spawn_worker: Callable[..., WorkerProcess],
                                        tmux_sessions: list[Tmux]) -> None:
    url = _broker_url(kind, tmp_path)
    tag = uuid.uuid4().hex[:8]
    queue, node = f"evmon-{tag}", f"mon{tag}@test"
    # celery-redis: Celery's own worker sends the events (Celery's field shapes, batched lists).
    program = "celery" if kind.startswith("celery") else "celeriac"
    (tmp_path / "evapp.py").write_text(textwrap.dedent(APP_MODULE[program]).format(url=url, queue=queue)
                                       + textwrap.dedent("""
        @app.task
        def add(x, y):
            return x + y

        @app.task
        def boom(message):
            raise ValueError(message)
    """))
    monkeypatch.setenv("CELERIAC_BROKER_URL", url)  # the worker, the monitor and this client
    monkeypatch.delenv("CELERIAC_RESULT_BACKEND", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    # Celery's own threads pool drops some of its task events (`celery events --dump` misses them
    # too), so Celery's worker runs with the solo pool.
    pool = ["-P", "threads", "-c", "2"] if program == "celeriac" else ["-P", "solo", "--without-mingle",
                                                                         "--without-gossip"]
    worker = spawn_worker([str(Path(sys.executable).parent / program), "-A", "evapp", "worker", "-E", *pool,
                           "-n", node, "-l", "info"], cwd=tmp_path)
    app_option = "-A evapp" if program == "celeriac" else ""  # else the broker URL comes from the environment
    tmux = Tmux(f"stty -g > stty.before; {shlex.quote(CELERIAC)} {app_option} events; echo $? > monitor.rc; "
                "stty -g > stty.after; exec sleep 120", tmp_path)
    tmux_sessions.append(tmux)
    worker.wait_ready()
    # The worker shows up at its next heartbeat (every 2 s), after the monitor has subscribed.
    tmux.wait_for(lambda s: node in s and "online" in s, "the worker on the screen")

    client = Celeriac("client", task_default_queue=queue)
    try:
        for body in BAD_EVENTS:  # the monitor ignores these and goes on
            client.broker.broadcast(EVENT_EXCHANGE, Message({}, {}, body), routing_key="task.succeeded")
        ids = [client.send_task("evapp.add", (i, 1)).id for i in range(3)]
        failed = client.send_task("evapp.boom", ("kaput",)).id
    finally:
        client.close()
    screen = tmux.wait_for(lambda s: s.count("SUCCESS") >= 4 and "FAILURE" in s and failed[:8] in s,
                           "the tasks' final states")
    lines = screen.splitlines()
    assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
    assert "evapp.add" in screen and "evapp.boom" in screen and "(0, 1) -> 1" in screen
    assert all(task_id[:8] in screen for task_id in ids)
    ignored = re.search(r"\((\d+) events ignored\)", screen)
    assert ignored and int(ignored.group(1)) >= BAD_EVENT_COUNT, screen

    rows = [line.split()[0] for line in lines[lines.index(next(x for x in lines if "UUID" in x)) + 1:] if line.strip()]
    tmux.keys(*["j"] * rows.index(failed[:8]), "Enter")
    detail = tmux.wait_for(lambda s: "Traceback :" in s, "the detail view")
    assert failed in detail and "ValueError('kaput')" in detail and "evapp.boom" in detail
    tmux.keys("Escape")
    tmux.wait_for(lambda s: "WORKER" in s and "Traceback" not in s, "the list again")

    tmux.run("resize-window", "-x", "130", "-y", "30")
    tmux.wait_for(lambda s: all(task_id in s for task_id in ids), "whole task ids at 130 columns")
    tmux.keys("q")
    deadline = time.monotonic() + 15
    while not (tmp_path / "stty.after").exists():
        assert time.monotonic() < deadline, "the monitor did not quit on q:\n" + tmux.screen()
        time.sleep(0.1)
    assert (tmp_path / "monitor.rc").read_text().strip() == "0"
    assert (tmp_path / "stty.after").read_text() == (tmp_path / "stty.before").read_text()
    assert tmux.run("display-message", "-p", "#{alternate_on}").strip() == "0"
    assert node not in tmux.screen()  # the monitor's screen is gone
    assert worker.proc.poll() is None


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed")
def test_ctrl_c_quits_and_restores_the_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                tmux_sessions: list[Tmux]) -> None:
    monkeypatch.setenv("CELERIAC_BROKER_URL", f"sqlite:///{tmp_path}/broker.db")
    tmux = Tmux(f"stty -g > stty.before; {shlex.quote(CELERIAC)} events; echo $? > monitor.rc; "
                "stty -g > stty.after; exec sleep 120", tmp_path, width=100, height=30)
    tmux_sessions.append(tmux)
    tmux.wait_for(lambda s: "Workers: none seen yet" in s and "(no task events yet)" in s, "the empty monitor")
    tmux.keys("C-c")
    deadline = time.monotonic() + 15
    while not (tmp_path / "stty.after").exists():
        assert time.monotonic() < deadline, "the monitor did not quit on Ctrl-C:\n" + tmux.screen()
        time.sleep(0.1)
    assert (tmp_path / "monitor.rc").read_text().strip() == "0"
    assert (tmp_path / "stty.after").read_text() == (tmp_path / "stty.before").read_text()
    assert tmux.run("display-message", "-p", "#{alternate_on}").strip() == "0"
    assert "Workers" not in tmux.screen()
