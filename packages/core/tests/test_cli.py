"""The real command line in subprocesses, on the embedded SQLite broker."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from celeriac.cli.main import cli

REPO = pathlib.Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples"


class WorkerProcess:
    """A ``celeriac worker`` subprocess whose output is collected in the background."""

    def __init__(self, args: list[str], cwd: pathlib.Path, env: dict[str, str],
                 module: str = "celeriac") -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if " ready." in line:
                self.ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("worker did not start:\n" + self.output)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture
def project(tmp_path: pathlib.Path) -> Iterator[tuple[pathlib.Path, dict[str, str]]]:
    """A project directory with a ``proj`` package and a private SQLite broker/backend."""
    pkg = tmp_path / "proj"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "celery.py").write_text(textwrap.dedent("""
        from celeriac import Celeriac
        app = Celeriac("proj", backend="sqlite:///results.db", include=["proj.tasks"],
                       broker_transport_options={"visibility_timeout": 2})

        if __name__ == "__main__":
            app.start()
    """))
    (pkg / "tasks.py").write_text(textwrap.dedent("""
        import os, time
        from .celery import app

        @app.task
        def add(x, y):
            return x + y

        @app.task
        def slow(seconds, marker=None):
            if marker:
                open(marker, "a").write(f"{os.getpid()}\\n")
            time.sleep(seconds)
            return "slept"

        @app.task(acks_late=True)
        def late(seconds, marker):
            first = not os.path.exists(marker)
            open(marker, "a").write(f"{os.getpid()}\\n")
            if first:
                time.sleep(seconds)
            return "done"
    """))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("CELERIAC_BROKER_URL", None)
    env.pop("CELERIAC_RESULT_BACKEND", None)
    yield tmp_path, env


def _client(cwd: pathlib.Path, code: str, env: dict[str, str], timeout: float = 60) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_tutorial_end_to_end_on_the_embedded_broker() -> None:
    env = dict(os.environ)
    env.pop("CELERIAC_BROKER_URL", None)
    env.pop("CELERIAC_RESULT_BACKEND", None)
    out = subprocess.run([sys.executable, str(EXAMPLES / "tutorial.py")], env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "All tutorial calls gave the expected answers." in out.stdout
    assert "worker exit code: 0" in out.stdout


def test_banner_lists_configuration_queues_and_plugins(project: Any) -> None:
    cwd, env = project
    worker = WorkerProcess(["-A", "proj", "worker", "-l", "info", "-Q", "celery,hipri", "-c", "2",
                            "-n", "w1@%h"], cwd, env)
    try:
        worker.wait_ready()
    finally:
        assert worker.stop() == 0
    banner = worker.output
    assert "[Configuration]" in banner and "[Queues]" in banner and "[Plugins]" in banner
    assert ". broker:      sqlite:///celeriac-broker.db (embedded SQLite)" in banner
    assert "no broker configured, nothing to install" in banner
    assert "concurrency: 2 (threads (default))" in banner or "concurrency: 2 (prefork (default))" in banner
    assert ". events:      OFF (enable -E to monitor this worker)" in banner
    assert ". celery:      exchange:celery(direct) binding:celery" in banner
    assert ". hipri:       exchange:hipri(direct) binding:hipri" in banner
    assert "builtin (celeriac " in banner
    assert "w1@" in banner and "proj.tasks.add" in banner
    assert "Warm shutdown" in banner


def test_sigterm_finishes_running_tasks_and_exits_0(project: Any) -> None:
    cwd, env = project
    worker = WorkerProcess(["-A", "proj", "worker", "-l", "info", "-c", "2"], cwd, env)
    worker.wait_ready()
    marker = cwd / "started.txt"
    task_id = _client(cwd, f"""
        from proj.tasks import slow
        print(slow.delay(1.5, {str(marker)!r}).id)
    """, env).strip()
    deadline = time.monotonic() + 20
    while not marker.exists():
        assert time.monotonic() < deadline, worker.output
        time.sleep(0.05)
    assert worker.stop(signal.SIGTERM) == 0
    out = _client(cwd, f"""
        from proj.celery import app
        r = app.AsyncResult({task_id!r})
        print(r.state, r.get(timeout=5))
    """, env)
    assert out.split() == ["SUCCESS", "slept"]


def test_killed_worker_acks_late_task_runs_again_on_a_new_worker(project: Any) -> None:
    cwd, env = project
    marker = cwd / "runs.txt"
    first = WorkerProcess(["-A", "proj", "worker", "-l", "info", "-c", "1"], cwd, env)
    first.wait_ready()
    task_id = _client(cwd, f"""
        from proj.tasks import late
        print(late.delay(30, {str(marker)!r}).id)
    """, env).strip()
    deadline = time.monotonic() + 20
    while not marker.exists():
        assert time.monotonic() < deadline, first.output
        time.sleep(0.05)
    first.proc.kill()
    first.proc.wait(10)
    # the replacement must run it again, after the (2 s) visibility timeout
    second = WorkerProcess(["-A", "proj", "worker", "-l", "info", "-c", "1"], cwd, env)
    try:
        second.wait_ready()
        out = _client(cwd, f"""
            from proj.celery import app
            print(app.AsyncResult({task_id!r}).get(timeout=30))
        """, env)
        assert out.strip() == "done"
        assert len(marker.read_text().split()) == 2
    finally:
        second.stop()


def test_call_result_and_purge_commands(project: Any) -> None:
    cwd, env = project
    run = lambda *args, **kw: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "celeriac", "-A", "proj", *args], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=60, **kw)
    sent = run("call", "proj.tasks.add", "--args", "[3, 4]")
    assert sent.returncode == 0, sent.stderr
    task_id = sent.stdout.strip()
    assert run("purge").returncode != 0  # asks, and aborts without a yes
    purged = run("purge", "-f")
    assert purged.returncode == 0 and "Purged 1 message" in purged.stdout
    again = run("call", "proj.tasks.add", "--args", "[3, 4]").stdout.strip()
    worker = WorkerProcess(["-A", "proj", "worker", "-l", "info", "-c", "1"], cwd, env)
    try:
        worker.wait_ready()
        shown = run("result", again, "--timeout", "20")
        assert shown.returncode == 0 and shown.stdout.strip() == "7"
    finally:
        worker.stop()
    assert task_id != again
    bad = run("call", "proj.tasks.add", "--args", "not json")
    assert bad.returncode == 2 and "must be JSON" in bad.stderr


def test_unreachable_broker_is_one_line_and_retried(project: Any) -> None:
    cwd, env = project
    env = dict(env, CELERIAC_BROKER_URL="sqlite:////nonexistent-dir/for/sure/broker.db")
    worker = WorkerProcess(["-A", "proj", "worker", "-l", "info"], cwd, env)
    time.sleep(2.5)
    worker.stop(signal.SIGTERM)
    errors = [line for line in worker.lines if "Cannot connect to" in line]
    assert errors, worker.output
    assert "Traceback" not in worker.output
    assert "Trying again in" in errors[0]


@pytest.mark.parametrize("command", ["worker", "call", "result", "purge", "plugins", "inspect", "control",
                                     "status", "events", "multi"])
def test_every_command_has_help(command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output


@pytest.mark.parametrize("command", ["inspect", "control"])
def test_remote_help_lists_every_command_on_its_own_line(command: str) -> None:
    from celeriac.cli.remote import CONTROL_COMMANDS, INSPECT_COMMANDS

    table = INSPECT_COMMANDS if command == "inspect" else CONTROL_COMMANDS
    result = CliRunner().invoke(cli, [command, "--help"], terminal_width=80)
    assert result.exit_code == 0
    lines = result.output.splitlines()
    listed = lines[lines.index("Commands:") + 1:]
    assert len(listed) == len(table)
    for line, (name, (_, text)) in zip(listed, table.items(), strict=True):
        assert line.split()[0] == name and line.endswith(text) and len(line) <= 80


def test_plugins_lists_builtins_with_versions() -> None:
    from celeriac import __version__

    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0
    assert f"builtin  (celeriac {__version__})" in result.output
    assert "sqlite" in result.output and "threads" in result.output


def test_unknown_app_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    out = subprocess.run([sys.executable, "-m", "celeriac", "-A", "no_such_proj", "worker"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "module 'no_such_proj' was not found" in out.stderr
    assert "Traceback" not in out.stderr


def test_detached_worker_restarts_on_sighup_and_stops_on_sigterm(project: Any) -> None:
    cwd, env = project
    pidfile, logfile = cwd / "w.pid", cwd / "w.log"
    started = subprocess.run([sys.executable, "-m", "celeriac", "-A", "proj", "worker", "--detach", "-l", "info",
                              "--pidfile", str(pidfile), "--logfile", str(logfile)],
                             cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stderr

    def wait_for(predicate: Any, what: str) -> None:
        deadline = time.monotonic() + 30
        while not predicate():
            assert time.monotonic() < deadline, f"{what}:\n{logfile.read_text() if logfile.exists() else ''}"
            time.sleep(0.1)

    wait_for(lambda: logfile.exists() and logfile.read_text().count(" ready.") == 1, "first start")
    os.kill(int(pidfile.read_text()), signal.SIGHUP)
    wait_for(lambda: logfile.read_text().count(" ready.") == 2, "restart after SIGHUP")
    assert "SIGHUP received, restarting" in logfile.read_text()
    assert _client(cwd, "from proj.tasks import add\nprint(add.delay(1, 2).get(timeout=20))", env).strip() == "3"
    os.kill(int(pidfile.read_text()), signal.SIGTERM)
    wait_for(lambda: not pidfile.exists(), "pidfile removed after SIGTERM")
    assert logfile.read_text().count("Warm shutdown") == 2


def test_python_m_proj_celery_starts_a_worker_with_app_start(project: Any) -> None:
    """The guide's ``proj/celery.py`` ends with ``app.start()``: ``python -m proj.celery worker``."""
    cwd, env = project
    worker = WorkerProcess(["worker", "-l", "info", "-c", "2", "-P", "threads"], cwd, env,
                           module="proj.celery")
    try:
        worker.wait_ready()
        assert "proj.tasks.add" in worker.output  # the task module found the same app
        out = _client(cwd, "from proj.tasks import add; print(add.delay(2, 3).get(timeout=20))", env)
        assert out.strip() == "5"
    finally:
        assert worker.stop() == 0, worker.output


def test_app_start_runs_other_commands_and_worker_main_insists_on_worker(project: Any) -> None:
    cwd, env = project
    out = subprocess.run([sys.executable, "-c", "from proj.celery import app; app.start(['inspect', '--help'])"],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "registered" in out.stdout
    out = subprocess.run([sys.executable, "-c", "from proj.celery import app; app.worker_main(['status'])"],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "worker sub-command" in out.stderr


def test_broker_and_backend_options_after_the_command(project: Any, tmp_path: pathlib.Path) -> None:
    """``celeriac -A proj worker -b URL`` (the guide) and ``--result-backend`` after the command."""
    cwd, env = project
    broker = f"sqlite:///{tmp_path}/other-broker.db"
    backend = f"sqlite:///{tmp_path}/other-results.db"
    worker = WorkerProcess(["-A", "proj", "worker", "-l", "info", "-P", "threads", "-b", broker,
                            "--result-backend", backend], cwd, env)
    try:
        worker.wait_ready()
        assert f". broker:      {broker}" in worker.output
        assert f". results:     {backend}" in worker.output
        out = _client(cwd, f"""
            from proj.tasks import add
            from proj.celery import app
            app.conf.update(broker_url={broker!r}, result_backend={backend!r})
            print(add.delay(4, 4).get(timeout=20))
        """, env)
        assert out.strip() == "8"
        status = subprocess.run([sys.executable, "-m", "celeriac", "-A", "proj", "status", "-b", broker],
                                cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "1 node online" in status.stdout, status.stderr
    finally:
        assert worker.stop() == 0, worker.output


def test_control_commands_change_a_running_worker(project: Any) -> None:
    cwd, env = project
    worker = WorkerProcess(["-A", "proj", "worker", "-l", "info", "-P", "threads", "--autoscale=3,1",
                            "-n", "ctl@%h"], cwd, env)
    try:
        worker.wait_ready()

        node = f"ctl@{socket.gethostname()}"

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            # One destination: the reply ends the wait, so a generous timeout costs nothing.
            return subprocess.run([sys.executable, "-m", "celeriac", "-A", "proj", *args, "-d", node, "-t", "10"],
                                  cwd=cwd, env=env, capture_output=True, text=True, timeout=60)

        added = run("control", "add_consumer", "images")
        assert added.returncode == 0 and "add consumer images" in added.stdout, added.stdout + added.stderr
        assert "images" in run("inspect", "active_queues").stdout
        scaled = run("control", "autoscale", "5", "2")
        assert "autoscale now max=5 min=2" in scaled.stdout, scaled.stdout + scaled.stderr
        stats = run("inspect", "stats", "-j")
        assert '"max": 5' in stats.stdout
        bad = run("control", "cancel_consumer", "nope")
        assert "ERROR" in bad.stdout and "not consuming from 'nope'" in bad.stdout
    finally:
        assert worker.stop() == 0, worker.output


def test_inspect_scheduled_and_purge_cover_tasks_parked_in_the_broker(project: Any) -> None:
    cwd, env = project
    worker = WorkerProcess(["-A", "proj", "worker", "-l", "info", "-P", "threads", "-n", "eta@%h"], cwd, env)
    try:
        worker.wait_ready()
        task_id = _client(cwd, "from proj.tasks import add; print(add.apply_async((1, 2), countdown=40).id)",
                          env).strip()
        out = subprocess.run([sys.executable, "-m", "celeriac", "-A", "proj", "inspect", "scheduled"], cwd=cwd,
                             env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and task_id in out.stdout and "'eta': " in out.stdout, out.stdout + out.stderr
    finally:
        assert worker.stop() == 0, worker.output
    purged = subprocess.run([sys.executable, "-m", "celeriac", "-A", "proj", "purge", "-f"], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=60)
    assert "Purged 1 message" in purged.stdout and "(1 of them waiting for their ETA)" in purged.stdout
