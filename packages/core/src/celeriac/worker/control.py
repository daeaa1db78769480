"""Remote control, worker side: the pidbox thread and the command handlers."""

from __future__ import annotations

import datetime as dt
import fnmatch
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celeriac import __version__, states
from celeriac.backends.base import make_meta
from celeriac.control import PIDBOX_EXCHANGE
from celeriac.exceptions import TaskRevokedError
from celeriac.protocol import Message
from celeriac.routing import Exchange, Queue
from celeriac.security import mask_settings, mask_url
from celeriac.serialization import json_dumps, json_loads

if TYPE_CHECKING:
    from celeriac.worker.request import Request
    from celeriac.worker.worker import Worker

__all__ = ["HANDLERS", "Pidbox"]

logger = logging.getLogger("celeriac.worker")

Handler = Callable[..., Any]
HANDLERS: dict[str, Handler] = {}
#: Commands Celery workers send to each other (mingle, gossip elections) that need no answer.
IGNORED = frozenset({"hello", "election"})


def handler(name: str, *aliases: str) -> Callable[[Handler], Handler]:
    """Register a control command handler ``fn(worker, **arguments) -> reply``."""
    def register(fn: Handler) -> Handler:
        for key in (name, *aliases):
            HANDLERS[key] = fn
        return fn
    return register


def _info(request: Request, worker: Worker, safe: bool = False) -> dict[str, Any]:
    headers = request.message.headers
    return {
        "id": request.id, "name": request.name,
        "args": headers.get("argsrepr") if safe else request.message.args,
        "kwargs": headers.get("kwargsrepr") if safe else request.message.kwargs,
        "type": request.message.name, "hostname": worker.hostname,
        "time_start": request.time_start, "acknowledged": request.acked,
        "delivery_info": {"exchange": request.delivery.exchange,
                          "routing_key": request.delivery.routing_key,
                          "priority": request.message.properties.get("priority"),
                          "redelivered": request.delivery.redelivered},
        "worker_pid": getattr(request.handle, "pid", None) or os.getpid(),
    }


@handler("ping")
def ping(worker: Worker) -> Any:
    return {"ok": "pong"}


@handler("active", "dump_active")
def active(worker: Worker, safe: bool = False) -> Any:
    consumer = worker.task_consumer
    if consumer is None:
        return []
    return [_info(r, worker, safe) for r in list(consumer.active.values()) if r.time_start is not None]


@handler("reserved", "dump_reserved")
def reserved(worker: Worker) -> Any:
    consumer = worker.task_consumer
    if consumer is None:
        return []
    return [_info(r, worker) for r in list(consumer.active.values()) if r.time_start is None]


def _parked_info(message: Message, worker: Worker) -> dict[str, Any]:
    """What ``inspect`` shows of a task message parked in the broker (not fetched by anyone)."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    return {"id": headers.get("id"), "name": headers.get("task"), "args": headers.get("argsrepr"),
            "kwargs": headers.get("kwargsrepr"), "type": headers.get("task"), "hostname": None,
            "time_start": None, "acknowledged": False, "parked_in_broker": True,
            "delivery_info": {"exchange": message.properties.get("delivery_info", {}).get("exchange"),
                              "routing_key": message.properties.get("delivery_info", {}).get("routing_key"),
                              "priority": message.properties.get("priority"), "redelivered": False},
            "worker_pid": None}


@handler("scheduled", "dump_schedule")
def scheduled(worker: Worker) -> Any:
    """Tasks waiting for their ETA: held by this worker, and parked in the broker for the queues
    it consumes (every worker of those queues lists the parked ones); ETAs in the app's timezone."""
    consumer = worker.task_consumer
    if consumer is None:
        return []
    zone = worker.app.timezone
    items = [(r.eta or 0.0, r.message.properties.get("priority"), _info(r, worker))
             for r in list(consumer.held.values())]
    try:
        parked = worker.app.broker.scheduled([q.name for q in list(consumer.queues)])
    except Exception as exc:
        logger.warning("Could not list the tasks parked in the broker: %s", exc)
        parked = []
    items += [(when, message.properties.get("priority"), _parked_info(message, worker)) for when, message in parked]
    items.sort(key=lambda item: item[0])
    return [{"eta": dt.datetime.fromtimestamp(when, zone).isoformat(), "priority": priority or 0,
             "request": info} for when, priority, info in items]


@handler("revoked", "dump_revoked")
def revoked(worker: Worker) -> Any:
    consumer = worker.task_consumer
    return sorted(consumer.tracer.revoked) if consumer else []


@handler("registered", "dump_tasks")
def registered(worker: Worker, taskinfoitems: Any = None, builtins: bool = False) -> Any:
    names = sorted(worker.app.tasks)
    return [n for n in names if builtins or not n.startswith("celery.")]


@handler("stats")
def stats(worker: Worker) -> Any:
    consumer = worker.task_consumer
    return {
        "total": dict(worker.totals), "pid": os.getpid(), "clock": 0,
        "uptime": int(time.monotonic() - worker.started_at),
        "pool": {"implementation": worker.pool_name, "max-concurrency": worker.concurrency,
                 "autoscaler": ({"max": worker.autoscaler.max_concurrency, "min": worker.autoscaler.min_concurrency}
                                if worker.autoscaler else None)},
        "broker": {"transport": worker.app.broker_url.split("://", 1)[0],
                   "uri": mask_url(worker.app.broker_url)},
        "prefetch_count": worker.prefetch, "processed": consumer.processed if consumer else 0,
        "sw_ident": "celeriac", "sw_ver": __version__,
    }


@handler("active_queues")
def active_queues(worker: Worker) -> Any:
    result = []
    consumer = worker.task_consumer
    for queue in consumer.planned_queues() if consumer is not None else list(worker.queues):
        exchange = queue.exchange
        assert exchange is not None
        result.append({"name": queue.name, "exchange": {"name": exchange.name, "type": exchange.type},
                       "routing_key": queue.routing_key, "durable": queue.durable,
                       "auto_delete": queue.auto_delete, "max_priority": queue.max_priority})
    return result


@handler("query_task")
def query_task(worker: Worker, ids: Any = ()) -> Any:
    consumer = worker.task_consumer
    found: dict[str, Any] = {}
    if consumer is None:
        return found
    wanted = [ids] if isinstance(ids, str) else list(ids)
    for task_id in wanted:
        request = consumer.active.get(task_id)
        if request is not None:
            found[task_id] = ["active" if request.time_start is not None else "reserved", _info(request, worker)]
        elif task_id in consumer.held:
            found[task_id] = ["scheduled", _info(consumer.held[task_id], worker)]
    return found


@handler("conf", "dump_conf")
def conf(worker: Worker, with_defaults: bool = False) -> Any:
    from celeriac.config import DEFAULTS

    values = {}
    for key, value in worker.app.conf.items():
        if not with_defaults and DEFAULTS.get(key, object()) == value:
            continue
        values[key] = value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else repr(value)
    return mask_settings(values)  # passwords in URLs and secret-looking keys hidden


@handler("clock")
def clock(worker: Worker) -> Any:
    return {"clock": 0}


@handler("revoke")
def revoke(worker: Worker, task_id: Any = None, terminate: bool = False, signal: str = "SIGTERM") -> Any:
    ids = [task_id] if isinstance(task_id, str) else list(task_id or ())
    consumer = worker.task_consumer
    if consumer is None:
        return {"error": "worker not started"}
    signum = _signal_number(signal) if terminate else None
    if terminate and signum is None:
        return {"error": f"Unknown signal {signal!r}: use a name such as SIGTERM or SIGKILL, or a number."}
    # A task running here is left to finish, as in Celery (REVOKED stored now would be
    # overwritten by its result), unless terminated. One held or reserved here is settled by
    # the consumer. One this worker has not received is marked REVOKED now: the broker may keep
    # a countdown task until its ETA (Celery's worker holds it and would settle it at once).
    with consumer._lock:
        here = {tid for tid in ids if tid in consumer.active}
        running = [tid for tid in ids if tid in here and consumer.active[tid].time_start is not None]
    here |= {tid for tid in ids if tid in consumer.held}
    backend = consumer.tracer.backend
    for tid in ids:
        if tid not in here and backend is not None:
            try:
                backend.store(tid, make_meta(tid, states.REVOKED, TaskRevokedError("revoked")))
            except Exception:
                logger.exception("Could not store the REVOKED state of %s", tid)
    signalled = consumer.revoke(ids, terminate, signum)
    pool = worker.pool
    if terminate and running and pool is not None and not pool.terminates:
        # Celery's threads and solo pools refuse as well (their terminate_job is not implemented).
        logger.warning("Cannot terminate %s: the %s pool cannot stop a running task.", ", ".join(running), pool.name)
        return {"error": f"The {pool.name} pool cannot terminate a running task: {', '.join(running)} "
                         f"will run to its end (it is flagged as revoked). Start the worker with -P prefork, "
                         f"gevent or eventlet to terminate tasks."}
    if terminate:
        for tid in signalled:
            logger.info("Terminating %s (%s)", tid, signal)
        return {"ok": f"terminate: {', '.join(signalled) if signalled else 'tasks unknown'}"}
    logger.info("Tasks flagged as revoked: %s", ", ".join(ids))
    return {"ok": f"tasks {', '.join(ids)} flagged as revoked"}


def _signal_number(name: Any) -> int | None:
    """``SIGTERM``, ``TERM``, ``15`` (str or int) as a signal number; None when unknown."""
    import signal as signal_module

    if isinstance(name, int) or (isinstance(name, str) and name.isdigit()):
        return int(name)
    text = str(name).upper()
    value = getattr(signal_module, text if text.startswith("SIG") else f"SIG{text}", None)
    return int(value) if isinstance(value, signal_module.Signals) else None


@handler("rate_limit")
def rate_limit(worker: Worker, task_name: str = "", rate_limit: Any = None) -> Any:
    task = worker.app.tasks.get(task_name)
    if task is None:
        return {"error": f"unknown task {task_name}"}
    task.rate_limit = rate_limit or None
    if worker.task_consumer is not None:
        worker.task_consumer.task_changed(task_name, rate_limit=task.rate_limit)
    return {"ok": "new rate limit set successfully"}


@handler("time_limit")
def time_limit(worker: Worker, task_name: str = "", soft: Any = None, hard: Any = None) -> Any:
    task = worker.app.tasks.get(task_name)
    if task is None:
        return {"error": f"unknown task {task_name}"}
    task.soft_time_limit, task.time_limit = soft, hard
    if worker.task_consumer is not None:
        worker.task_consumer.task_changed(task_name, soft_time_limit=soft, time_limit=hard)
    return {"ok": "time limits set successfully"}


@handler("add_consumer")
def add_consumer(worker: Worker, queue: str = "", exchange: str | None = None, exchange_type: str | None = None,
                 routing_key: str | None = None, **options: Any) -> Any:
    consumer = worker.task_consumer
    if consumer is None or not queue:
        return {"error": "add_consumer needs a queue name and a running worker"}
    if any(q.name == queue for q in consumer.planned_queues()):
        return {"ok": f"already consuming from {queue!r}"}
    declared = worker.app.router.queues.get(queue)
    if declared is None or exchange or routing_key:
        declared = Queue(queue, Exchange(exchange or queue, exchange_type or "direct"), routing_key or queue)
    consumer.change_queues(add=declared)
    return {"ok": f"add consumer {queue}"}


@handler("cancel_consumer")
def cancel_consumer(worker: Worker, queue: str = "", **options: Any) -> Any:
    consumer = worker.task_consumer
    if consumer is None:
        return {"error": "worker not started"}
    names = [q.name for q in consumer.planned_queues()]
    if queue not in names:
        return {"error": f"not consuming from {queue!r}"}
    if names == [queue]:
        return {"error": f"{queue!r} is the last queue consumed; add another one first "
                         "(control add_consumer) or shut the worker down."}
    consumer.change_queues(cancel=queue)
    return {"ok": f"no longer consuming from {queue}"}


def _resize(worker: Worker, n: Any, grow: bool) -> Any:
    pool = worker.pool
    if pool is None:
        return {"error": "worker not started"}
    count = int(n) if n not in (None, "") else 1
    scaler = worker.autoscaler
    if scaler is not None:  # keep the autoscaler's limits around the size asked for
        size = pool.concurrency + (count if grow else -count)
        if grow:
            scaler.max_concurrency = max(scaler.max_concurrency, size)
        else:
            scaler.min_concurrency = min(scaler.min_concurrency, max(size, 0))
    (pool.grow if grow else pool.shrink)(count)
    worker.pool_resized(pool.concurrency)
    return {"ok": f"pool will {'grow' if grow else 'shrink'}"}


@handler("pool_grow")
def pool_grow(worker: Worker, n: Any = 1, **options: Any) -> Any:
    return _resize(worker, n, grow=True)


@handler("pool_shrink")
def pool_shrink(worker: Worker, n: Any = 1, **options: Any) -> Any:
    return _resize(worker, n, grow=False)


@handler("autoscale")
def autoscale(worker: Worker, max: Any = None, min: Any = None, **options: Any) -> Any:  # noqa: A002
    scaler = worker.autoscaler
    if scaler is None:
        return {"error": "Autoscale not enabled: start the worker with --autoscale=MAX,MIN."}
    high, low = scaler.update(int(max) if max is not None else None, int(min) if min is not None else None)
    return {"ok": f"autoscale now max={high} min={low}"}


@handler("shutdown")
def shutdown(worker: Worker, msg: str = "") -> Any:
    logger.warning("Got shutdown from remote")
    worker.stop(warm=True)
    return {"ok": "shutting down"}


@handler("enable_events")
def enable_events(worker: Worker) -> Any:
    worker.set_events(True)
    return {"ok": "task events enabled"}


@handler("disable_events")
def disable_events(worker: Worker) -> Any:
    worker.set_events(False)
    return {"ok": "task events disabled"}


@handler("heartbeat")
def heartbeat(worker: Worker) -> Any:
    if worker.heart is not None:
        worker.heart.beat("worker-heartbeat")
    return None


class Pidbox:
    """Listens on ``celery.pidbox`` in its own thread and answers commands for one worker."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.broker = worker.app.broker
        self.subscription = self.broker.subscribe(PIDBOX_EXCHANGE)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="Pidbox", daemon=True)

    def start(self) -> None:
        """Start answering."""
        self._thread.start()

    def stop(self) -> None:
        """Stop answering."""
        self._stop.set()
        self._thread.join(5)
        self.subscription.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                messages = self.subscription.fetch(0.5)
            except Exception as exc:
                logger.error("Remote control channel error: %s", exc)
                self._stop.wait(1.0)
                continue
            for message in messages:
                try:
                    self.handle(message)
                except Exception:
                    logger.exception("Remote control command failed")

    def _selected(self, body: dict[str, Any]) -> bool:
        destination = body.get("destination")
        if destination:
            return self.worker.hostname in destination
        pattern = body.get("pattern")
        if pattern:
            return fnmatch.fnmatch(self.worker.hostname, str(pattern))
        return True

    def handle(self, message: Message) -> None:
        """Run one command message and send its reply when one is asked for."""
        expires = message.headers.get("expires") if isinstance(message.headers, dict) else None
        if expires and float(expires) < time.time():
            return
        body = json_loads(message.body)
        if not isinstance(body, dict) or not self._selected(body):
            return
        method = str(body.get("method"))
        if method in IGNORED:
            return
        fn = HANDLERS.get(method)
        if fn is None:
            logger.error("No such control command: %s", method)
            reply: Any = {"error": f"No such control command: {method}"}
        else:
            try:
                reply = fn(self.worker, **(body.get("arguments") or {}))
            except Exception as exc:
                logger.exception("Control command %s failed", method)
                reply = {"error": repr(exc)}
        reply_to = body.get("reply_to")
        if isinstance(reply_to, dict) and body.get("ticket"):
            # The client declared its reply queue (exclusive on RabbitMQ for Celery's clients):
            # publish to the reply exchange only, never declare the queue from here.
            self.broker.publish(Message({"ticket": body["ticket"], "clock": 0}, {"delivery_mode": 1},
                                        json_dumps({self.worker.hostname: reply})),
                                str(reply_to.get("exchange")), str(reply_to.get("routing_key")))
