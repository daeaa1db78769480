"""A pool process that consumes from the broker itself (``worker_direct_consume``).

The child opens its own broker connection and runs the worker's task consumer with the tasks
executed inline, so a task costs the parent nothing. What the parent must know without asking
is in the memory it shares with the child (:data:`LAYOUT`): the task running now (its sequence
number and :meth:`Request.to_payload`), its hard time limit, and how many tasks the child ran.
Everything else travels over the socket pair as :data:`FRAME` frames of pickled tuples:

parent -> child: ``("query", n)``, ``("revoke", ids)``, ``("queues", add, cancel)``,
``("answer", n, decision)``, ``("stop",)``.
child -> parent: ``("ready",)`` (consuming), ``("reply", n, snapshot)``, ``("ask", n, task_id)``
(may a redelivered task run?), ``("totals", counts)`` (when it exits).
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from celeriac.broker.base import Delivery
from celeriac.exceptions import BrokerConnectionError
from celeriac.routing import Queue
from celeriac.worker.consumer import TaskConsumer, TokenBucket
from celeriac.worker.pool import Callback, Pool
from celeriac.worker.request import Request
from celeriac.worker.worker import flush_log_handlers

from celeriac_prefork import child as classic

__all__ = ["DEADLINE_OFFSET", "FRAME", "PAYLOAD_MAX", "PAYLOAD_OFFSET", "SHM_SIZE", "ChildSpec",
           "direct_child_main", "read_frames", "send_frame"]

logger = logging.getLogger("celeriac.worker")

#: Shared memory of one child. Signed 64-bit integers at the classic slot indexes
#: (``STARTED``, ``FINISHED``, ``SOFT``, ``EVENTS``) and :data:`PAYLOAD_LEN`; a double at
#: :data:`DEADLINE_OFFSET` (the running task's hard limit, ``time.monotonic()`` seconds, 0 for
#: none); the running task's pickled payload from :data:`PAYLOAD_OFFSET`.
PAYLOAD_LEN = 5
DEADLINE_OFFSET = 48
PAYLOAD_OFFSET = 64
#: Bytes of payload kept; a larger one is kept without its arguments.
PAYLOAD_MAX = 64 * 1024
SHM_SIZE = PAYLOAD_OFFSET + PAYLOAD_MAX
LAYOUT = "q x 6, d, payload"  # documentation only
#: Headers kept of a task whose payload is too large for the shared memory.
_KEPT_HEADERS = ("id", "task", "root_id", "parent_id", "group", "group_index", "ignore_result")
#: A frame: the body's size in bytes, then the pickle.
FRAME = struct.Struct("<I")
#: Seconds a child waits for the parent's answer about a redelivered task before running it.
ASK_TIMEOUT = 10.0


def send_frame(sock: socket.socket, lock: threading.Lock, message: tuple[Any, ...]) -> None:
    """Send one pickled ``message`` (blocking, whole frame under ``lock``)."""
    body = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    with lock:
        sock.sendall(FRAME.pack(len(body)) + body)


def read_frames(buf: bytearray) -> list[tuple[Any, ...]]:
    """Take the whole frames out of ``buf``; a partial one stays."""
    out = []
    pos, size_all, head = 0, len(buf), FRAME.size
    while size_all - pos >= head:
        (size,) = FRAME.unpack_from(buf, pos)
        end = pos + head + size
        if end > size_all:
            break
        out.append(pickle.loads(buf[pos + head:end]))
        pos = end
    if pos:
        del buf[:pos]
    return out


class ChildSpec:
    """What a consuming child needs from the worker (picklable plain data and the app)."""

    def __init__(self, app: Any, hostname: str, queues: list[Queue], prefetch: int,
                 fetch_timeout: float, time_limit: float | None, soft_time_limit: float | None,
                 max_tasks: int | None, revoked: set[str], share: int = 1,
                 max_memory: int | None = None) -> None:
        self.app = app
        self.hostname = hostname
        self.queues = queues
        self.prefetch = prefetch
        self.fetch_timeout = fetch_timeout
        self.time_limit = time_limit
        self.soft_time_limit = soft_time_limit
        self.max_tasks = max_tasks
        #: KiB of peak resident memory after which the child stops, after its task.
        self.max_memory = max_memory
        self.revoked = revoked
        #: The worker's processes: each applies ``1 / share`` of a rate limit.
        self.share = share


class _InlinePool(Pool):
    """Runs each task in the child's consuming thread; soft limits by SIGUSR1 (classic child)."""

    name = "prefork"
    soft_time_limits = True

    def __init__(self, shared: memoryview) -> None:
        super().__init__(1)
        self._shared = shared
        #: Jobs received and not started: ``[target, args, callback]`` (the list is the handle).
        self.pending: deque[list[Any]] = deque()
        self.lock = threading.Lock()
        #: Settles a request whose job :meth:`discard` dropped (set by the consumer).
        self.on_discard: Callable[[Any], None] | None = None

    def apply_async(self, target: Callable[..., Any], args: tuple[Any, ...], callback: Callback,
                    on_start: Callable[[], None] | None = None) -> Any:
        # Run by ChildConsumer.run_pending once the batch fetched is received: until then
        # the tasks count as reserved (inspect reserved, warm shutdown).
        job = [target, args, callback]
        with self.lock:
            self.pending.append(job)
        return job

    def take(self) -> list[Any] | None:
        """The next job to run, or None."""
        with self.lock:
            return self.pending.popleft() if self.pending else None

    def discard(self, handle: Any) -> bool:
        """Drop a revoked job that has not started and settle it at once (another task may be
        running: Celery settles a revoked reserved task without waiting for it)."""
        with self.lock:
            try:
                self.pending.remove(handle)
            except ValueError:
                return False
        if self.on_discard is not None:
            self.on_discard(handle[1][0])
        handle[2](None)
        return True

    def raise_soft_timeout(self, handle: Any, exc_type: type[BaseException]) -> bool:
        from celeriac.exceptions import SoftTimeLimitExceeded

        shared = self._shared
        # The hard limit is the parent's (it kills this process); handle is the job's sequence.
        if not isinstance(handle, int) or not issubclass(exc_type, SoftTimeLimitExceeded):
            return False
        if shared[classic.STARTED] != handle or shared[classic.FINISHED] >= handle:
            return False
        shared[classic.SOFT] = handle
        os.kill(os.getpid(), signal.SIGUSR1)
        return True


class ChildConsumer(TaskConsumer):
    """The worker's task consumer inside a consuming child: publishes the running task in
    shared memory, asks the parent before running a redelivered task, stops after
    ``max_tasks`` tasks."""

    def __init__(self, spec: ChildSpec, shared: memoryview, shm: Any, ask: Callable[[str], str]) -> None:
        app = spec.app
        consumer = app.broker.consumer(spec.queues, spec.prefetch)
        self._inline = _InlinePool(shared)
        super().__init__(app, consumer, self._inline, spec.hostname, spec.prefetch,
                         spec.fetch_timeout, spec.time_limit, spec.soft_time_limit,
                         queues=list(spec.queues))
        self.tracer.revoked.update(spec.revoked)
        self._inline.on_discard = lambda request: self.tracer.discard(request, "revoked")
        self._shared = shared
        self._deadline = memoryview(shm)[DEADLINE_OFFSET:DEADLINE_OFFSET + 8].cast("d")
        self._payload = memoryview(shm)[PAYLOAD_OFFSET:PAYLOAD_OFFSET + PAYLOAD_MAX]
        self._ask = ask
        self._max_tasks = spec.max_tasks
        self._max_memory = spec.max_memory
        self._share = max(1, spec.share)
        self._events = -1
        self._seq = 0
        #: The request running now (consumer thread), for :meth:`parent_lost`.
        self.current: Request | None = None

    def run_pending(self) -> None:
        take = self._inline.take
        while True:
            job = take()
            if job is None:
                return
            target, args, callback = job
            callback(target(*args))

    def parent_lost(self) -> None:
        """The worker's main process died. Its connection is gone, so in Celery a late-acked
        task comes back from the broker to run again: this process dies at once if it runs one
        (the broker requeues what it holds). An early-acked task is finished, with its result
        stored, as a Celery pool process would; then this process gives back what it holds and
        exits."""
        self.stop()
        current = self.current
        if current is not None and not current.acked:
            logger.error("The worker's main process is gone: pool process %s exits; task %s[%s] "
                         "goes back to the broker", os.getpid(), current.name, current.id)
            flush_log_handlers()
            os.kill(os.getpid(), signal.SIGKILL)

    def set_task(self, name: str, settings: dict[str, Any]) -> None:
        """``control rate_limit`` / ``time_limit`` reached this process. A rate limit is shared
        out: each of the worker's processes takes ``1 / share`` of it."""
        task = self.app.tasks.get(name)
        if task is None:
            return
        for key, value in settings.items():
            setattr(task, key, value)
        self.task_changed(name)

    def _bucket(self, request: Request) -> TokenBucket | None:
        name = request.task.name
        if name not in self._buckets:
            bucket = super()._bucket(request)
            if bucket is not None:  # this process's share of the worker's rate
                bucket.rate /= self._share
            self._buckets[name] = bucket
        return self._buckets[name]

    def _sync_events(self) -> None:
        flag = self._shared[classic.EVENTS]
        if flag != self._events:
            self._events = flag
            if not flag:
                self.tracer.events = None
            elif self.tracer.events is None:
                from celeriac.events import EventDispatcher

                self.tracer.events = EventDispatcher(self.app.broker, self.hostname)

    def on_delivery(self, delivery: Delivery) -> None:
        if self._shared[classic.EVENTS] != self._events:
            self._sync_events()
        super().on_delivery(delivery)

    def _publish_running(self, request: Request, seq: int) -> None:
        payload = request.to_payload()
        body = pickle.dumps(payload, pickle.HIGHEST_PROTOCOL)
        if len(body) > PAYLOAD_MAX:  # keep what settling a lost task needs, not its arguments
            payload.update(args=[], kwargs={})
            body = pickle.dumps(payload, pickle.HIGHEST_PROTOCOL)
            if len(body) > PAYLOAD_MAX:  # huge headers or links: the id and name at least
                headers = payload["headers"]
                payload.update(embed={}, headers={k: headers[k] for k in _KEPT_HEADERS if k in headers})
                body = pickle.dumps(payload, pickle.HIGHEST_PROTOCOL)
                if len(body) > PAYLOAD_MAX:
                    body = b""  # the parent then logs that it cannot settle the task
        self._payload[:len(body)] = body
        shared = self._shared
        shared[PAYLOAD_LEN] = len(body)
        self._deadline[0] = time.monotonic() + float(request.time_limit) if request.time_limit else 0.0
        shared[classic.STARTED] = seq

    def _execute(self, request: Request) -> Request:
        if self.stopping and not request.acked:
            self.tracer.reject(request, requeue=True)  # stopping: back to the broker
            return request
        if request.delivery.redelivered and self._ask(request.id) == "drop":
            logger.warning("Task %s[%s] dropped: it was settled when the process running it was "
                           "lost", request.name, request.id)
            self.tracer.ack(request)
            return request
        self._seq += 1
        seq = self._seq
        request.handle = seq
        self._publish_running(request, seq)
        self.current = request
        try:
            return super()._execute(request)
        finally:
            self.current = None
            self._deadline[0] = 0.0
            self._shared[classic.FINISHED] = seq
            if self._max_tasks and seq >= self._max_tasks:
                self.stop()
            elif self._max_memory and classic.over_memory(self._max_memory):
                self.stop()


class _Link:
    """The child's end of the socket pair: a reader thread for the parent's commands, and the
    question about redelivered tasks."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.consumer: ChildConsumer | None = None
        self._answers: dict[int, str] = {}
        self._answered = threading.Condition()
        self._next = 0
        #: Set by a stop command or the parent's exit (also before the consumer exists).
        self.stopped = threading.Event()

    def ask(self, task_id: str) -> str:
        with self._answered:
            self._next += 1
            n = self._next
        try:
            send_frame(self.sock, self.lock, ("ask", n, task_id))
        except OSError:
            return "run"
        deadline = time.monotonic() + ASK_TIMEOUT
        with self._answered:
            while n not in self._answers:
                left = deadline - time.monotonic()
                if left <= 0:
                    logger.warning("No answer from the worker about redelivered task %s; running it",
                                   task_id)
                    return "run"
                self._answered.wait(left)
            return self._answers.pop(n)

    def serve(self) -> None:
        buf = bytearray()
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:  # the parent is gone (killed): stop
                self.stopped.set()
                consumer = self.consumer
                if consumer is not None:
                    consumer.parent_lost()
                return
            buf += data
            for message in read_frames(buf):
                try:
                    self._on_command(message)
                except Exception:
                    logger.exception("Pool process: command %r failed", message[0])

    def _on_command(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        consumer = self.consumer
        if kind == "answer":
            with self._answered:
                self._answers[message[1]] = message[2]
                self._answered.notify_all()
        elif kind == "stop":
            self.stopped.set()
            if consumer is not None:
                consumer.stop()
        elif kind == "query":  # before the consumer exists (connecting): nothing to show yet
            reply = snapshot(consumer) if consumer is not None else {
                "active": [], "held": [], "totals": {}, "pid": os.getpid(), "reserved": 0}
            send_frame(self.sock, self.lock, ("reply", message[1], reply))
        elif consumer is None:
            return
        elif kind == "revoke":
            consumer.revoke(list(message[1]))
        elif kind == "queues":
            consumer.change_queues(add=message[1], cancel=message[2])
        elif kind == "task":
            consumer.set_task(message[1], message[2])


def _entry(request: Request) -> dict[str, Any]:
    payload = request.to_payload()
    payload["time_start"] = request.time_start
    payload["eta"] = request.eta
    return payload


def snapshot(consumer: ChildConsumer) -> dict[str, Any]:
    """The child's tasks for ``inspect``: ``active`` (running and reserved, as payloads with
    ``time_start``), ``held`` (waiting for an ETA) and ``totals`` per task name."""
    with consumer._lock:
        active = [_entry(r) for r in consumer.active.values()]
        totals = dict(consumer.totals)
    held = [_entry(r) for r in list(consumer.held.values())]
    return {"active": active, "held": held, "totals": totals, "pid": os.getpid(),
            "reserved": consumer.reserved}


def _connect(spec: ChildSpec, shared: memoryview, shm: Any, link: _Link) -> ChildConsumer | None:
    """The child's consumer, once the broker answers (retried as the worker retries its own
    connection); None when told to stop first."""
    delay = 1.0
    while True:
        try:
            consumer = ChildConsumer(spec, shared, shm, link.ask)
        except BrokerConnectionError as exc:
            logger.error("Pool process %s cannot connect to the broker: %s. Trying again in %.0f s.",
                         os.getpid(), exc, delay)
            if link.stopped.wait(delay):
                return None
            delay = min(delay * 2, 30.0)
            continue
        link.consumer = consumer
        if link.stopped.is_set():
            consumer.stop()
        try:
            send_frame(link.sock, link.lock, ("ready",))
        except OSError:
            pass
        return consumer


def direct_child_main(sock: socket.socket, shm: Any, spec: ChildSpec, inherited: list[Any]) -> None:
    """The life of a consuming child: consume and run tasks until told to stop (or the parent
    is gone, or ``max_tasks`` ran), then give back what it fetched and did not start."""
    shared = memoryview(shm)[:PAYLOAD_OFFSET].cast("q")
    classic.prepare_process(inherited, shared)
    link = _Link(sock)
    reader = threading.Thread(target=link.serve, name="PoolLink", daemon=True)
    reader.start()
    try:
        consumer = _connect(spec, shared, shm, link)
        if consumer is None:
            return
        consumer.run()
        consumer.requeue_held()
        consumer.close()
        try:
            send_frame(sock, link.lock, ("totals", dict(consumer.totals)))
        except OSError:
            pass
        try:
            spec.app.close()  # this process's own connections (results and events sent)
        except Exception:
            logger.exception("Pool process %s: could not close its connections", os.getpid())
    except Exception:
        logger.exception("Pool process %s failed", os.getpid())
        raise
    finally:
        flush_log_handlers()  # the process ends with os._exit: no atexit, no logging.shutdown
