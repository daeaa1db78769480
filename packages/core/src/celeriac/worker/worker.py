"""The worker: connects, declares queues, starts the pool and the consumer, shuts down cleanly."""

from __future__ import annotations

import logging
import os
import platform
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from celeriac import __version__
from celeriac.broker.base import BROADCAST, QUEUE_SIZE, REPLY_QUEUES
from celeriac.events import EventDispatcher
from celeriac.exceptions import BrokerConnectionError
from celeriac.plugins.manager import available_pools, plugin_infos, pool_factory
from celeriac.routing import Queue
from celeriac.security import mask_url
from celeriac.worker.autoscale import Autoscaler
from celeriac.worker.consumer import TaskConsumer
from celeriac.worker.control import Pidbox
from celeriac.worker.heartbeat import Heart
from celeriac.worker.liveness import HeartbeatFile
from celeriac.worker.logsink import CombiningFileHandler, CombiningStreamHandler
from celeriac.worker.malloc import limit_malloc_arenas

if TYPE_CHECKING:
    from celeriac.app import Celeriac
    from celeriac.worker.pool import Pool

__all__ = ["LOG_FORMAT", "Worker", "default_pool_name", "expand_hostname", "setup_logging"]

logger = logging.getLogger("celeriac.worker")

LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"
#: Seconds an info line may wait to be written together with others (warnings go at once).
LOG_FLUSH_INTERVAL = 0.02


class WorkerFormatter(logging.Formatter):
    """The worker's format, with the time string computed once per second (a hot path)."""

    def __init__(self) -> None:
        super().__init__(LOG_FORMAT)
        # (second, its text), replaced as one object: threads format concurrently.
        self._stamp = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        second = int(record.created)
        cached = self._stamp
        if cached[0] != second:
            cached = self._stamp = (second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second)))
        return f"{cached[1]},{int(record.msecs):03d}"


def setup_logging(loglevel: str | int = "INFO", logfile: str | None = None) -> None:
    """Configure the root logger with the worker's format.

    Caller lookup (file/line of each log call) is turned off: the format does not show it and
    it is the most expensive part of a log record. The handler lets threads log without waiting
    for each other and writes info lines in batches at most ``LOG_FLUSH_INTERVAL`` seconds late
    (:mod:`celeriac.worker.logsink`).
    """
    level = loglevel if isinstance(loglevel, int) else logging.getLevelName(str(loglevel).upper())
    if not isinstance(level, int):
        raise ValueError(f"Unknown log level {loglevel!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL.")
    handler: logging.Handler = (CombiningFileHandler(logfile, flush_interval=LOG_FLUSH_INTERVAL) if logfile
                                else CombiningStreamHandler(sys.stderr, flush_interval=LOG_FLUSH_INTERVAL))
    handler.setFormatter(WorkerFormatter())
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def flush_log_handlers() -> None:
    """Write what the root logger's handlers hold (the worker's handler batches info lines)."""
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # a broken handler must not stop the worker
            logger.debug("Could not flush log handler %r", handler, exc_info=True)


def default_pool_name() -> str:
    """``prefork`` when ``celeriac-prefork`` is installed, else ``threads``."""
    return "prefork" if "prefork" in available_pools() else "threads"


def expand_hostname(template: str | None) -> str:
    """Expand ``%h`` (full host), ``%n`` (name part) and ``%d`` (domain) in a node name."""
    host = socket.gethostname()
    name, _, domain = host.partition(".")
    if not template:
        return f"celery@{host}"
    return template.replace("%h", host).replace("%n", name).replace("%d", domain)


class Worker:
    """One worker process: ``Worker(app, concurrency=4, queues=['celery']).start()``.

    :meth:`start` blocks until a shutdown and returns the exit code. :meth:`stop` may be
    called from any thread (tests run a worker in a thread and stop it this way).
    """

    def __init__(self, app: Celeriac, *, hostname: str | None = None, concurrency: int | None = None,
                 pool: str | None = None, queues: Sequence[str] | None = None,
                 exclude_queues: Sequence[str] | None = None, prefetch_multiplier: int | None = None,
                 events: bool = False, time_limit: float | None = None,
                 soft_time_limit: float | None = None, max_tasks_per_child: int | None = None,
                 max_memory_per_child: int | None = None, install_signals: bool = False,
                 ready_callback: Callable[[Worker], None] | None = None,
                 fetch_timeout: float = 1.0, detached: bool = False,
                 autoscale: tuple[int, int] | None = None, heartbeat_file: str | None = None,
                 heartbeat_file_interval: float = 10.0) -> None:
        self.app = app
        #: ``--heartbeat-file``: touched while the consumer is healthy (worker/liveness.py).
        self.heartbeat_file: HeartbeatFile | None = None
        self._heartbeat_file_args = (heartbeat_file, heartbeat_file_interval)
        self.hostname = expand_hostname(hostname)
        self.pool_name = pool or default_pool_name()
        self.pool_chosen_implicitly = pool is None
        conf_concurrency = app.conf.get("worker_concurrency")
        self.concurrency = int(concurrency or conf_concurrency or os.cpu_count() or 1)
        if self.pool_name == "solo":
            self.concurrency = 1
            autoscale = None
        #: ``(max, min)`` pool size with ``--autoscale``; the pool starts at the minimum.
        self.autoscale = autoscale
        if autoscale is not None:
            self.concurrency = max(1, autoscale[1])
        multiplier = prefetch_multiplier
        if multiplier is None:
            multiplier = app.conf.get("worker_prefetch_multiplier")
        self.prefetch_multiplier = int(multiplier if multiplier is not None else 4)
        self.prefetch = (autoscale[0] if autoscale else self.concurrency) * self.prefetch_multiplier
        self.events = events or bool(app.conf.get("worker_send_task_events"))
        self.time_limit = time_limit
        self.soft_time_limit = soft_time_limit
        if max_tasks_per_child is None:
            max_tasks_per_child = app.conf.get("worker_max_tasks_per_child")
        self.max_tasks_per_child = max_tasks_per_child
        if max_memory_per_child is None:
            max_memory_per_child = app.conf.get("worker_max_memory_per_child")
        #: KiB of peak resident memory after which a pool process is replaced (Celery's unit).
        self.max_memory_per_child = max_memory_per_child
        for option, value in (("--max-tasks-per-child", max_tasks_per_child),
                              ("--max-memory-per-child", max_memory_per_child)):
            if value and self.pool_name in ("threads", "solo"):
                logger.warning("%s only applies to process pools; the %s pool ignores it.", option,
                               self.pool_name)
        self.install_signals = install_signals
        self.ready_callback = ready_callback
        self.fetch_timeout = fetch_timeout
        self.detached = detached
        self.queues = self._select_queues(queues, exclude_queues)
        self.task_consumer: TaskConsumer | None = None
        self.pool: Pool | None = None
        self.exit_code = 0
        self.ready = threading.Event()
        self._cold = False
        self._restart = False
        self._sigint_count = 0
        self._stop_requested = threading.Event()
        self.started_at = time.monotonic()
        self.heart: Heart | None = None
        self.autoscaler: Autoscaler | None = None
        self.pidbox: Pidbox | None = None
        self.dispatcher: EventDispatcher | None = None

    def _select_queues(self, names: Sequence[str] | None, exclude: Sequence[str] | None) -> list[Queue]:
        router = self.app.router
        if names:
            selected = [router.queue(n.strip()) for n in names if n.strip()]
        else:
            configured = self.app.conf.get("task_queues")
            selected = list(router.queues.values()) if configured else [
                router.queues[self.app.conf["task_default_queue"]]]
        excluded = {n.strip() for n in exclude or ()}
        return [q for q in selected if q.name not in excluded]

    # -- banner -------------------------------------------------------------------------------

    def banner(self) -> str:
        """The startup banner, in the layout of Celery's "Next Steps" guide.

        ``[Configuration]`` (broker with its password masked, app, results, concurrency and
        pool, events), ``[Queues]``, then ``[Plugins]`` and ``[Tasks]``. What was chosen
        implicitly (the embedded broker, the default pool) says so."""
        broker = self.app.broker
        backend_url = self.app.backend_url
        broker_line = mask_url(self.app.broker_url)
        if broker.description:
            broker_line += f" ({broker.description})"
        if not self.app.conf.get("broker_url"):
            broker_line += " - the default: no broker configured, nothing to install"
        pool_note = self.pool_name + (" (default)" if self.pool_chosen_implicitly else "")
        # A pool plugin may describe itself (green pools: "... the process is monkey-patched").
        description = getattr(pool_factory(self.pool_name), "description", None)
        if isinstance(description, str) and description:
            pool_note += f"; {description}"
        app_name = f"{self.app.main or '__main__'}:{id(self.app):#x}"
        events = "ON" if self.events else "OFF (enable -E to monitor this worker)"
        art = ["--- ***** -----", "-- ******* ----", "- *** --- * ---", "- ** ----------"]
        lines = [
            "",
            f" -------------- {self.hostname} v{__version__} (celeriac)",
            art[0],
            f"{art[1]} {platform.platform()} {time.strftime('%Y-%m-%d %H:%M:%S')}",
            art[2],
            f"{art[3]} [Configuration]",
            f"{art[3]} . broker:      {broker_line}",
            f"{art[3]} . app:         {app_name}",
            f"{art[3]} . results:     {mask_url(backend_url) if backend_url else 'disabled://'}",
            f"{art[2]} . concurrency: {self.concurrency} ({pool_note})",
            f"{art[1]} . events:      {events}",
            art[0],
            " -------------- [Queues]",
        ]
        for queue in self.queues:
            exchange = queue.exchange
            assert exchange is not None
            lines.append(f"                . {queue.name + ':':<12} exchange:{exchange.name}({exchange.type}) "
                         f"binding:{queue.binding_key}")
        lines.append("")
        lines.append("[Plugins]")
        for info in plugin_infos():
            status = f"FAILED: {info.error}" if info.error else info.provides()
            lines.append(f"  . {info.name} ({info.distribution} {info.version}): {status}")
        lines.append("")
        lines.append("[Tasks]")
        for name in sorted(self.app.tasks):
            if not name.startswith("celery."):
                lines.append(f"  . {name}")
        lines.append("")
        return "\n".join(lines)

    # -- lifecycle ----------------------------------------------------------------------------

    def _connect(self) -> bool:
        conf = self.app.conf
        retry = bool(conf.get("broker_connection_retry"))
        max_retries = int(conf.get("broker_connection_max_retries") or 0)
        attempt = 0
        delay = 1.0
        while True:
            try:
                broker = self.app.broker
                broker.connect()
                for queue in self.queues:
                    broker.declare(queue)
                return True
            except BrokerConnectionError as exc:
                attempt += 1
                reason = str(exc).removeprefix("Cannot connect to ")
                url = mask_url(self.app.broker_url)
                if url not in reason:
                    reason = f"{url}: {reason}"
                if not getattr(exc, "transient", True):
                    logger.critical("Cannot connect to %s. This will not get better by retrying; giving up.",
                                    reason)
                    return False
                if not retry or (max_retries and attempt > max_retries):
                    logger.critical("Cannot connect to %s. Giving up after %d attempts.", reason, attempt)
                    return False
                logger.error("Cannot connect to %s. Trying again in %.0f s (attempt %d).", reason, delay, attempt)
                if self._stop_requested.wait(delay):
                    return False
                delay = min(delay * 2, 32.0)

    def start(self) -> int:
        """Run until shut down; return the process exit code (0 after a warm shutdown)."""
        limit_malloc_arenas(self.app.conf.get("worker_malloc_arena_max"))
        if self.install_signals:
            self._install_signal_handlers()
        self.app.import_includes()
        if not self._connect():
            return 1
        factory = pool_factory(self.pool_name)
        direct = self._direct_variant(factory)
        self.pool = (direct or factory)(concurrency=self.concurrency, app=self.app,
                                        max_tasks_per_child=self.max_tasks_per_child,
                                        max_memory_per_child=self.max_memory_per_child)
        if self.pool.consumes_directly:
            self.pool.set_task_events(self.events)
            self.task_consumer = self.pool.direct_consumer(
                self.hostname, self.queues, self.prefetch_multiplier, self.fetch_timeout,
                self.time_limit, self.soft_time_limit)
            self.pool.start()
        else:
            if self.pool.process_based:
                from celeriac.worker.trace import init_process

                self.pool.init_processes(init_process, (self.app, self.hostname, self.events))
            self.pool.start()
            consumer = self.app.broker.consumer(self.queues, self.prefetch)
            self.task_consumer = TaskConsumer(self.app, consumer, self.pool, self.hostname,
                                              self.prefetch, self.fetch_timeout, self.time_limit,
                                              self.soft_time_limit, queues=self.queues)
        if self.autoscale is not None:
            task_consumer = self.task_consumer
            self.autoscaler = Autoscaler(self.pool, lambda: task_consumer.reserved, *self.autoscale,
                                         on_resize=self.pool_resized)
            self.autoscaler.start()
        if self._stop_requested.is_set():
            self.task_consumer.stop()
        broker = self.app.broker
        if broker.has(BROADCAST):
            self.dispatcher = EventDispatcher(broker, self.hostname, enabled=True)
            self.set_events(self.events)
            if broker.has(REPLY_QUEUES):
                self.pidbox = Pidbox(self)
                self.pidbox.start()
        self._start_heartbeat_file()
        logger.info("%s ready.", self.hostname)
        flush_log_handlers()  # tools and people wait for this line: never batch it
        self.ready.set()
        if self.ready_callback is not None:
            self.ready_callback(self)
        try:
            self.task_consumer.run()
        finally:
            self._shutdown()
        if self._restart:
            self._reexec()
        return self.exit_code

    def _direct_variant(self, factory: Any) -> Callable[..., Pool] | None:
        """The pool variant whose processes consume themselves, when ``worker_direct_consume``
        (on by default) asks for it and the pool has one; not with ``--autoscale`` (it sizes the
        pool by the tasks the parent holds) nor when a task has a rate limit at start (a limit
        is per worker, and each process would apply it on its own)."""
        if not self.app.conf.get("worker_direct_consume"):
            return None
        variant = getattr(factory, "direct_variant", None)
        if variant is None:
            logger.warning("worker_direct_consume: the %s pool has no processes that consume by "
                           "themselves; the worker consumes for it.", self.pool_name)
            return None
        if self.autoscale is not None:
            logger.info("--autoscale: the worker consumes for its processes (it sizes the pool "
                        "by the tasks it holds).")
            return None
        conf = self.app.conf
        if not conf.get("worker_disable_rate_limits") and (
                conf.get("task_default_rate_limit")
                or any(getattr(task, "rate_limit", None) for task in self.app.tasks.values())):
            logger.info("Rate limits are set: the worker consumes for its processes, so that a "
                        "rate limit applies to the worker as a whole.")
            return None
        return variant  # type: ignore[no-any-return]

    def _start_heartbeat_file(self) -> None:
        path, interval = self._heartbeat_file_args
        consumer = self.task_consumer
        if path is None or consumer is None:
            return
        consumer.loop_at = time.monotonic()
        broker, queue = self.app.broker, self.queues[0].name if self.queues else None
        probe = (lambda: broker.queue_size(queue)) if queue and broker.has(QUEUE_SIZE) else broker.connect
        self.heartbeat_file = HeartbeatFile(path, interval, lambda: consumer.loop_at, probe,
                                            stall_after=2 * self.fetch_timeout)
        self.heartbeat_file.start()

    def pool_resized(self, concurrency: int) -> None:
        """The pool now has ``concurrency`` slots (autoscale, ``control pool_grow``/``pool_shrink``).

        Without autoscale the prefetch window follows the pool size."""
        self.concurrency = concurrency
        if self.autoscale is None and self.task_consumer is not None:
            self.prefetch = self.task_consumer.prefetch = max(1, concurrency * self.prefetch_multiplier)

    @property
    def totals(self) -> dict[str, int]:
        """Tasks completed, per task name."""
        return dict(self.task_consumer.totals) if self.task_consumer else {}

    def set_events(self, enabled: bool) -> None:
        """Turn task events and heartbeats on or off (``-E``, ``control enable_events``)."""
        self.events = enabled
        if self.task_consumer is None or self.dispatcher is None:
            return
        if self.pool is not None:
            self.pool.set_task_events(enabled)  # pool processes send their tasks' events
        self.task_consumer.tracer.events = self.dispatcher if enabled else None
        if enabled and self.heart is None:
            consumer = self.task_consumer
            self.heart = Heart(self.dispatcher, lambda: (len(consumer.active), consumer.processed))
            self.heart.start()
        elif not enabled and self.heart is not None:
            self.heart.stop()
            self.heart = None

    def _shutdown(self) -> None:
        consumer = self.task_consumer
        pool = self.pool
        assert consumer is not None and pool is not None
        if self.pidbox is not None:
            self.pidbox.stop()
        if self.autoscaler is not None:
            self.autoscaler.stop()
        if self.heart is not None:
            self.heart.stop()
        if self.heartbeat_file is not None:
            self.heartbeat_file.stop()
        if self._cold:
            logger.warning("worker: Cold shutdown (%s)", "MainProcess")
            consumer.timer.stop()
            consumer.consumer.close()
            pool.stop(wait=False)
        else:
            logger.warning("worker: Warm shutdown (%s)", "MainProcess")
            consumer.requeue_held()
            pool.stop(wait=True)
            consumer.close()
        if self.install_signals:
            # The process owns the app (the CLI): close its connections. An embedded worker
            # leaves them to the program that shares the app.
            self.app.close()

    def stop(self, warm: bool = True, exit_code: int | None = None) -> None:
        """Ask the worker to shut down: warm (finish running tasks) or cold. Thread-safe."""
        if not warm:
            self._cold = True
        if exit_code is not None:
            self.exit_code = exit_code
        self._stop_requested.set()
        if self.task_consumer is not None:
            self.task_consumer.stop()

    def _install_signal_handlers(self) -> None:
        def on_term(signum: int, frame: Any) -> None:
            self.stop(warm=True)

        def on_int(signum: int, frame: Any) -> None:
            self._sigint_count += 1
            if self._sigint_count == 1:
                sys.stderr.write("worker: Hitting Ctrl+C again will initiate cold shutdown, "
                                 "terminating all running tasks!\n")
                self.stop(warm=True, exit_code=1)
            else:
                self.stop(warm=False, exit_code=1)

        def on_quit(signum: int, frame: Any) -> None:
            self.stop(warm=False, exit_code=1)

        def on_hup(signum: int, frame: Any) -> None:
            logger.warning("worker: SIGHUP received, restarting.")
            self._restart = True
            self.stop(warm=True)

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_int)
        if hasattr(signal, "SIGQUIT"):
            signal.signal(signal.SIGQUIT, on_quit)
        if hasattr(signal, "SIGHUP") and self.detached:
            signal.signal(signal.SIGHUP, on_hup)

    def _reexec(self) -> None:
        os.execv(sys.executable, [sys.executable, *sys.argv])

    # -- helpers for embedding ----------------------------------------------------------------

    def start_in_thread(self, timeout: float = 30.0) -> threading.Thread:
        """Start in a daemon thread and wait until it is ready (tests, notebooks)."""
        thread = threading.Thread(target=self.start, name=f"Worker-{self.hostname}", daemon=True)
        thread.start()
        if not self.ready.wait(timeout):
            raise RuntimeError(f"The worker did not become ready within {timeout} s.")
        return thread
