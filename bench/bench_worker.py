"""A worker started as a real subprocess through its system's command line.

``celery -A benchapp worker -l LEVEL -P POOL -c N -n NAME`` or the same with ``celeriac``;
``dramatiq benchapp --processes P --threads T`` for Dramatiq (the bench's ``threads`` pool is one
process of 8 threads, its ``prefork`` pool 2 processes of 1 thread). The output goes to a log file
that is tailed for the ready line (``ready.``; Dramatiq: the first ``is ready for action``). The
worker runs in its own session so that stopping it also stops its pool processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["DRAMATIQ_POOLS", "WorkerProcess", "cli_path", "tree_rss_kb", "worker_command"]

POOL_CONCURRENCY = {"threads": 8, "prefork": 2}
#: Dramatiq's equivalent of each pool: (--processes, --threads).
DRAMATIQ_POOLS = {"threads": (1, 8), "prefork": (2, 1)}
#: The log text that says a worker is ready, per system.
READY_TEXT = {"celery": b" ready.", "celeriac": b" ready.", "dramatiq": b"is ready for action"}


def worker_command(system: str, pool: str, loglevel: str = "info", hostname: str = "bench@%h") -> list[str]:
    """The command line that starts ``system``'s worker on the ``benchapp`` module."""
    if system == "dramatiq":
        processes, threads = DRAMATIQ_POOLS[pool]
        cmd = [cli_path("dramatiq"), "benchapp", "--processes", str(processes), "--threads", str(threads)]
        if loglevel.lower() == "debug":
            cmd.append("-v")
        return cmd
    return [cli_path(system), "-A", "benchapp", "worker", "-l", loglevel, "-P", pool,
            "-c", str(POOL_CONCURRENCY.get(pool, 2)), "-n", hostname]


def cli_path(system: str) -> str:
    """The ``celery`` / ``celeriac`` console script beside this interpreter."""
    script = Path(sys.executable).parent / system
    return str(script) if script.exists() else system


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                kids += [int(x) for x in handle.read().split()]
    except OSError:
        pass
    return kids


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kb(pid: int) -> tuple[int, int]:
    """(RSS of ``pid``, RSS of ``pid`` plus all its descendants), in KiB, from ``/proc``."""
    main = _rss_kb(pid)
    total, todo = main, _children(pid)
    while todo:
        child = todo.pop()
        total += _rss_kb(child)
        todo += _children(child)
    return main, total


class WorkerProcess:
    """One worker subprocess: :meth:`start`, :meth:`wait_ready`, :meth:`stop`.

    ``started`` is the wall-clock time just before the process was spawned and ``ready_at`` the
    time its ``ready.`` log line was seen (polled every 5 ms), both from ``time.time()``.
    """

    def __init__(self, system: str, app_dir: Path, env: dict[str, str], pool: str, log_path: Path,
                 loglevel: str = "info", hostname: str = "bench@%h") -> None:
        self.system = system
        self.cmd = worker_command(system, pool, loglevel, hostname)
        self.ready_text = READY_TEXT[system]
        self.app_dir = app_dir
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.ready_at: float | None = None
        self._log_pos = 0
        self._tail = b""

    def start(self) -> None:
        """Spawn the worker."""
        log = open(self.log_path, "wb")
        self.started = time.time()
        self.proc = subprocess.Popen(self.cmd, cwd=self.app_dir, env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()

    def alive(self) -> bool:
        """Whether the worker process is still running."""
        return self.proc is not None and self.proc.poll() is None

    def poll_ready(self) -> bool:
        """Read new log output; True once the ``ready.`` line has been seen."""
        if self.ready_at is not None:
            return True
        with open(self.log_path, "rb") as handle:
            handle.seek(self._log_pos)
            chunk = handle.read()
        if chunk:
            self._log_pos += len(chunk)
            text = self._tail + chunk
            if self.ready_text in text:
                self.ready_at = time.time()
                return True
            self._tail = text[-64:]
        return False

    def wait_ready(self, timeout: float) -> float:
        """Block until ready; return seconds from spawn to ready. Raises ``RuntimeError``."""
        deadline = time.monotonic() + timeout
        while not self.poll_ready():
            if not self.alive():
                raise RuntimeError(f"{self.system} worker exited with {self.returncode()}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.system} worker not ready after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.005)
        assert self.ready_at is not None
        return self.ready_at - self.started

    def returncode(self) -> int | None:
        """The exit code, or None while running."""
        return None if self.proc is None else self.proc.poll()

    def rss_kb(self) -> tuple[int, int]:
        """(main process RSS, whole process tree RSS) in KiB."""
        assert self.proc is not None
        return tree_rss_kb(self.proc.pid)

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the worker's output."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM (warm shutdown), then SIGKILL to the whole session after ``grace`` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL the worker's session (its pool processes too) and reap it."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
