"""``celeriac multi``: Celery's command line (selectors, templates), checked as pure logic, against
the real ``celery multi``, and through the real CLI with detached workers on SQLite, Redis and
RabbitMQ."""

from __future__ import annotations

import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from celeriac.cli.main import cli
from celeriac.cli.multi_args import (
    MultiUsageError,
    Node,
    OptionTable,
    build_nodes,
    expand_template,
    extract_signal,
    parse_argv,
)
from celeriac.testing.process import require_server

HOST = socket.gethostname()
GUIDE_10 = "10 -A proj -l info -Q:1-3 images,video -Q:4,5 data -Q default -L:4,5 debug"
REDIS_URL = os.environ.get("CELERIAC_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")
AMQP_URL = os.environ.get("CELERIAC_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


# -- pure logic: option parsing, selectors, templates -------------------------------------------


def _table() -> OptionTable:
    return OptionTable.from_commands(cli, cli.get_command(None, "worker"))  # type: ignore[arg-type]


def _nodes(line: str) -> list[Node]:
    return build_nodes(parse_argv(shlex.split(line), _table()), _table())[0]


def _summary(nodes: list[Node], *keys: str) -> dict[str, tuple[str | None, ...]]:
    return {node.name: tuple(node.value(key) for key in keys) for node in nodes}


def test_guide_line_gives_each_node_its_queues_and_loglevel() -> None:
    nodes = _nodes(GUIDE_10)
    assert [node.name for node in nodes] == [f"celery{i}" for i in range(1, 11)]
    assert [node.nodename for node in nodes][:1] == [f"celery1@{HOST}"]
    summary = _summary(nodes, "queues", "loglevel", "app_spec")
    assert summary["celery1"] == summary["celery3"] == ("images,video", "info", "proj")
    assert summary["celery4"] == summary["celery5"] == ("data", "debug", "proj")
    assert {summary[f"celery{i}"] for i in range(6, 11)} == {("default", "info", "proj")}
    argv = nodes[3].argv("python")
    assert argv[:6] == ["python", "-m", "celeriac", "-A", "proj", "worker"]
    assert argv[6:12] == ["--detach", "-l", "debug", "-Q", "data", "-n"]
    assert argv[12:] == [f"celery4@{HOST}", f"--pidfile={os.getcwd()}/celery4.pid",
                         f"--logfile={os.getcwd()}/celery4.log"]


@pytest.mark.parametrize(("line", "expected"), [
    ("3 -c 3 -c:1 10", {"celery1": "10", "celery2": "3", "celery3": "3"}),
    ("image video data -c 3 -c:image 10", {"image": "10", "video": "3", "data": "3"}),
    ("5 -c 3 -c:1-3 10", {"celery1": "10", "celery2": "10", "celery3": "10", "celery4": "3", "celery5": "3"}),
    ("foo bar baz xuzzy -c 3 -c:foo,bar,baz 10", {"foo": "10", "bar": "10", "baz": "10", "xuzzy": "3"}),
    ("w1 w2 -c:w1 4", {"w1": "4", "w2": None}),
    ("w1 w2 w3 -c:2-3 5 --concurrency=2", {"w1": "2", "w2": "5", "w3": "5"}),  # aliases share a key
    (f"w1 w2 -c:w2@{HOST} 7", {"w1": None, "w2": "7"}),
    ("3 -c:1 8 -c 2 -c 4", {"celery1": "8", "celery2": "4", "celery3": "4"}),  # per-node beats default
])
def test_selectors_follow_celery(line: str, expected: dict[str, str | None]) -> None:
    assert {name: values[0] for name, values in _summary(_nodes(line), "concurrency").items()} == expected


def test_options_in_any_order_and_node_names_anywhere() -> None:
    nodes = _nodes("start-ignored -A proj w1 -E --pidfile /run/%n.pid -b redis://h/1 -P threads -linfo")
    assert [node.name for node in nodes] == ["start-ignored", "w1"]
    node = nodes[1]
    assert node.global_args() == ["-A", "proj", "-b", "redis://h/1"]
    assert node.worker_args() == ["-E", "--pidfile=/run/w1.pid", "-P", "threads", "-l", "info", "-n",
                                  f"w1@{HOST}", f"--logfile={os.getcwd()}/w1.log"]


def test_passthrough_after_double_dash_and_detach_is_not_repeated() -> None:
    parsed = parse_argv(["2", "--detach", "--", "-c", "1"], _table())
    assert parsed.passthrough == ["-c", "1"]
    node = build_nodes(parsed, _table())[0][0]
    assert node.argv("py", parsed.passthrough).count("--detach") == 1
    assert node.argv("py", parsed.passthrough)[-2:] == ["-c", "1"]


def test_node_names_hosts_and_prefixes() -> None:
    nodes, settings = build_nodes(parse_argv(shlex.split(
        "2 --hostname=worker.example.com --range-prefix=img --executable=/opt/py"), _table()), _table())
    assert [node.nodename for node in nodes] == ["img1@worker.example.com", "img2@worker.example.com"]
    assert settings.executable == "/opt/py" and nodes[0].argv(settings.executable)[0] == "/opt/py"
    assert [node.nodename for node in _nodes("foo@%h bar@box.lan")] == [f"foo@{HOST}", "bar@box.lan"]


def test_templates() -> None:
    assert expand_template("%n|%h|%d|%i|%I|%%|%x", "w1", "w1@box.example.com") == \
        "w1|w1@box.example.com|example.com|0||%|%x"
    assert expand_template("%n%I.log", "w1", "w1@h", index=2) == "w1-2.log"
    node = _nodes("w1 --logfile=/var/log/celery/%n%I.log --pidfile=/var/run/celery/%n.pid")[0]
    assert (node.logfile, node.pidfile) == ("/var/log/celery/w1.log", "/var/run/celery/w1.pid")
    assert _nodes("w1 --workdir=/srv/proj")[0].pidfile == "/srv/proj/w1.pid"


def test_signal_arguments_of_stop() -> None:
    assert extract_signal(["w1", "-KILL", "-c", "2"]) == (signal.SIGKILL, ["w1", "-c", "2"])
    assert extract_signal(["w1", "-9"]) == (9, ["w1"])
    assert extract_signal(["w1", "-SIGINT", "-E"]) == (signal.SIGINT, ["w1", "-E"])
    assert extract_signal(["w1", "-E", "-Q", "a"]) == (None, ["w1", "-E", "-Q", "a"])


@pytest.mark.parametrize(("line", "message"), [
    ("3 -Q:1-4 x", "Node 4 in -Q:1-4 does not exist"),
    ("3 -Q:1- x", "Malformed node range '1-'"),
    ("3 -Q:3-1 x", "Malformed node range '3-1'"),
    ("3 -Q:1,,2 x", "Malformed node range ''"),
    ("3 -Q:0 x", "Node 0 in -Q:0 does not exist"),
    ("w1 w2 -c:w3 2", "Unknown node 'w3' in -c:w3: the nodes are w1, w2"),
    ("3 -Q: x", "empty node selector"),
    ("3 -c", "Option -c needs a value"),
    ("", "Give the node names"),
    ("0", "The node count must be 1 or more"),
    ("w1 w1", "listed twice"),
    ("2 --hostname:1=x", "--hostname applies to all nodes"),
])
def test_bad_selectors_are_one_clear_error(line: str, message: str) -> None:
    with pytest.raises(MultiUsageError) as info:
        _nodes(line)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# -- the same output as the real ``celery multi`` ------------------------------------------------


def _celery_multi(args: list[str]) -> tuple[int, str]:
    """Exit code and output of the real ``celery multi ARGS`` (Celery's MultiTool, in-process)."""
    multi_tool = pytest.importorskip("celery.bin.multi")
    out = io.StringIO()
    code = multi_tool.MultiTool(stdout=out, stderr=io.StringIO()).execute_from_commandline(["celery", *args])
    return code, out.getvalue()


def _celeriac_multi(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["multi", *args])
    return result.exit_code, result.output


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _effective(show_output: str) -> list[dict[str, str | None]]:
    """Per command line of ``multi show``: node name, app, queues, loglevel and concurrency."""
    rows = []
    for line in show_output.strip().splitlines():
        words = shlex.split(line)
        row: dict[str, str | None] = {}
        for key, spellings in {"node": ("-n",), "app": ("-A",), "queues": ("-Q",), "loglevel": ("-l", "-L"),
                               "concurrency": ("-c",)}.items():
            for spelling in spellings:  # -L after -l wins, as the worker's -L would
                if spelling in words:
                    row[key] = words[words.index(spelling) + 1]
            row.setdefault(key, None)
        rows.append(row)
    return rows


@pytest.mark.parametrize("line", [GUIDE_10, "3 -A proj -c 3 -c:1 10", "image video data -c 3 -c:image 10",
                                  "5 -c 3 -c:1-3 10", "foo bar baz xuzzy -c 3 -c:foo,bar,baz 10"])
def test_show_matches_celery(line: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["show", *shlex.split(line), "--pidfile=%n.pid", "--logfile=%n%I.log"]  # relative: no directory made
    theirs, ours = _celery_multi(args), _celeriac_multi(args)
    assert theirs[0] == ours[0] == 0, ours[1]
    assert _effective(ours[1]) == _effective(theirs[1])
    first = shlex.split(ours[1].splitlines()[0])
    name = first[first.index("-n") + 1].partition("@")[0]
    assert f"--pidfile={os.getcwd()}/{name}.pid" in first  # absolute: stop finds it from anywhere
    assert f"--logfile={os.getcwd()}/{name}.log" in first  # %I is empty for the main process


@pytest.mark.parametrize("args", [["names", "3"], ["names", "foo@%h", "bar", "baz@box.lan"],
                                  ["names", "2", "--hostname=worker.example.com", "--range-prefix=w"],
                                  ["names", "a", "b", "c", "-c:a,b", "2", "-Q", "x"],
                                  ["expand", "%n-%h.pid", "4", "-c", "2"],
                                  ["expand", "/var/log/%n/%h.log", "w1", "x@box.lan"]])
def test_names_and_expand_match_celery(args: list[str]) -> None:
    assert _celeriac_multi(args) == _celery_multi(args)


# -- the real CLI: detached workers ----------------------------------------------------------------


class Project:
    """A tiny app in ``tmp_path`` and the ``celeriac`` command run there; kills every node at the end."""

    def __init__(self, root: Path, broker: str | None = None) -> None:
        self.root = root
        self.broker = broker or f"sqlite:///{root}/broker.db"
        (root / "app.py").write_text(textwrap.dedent(f"""
            from celeriac import Celeriac
            app = Celeriac("app", broker={self.broker!r}, backend="sqlite:///{root}/results.db")

            @app.task(bind=True)
            def whoami(self):
                return self.request.hostname
        """))
        self.env = dict(os.environ, PYTHONPATH=str(root))
        self.env.pop("CELERIAC_BROKER_URL", None)
        self.env.pop("CELERIAC_RESULT_BACKEND", None)
        self.pids: set[int] = set()

    def celeriac(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        """Run ``celeriac ARGS`` in the project directory."""
        result = _run([sys.executable, "-m", "celeriac", *args], self.root, self.env, timeout)
        self.remember()
        return result

    def remember(self) -> None:
        """Note the pid of every pid file, so cleanup can kill it."""
        for path in self.root.rglob("*.pid"):
            pid = _pid(path)
            if pid:
                self.pids.add(pid)

    def cleanup(self) -> None:
        """SIGKILL every worker a pid file ever named."""
        self.remember()
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    if b"celeriac" not in handle.read():
                        continue
                os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass

    def app(self) -> Any:
        """An app on the same broker and backend, in the test process."""
        from celeriac import Celeriac

        return Celeriac("app", broker=self.broker, backend=f"sqlite:///{self.root}/results.db")


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rpartition(b")")[2].split()[:1] != [b"Z"]
    except OSError:
        return False


def _wait_for(check: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return check()


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Callable[..., Project]]:
    """Make projects (optionally on another broker); every node they start is killed afterwards."""
    made: list[Project] = []

    def make(broker: str | None = None) -> Project:
        made.append(Project(tmp_path, broker))
        return made[-1]

    yield make
    for each in made:
        each.cleanup()


def _status(project: Project, wanted: str) -> subprocess.CompletedProcess[str]:
    """``celeriac -A app status``, repeated until its output contains ``wanted`` (or 40 s pass)."""
    deadline = time.monotonic() + 40
    while True:
        out = project.celeriac("-A", "app", "status", "-t", "2")
        if wanted in out.stdout or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def _ping(project: Project, nodes: list[str], *extra: str) -> dict[str, Any]:
    replies: dict[str, Any] = {}

    def answered() -> bool:
        out = project.celeriac("-A", "app", *extra, "inspect", "ping", "-t", "2", "-j", "-d", ",".join(nodes))
        if out.returncode == 0:
            replies.update(json.loads(out.stdout))
        return set(nodes) <= set(replies)

    _wait_for(answered, 40)
    return replies


def test_start_status_task_double_start_restart_stop_kill(project: Callable[..., Project]) -> None:
    proj = project()
    args = ["2", "-A", "app", "-P", "threads", "-c", "1", "-Q:1", "images", "-Q", "default"]
    started = proj.celeriac("multi", "start", *args)
    assert started.returncode == 0, started.stdout + started.stderr
    assert "> Starting nodes..." in started.stdout
    assert f"\t> celery1@{HOST}: OK" in started.stdout and f"\t> celery2@{HOST}: OK" in started.stdout
    first = {n: _pid(proj.root / f"celery{n}.pid") for n in (1, 2)}
    assert all(first.values()) and (proj.root / "celery1.log").exists()

    status = _status(proj, "2 nodes online")
    assert f"celery1@{HOST}: OK" in status.stdout and "2 nodes online" in status.stdout, status.stderr

    app = proj.app()
    try:
        assert app.send_task("app.whoami", queue="images").get(timeout=30) == f"celery1@{HOST}"
        assert app.send_task("app.whoami", queue="default").get(timeout=30) == f"celery2@{HOST}"
    finally:
        app.close()

    again = proj.celeriac("multi", "start", *args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already running") == 2
    assert {n: _pid(proj.root / f"celery{n}.pid") for n in (1, 2)} == first

    # Celeriac's older spelling: global options before ``multi``, worker options after ``--``.
    restarted = proj.celeriac("-A", "app", "multi", "restart", "2", "-Q:1", "images", "-Q", "default",
                              "--", "-P", "threads", "-c", "1")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert "> Waiting for 2 nodes ->" in restarted.stdout
    assert f"> Restarting node celery1@{HOST}: OK" in restarted.stdout
    second = {n: _pid(proj.root / f"celery{n}.pid") for n in (1, 2)}
    assert all(second.values()) and not set(second.values()) & set(first.values())
    assert not any(_alive(pid) for pid in first.values() if pid)
    app = proj.app()
    try:  # the restarted nodes kept their per-node queues
        assert app.send_task("app.whoami", queue="images").get(timeout=30) == f"celery1@{HOST}"
    finally:
        app.close()

    stopped = proj.celeriac("multi", "stopwait", "celery1", "-A", "app")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert f"\t> celery1@{HOST}: TERM -> {second[1]}" in stopped.stdout
    assert f"> Waiting for 1 node -> {second[1]}" in stopped.stdout
    assert f"> celery1@{HOST}: DOWN" in stopped.stdout
    assert second[1] is not None and not _alive(second[1]) and not (proj.root / "celery1.pid").exists()

    killed = proj.celeriac("multi", "kill", "2")
    assert killed.returncode == 0, killed.stdout + killed.stderr
    assert f"> celery1@{HOST}: DOWN" in killed.stdout and f"celery2@{HOST} ({second[2]})" in killed.stdout
    assert second[2] is not None and not _alive(second[2]) and not (proj.root / "celery2.pid").exists()
    gone = proj.celeriac("-A", "app", "status", "-t", "1")
    assert gone.returncode != 0 and "No nodes replied" in gone.stderr


def test_guide_ten_workers_consume_their_queues(project: Callable[..., Project]) -> None:
    proj = project()
    # The guide's line, plus a light pool: ten prefork workers would not fit a 2-core CI machine.
    started = proj.celeriac("multi", "start", *shlex.split(GUIDE_10.replace("proj", "app")), "-P", "threads",
                            "-c", "1")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert started.stdout.count(": OK") == 10
        app = proj.app()
        queues: dict[str, list[str]] = {}
        try:
            def all_replied() -> bool:
                replies = app.control.inspect(timeout=2).active_queues() or {}
                queues.update({node: sorted(q["name"] for q in qs) for node, qs in replies.items()})
                return len(queues) == 10

            _wait_for(all_replied, 40)
        finally:
            app.close()
        expected = {f"celery{i}@{HOST}": ["images", "video"] if i <= 3 else ["data"] if i <= 5 else ["default"]
                    for i in range(1, 11)}
        assert queues == expected
    finally:
        stopped = proj.celeriac("multi", "stopwait", "10")
    assert stopped.returncode == 0 and stopped.stdout.count(": OK") == 10, stopped.stdout + stopped.stderr
    assert not list(proj.root.glob("*.pid"))


def test_guide_pid_and_log_directories_and_stop_returns_at_once(project: Callable[..., Project]) -> None:
    proj = project()
    files = [f"--pidfile={proj.root}/run/celery/%n.pid", f"--logfile={proj.root}/log/celery/%n%I.log"]
    started = proj.celeriac("multi", "start", "w1", "-A", "app", "-l", "info", "-P", "threads", "-c", "1", *files)
    assert started.returncode == 0, started.stdout + started.stderr
    pid = _pid(proj.root / "run/celery/w1.pid")
    assert pid and _alive(pid)
    assert _wait_for(lambda: "ready." in (proj.root / "log/celery/w1.log").read_text())
    stopped = proj.celeriac("multi", "stop", "w1", *files)
    assert stopped.returncode == 0 and f"\t> w1@{HOST}: TERM -> {pid}" in stopped.stdout
    assert "Waiting" not in stopped.stdout
    assert _wait_for(lambda: not _alive(pid))


def test_bad_input_starts_nothing(project: Callable[..., Project]) -> None:
    proj = project()
    (proj.root / "afile").write_text("")
    cases = [
        (["3", "-A", "app", "-Q:1-5", "x"], "Node 4 in -Q:1-5 does not exist"),
        (["3", "-A", "app", "-Q:2-", "x"], "Malformed node range '2-'"),
        (["w1", "w2", "-A", "app", "-c:w9", "2"], "Unknown node 'w9'"),
        (["3", "-A", "app", "-l:3", "loud"], "Node celery3@"),
        (["3", "-A", "app", f"--pidfile={proj.root}/afile/%n.pid"], "cannot create the pidfile directory"),
        (["3", "-A", "app", f"--logfile:2={proj.root}/afile/%n.log"], "cannot create the logfile directory"),
        (["3", "-A", "nosuchmodule"], "Cannot load the app 'nosuchmodule'"),
        (["3", "-A", "app", "--no-such-option"], "No such option"),
    ]
    for args, message in cases:
        out = proj.celeriac("multi", "start", *args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert message in out.stderr and out.stderr.count("\n") == 1, (args, out.stderr)
        assert "Starting" not in out.stdout
        assert not list(proj.root.rglob("*.pid")), args
    out = proj.celeriac("multi", "frobnicate", "2")
    assert out.returncode == 2 and "Unknown action 'frobnicate'" in out.stderr


def _start_ping_stopwait(proj: Project, url: str) -> None:
    tag = uuid.uuid4().hex[:6]
    names = [f"m{tag}a", f"m{tag}b"]
    nodes = [f"{name}@{HOST}" for name in names]
    started = proj.celeriac("multi", "start", *names, "-A", "app", "-b", url, "-P", "threads", "-c", "1",
                            "-Q", f"multi-{tag}")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert set(_ping(proj, nodes, "-b", url)) >= set(nodes)
    finally:
        stopped = proj.celeriac("multi", "stopwait", *names)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert all(f"\t> {node}: OK" in stopped.stdout for node in nodes)


def test_multi_on_redis(project: Callable[..., Project]) -> None:
    url = require_server("Redis", REDIS_URL, 6379, "CELERIAC_TEST_REDIS_URL")
    _start_ping_stopwait(project(), url)


def test_multi_on_rabbitmq(project: Callable[..., Project]) -> None:
    url = require_server("RabbitMQ", AMQP_URL, 5672, "CELERIAC_TEST_AMQP_URL")
    _start_ping_stopwait(project(), url)
