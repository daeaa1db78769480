"""The task consumer: fetch from the broker, decode, hold ETAs, rate-limit, hand to the pool.

It owns the broker consumer and runs in the worker's main thread. It fetches only as many
messages as the prefetch window allows (``concurrency * worker_prefetch_multiplier``), so a
worker never hoards what other workers could run.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celeriac import states
from celeriac.backends.base import make_meta
from celeriac.broker.base import Consumer, Delivery
from celeriac.exceptions import (
    BrokerConnectionError,
    DecodeError,
    NotRegistered,
    SoftTimeLimitExceeded,
    TimeLimitExceeded,
    WorkerLostError,
)
from celeriac.protocol import decode_task
from celeriac.serialization import AcceptPolicy
from celeriac.worker.pool import ThreadPool
from celeriac.worker.queues import SwitchingConsumer
from celeriac.worker.request import Request
from celeriac.worker.timer import Timer
from celeriac.worker.trace import Tracer, run_payload

if TYPE_CHECKING:
    from celeriac.app import Celeriac
    from celeriac.routing import Queue
    from celeriac.worker.pool import Pool

__all__ = ["TaskConsumer", "TokenBucket", "parse_rate"]

logger = logging.getLogger("celeriac.worker")


def parse_rate(rate: Any) -> float | None:
    """``"10/s"``, ``"100/m"``, ``"5/h"`` or a number (per second) as tasks per second."""
    if rate in (None, "", 0, "0"):
        return None
    if isinstance(rate, (int, float)):
        return float(rate)
    count, _, unit = str(rate).partition("/")
    seconds = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(unit.strip()[:1] or "s")
    if seconds is None:
        raise ValueError(f"Invalid rate limit {rate!r}: use 'N/s', 'N/m' or 'N/h'.")
    return float(count) / seconds


class TokenBucket:
    """A token bucket of capacity 1 (Celery's per-task rate limit)."""

    __slots__ = ("next_free", "rate")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.next_free = 0.0

    def reserve(self) -> float:
        """Take the next slot; return how long to wait for it (0 when free now)."""
        now = time.monotonic()
        start = max(now, self.next_free)
        self.next_free = start + 1.0 / self.rate
        return start - now


#: Seconds a task may have taken last time to be run by the leader itself (see TaskConsumer.run).
SHORT_TASK = 0.002
#: Seconds between the watchdog's looks at a task run by the leader: the longest, give or take
#: the GIL, a surprisingly long one keeps the loop from fetching before a pool thread leads on.
WATCH_INTERVAL = 0.01
#: Seconds with no task run by the leader after which the watchdog stops looking (and waits
#: to be woken by the next one).
WATCH_IDLE = 1.0


def _ignore(_result: Any) -> None:
    pass


class TaskConsumer:
    """Moves messages from the broker to the pool until :meth:`stop`."""

    def __init__(self, app: Celeriac, consumer: Consumer, pool: Pool, hostname: str,
                 prefetch: int, fetch_timeout: float = 1.0, time_limit: float | None = None,
                 soft_time_limit: float | None = None, queues: list[Queue] | None = None) -> None:
        self.app = app
        self.consumer = consumer
        #: The queues consumed; the same list as the worker's, changed in place by
        #: :meth:`change_queues` (``control add_consumer`` / ``cancel_consumer``).
        self.queues: list[Queue] = queues if queues is not None else []
        self._queue_changes: list[tuple[str, Queue | str]] = []
        self.pool = pool
        self.hostname = hostname
        self.prefetch = prefetch if prefetch > 0 else 1000
        self.fetch_timeout = fetch_timeout
        self.tracer = Tracer(app, consumer, hostname)
        self.accept = AcceptPolicy(app.conf.get("accept_content") or ["json"])
        #: Runs time limits (never pool submissions: those stay in the consumer thread).
        self.timer = Timer()
        # Requests waiting for their ETA ("eta") or their rate limit ("submit"), as a heap of
        # (unix time, sequence, kind, request); touched by the consumer thread only.
        self._deferred: list[tuple[float, int, str, Request]] = []
        self._sequence = itertools.count()
        self.reserved = 0
        self.active: dict[str, Request] = {}
        self.held: dict[str, Request] = {}
        self.processed = 0
        self.totals: dict[str, int] = {}
        self._lock = threading.Lock()
        #: True while the delivery being handled is the last one fetched (leader only).
        self._alone = False
        #: Held by the thread running the loop (see :meth:`run`).
        self._leader = threading.Lock()
        #: Per thread: ``gave_away`` once a leader gave the loop to a pool thread (_run_here).
        self._here = threading.local()
        #: The task the leader runs itself: its sequence number and start (monotonic s; 0.0
        #: when none runs), read by the watchdog (:meth:`_watch`) without a lock.
        self._inline_seq = 0
        self._inline_since = 0.0
        #: Set to wake the watchdog once it stopped looking (``_watch_idle`` True).
        self._watch_wake = threading.Event()
        self._watch_idle = True
        #: Task name -> seconds its last run took (threads pool), for choosing where it runs.
        self._last_runtime: dict[str, float] = {}
        self._backoff = 1.0
        self._capacity = threading.Event()
        self._stopping = threading.Event()
        self._buckets: dict[str, TokenBucket | None] = {}
        self._rate_limits_enabled = not app.conf.get("worker_disable_rate_limits")
        self._default_time_limit = time_limit if time_limit is not None else app.conf.get("task_time_limit")
        self._default_soft_limit = (soft_time_limit if soft_time_limit is not None
                                    else app.conf.get("task_soft_time_limit"))

    # -- loop ---------------------------------------------------------------------------------

    def run(self) -> None:
        """Consume until :meth:`stop` is called.

        The thread running the loop (fetching and dispatching) is the *leader*: the calling
        thread, or with the ``threads`` pool one of its threads (the pool gets one thread more
        than its concurrency for it). There an idle worker's only task runs in the leader
        itself when it took less than :data:`SHORT_TASK` last time: no hand-off to another
        thread, and no other thread woken (a round trip's latency). Meanwhile the calling
        thread watches (:meth:`_watch`): if the task runs on, it asks a pool thread to lead
        on. Returns once stopped, with no thread leading."""
        pool = self.pool
        if isinstance(pool, ThreadPool):
            pool.add_leader_thread()
            pool.apply_async(self._lead, (True,), _ignore)
            self._watch()
            with self._leader:  # the leader lets go within fetch_timeout
                return
        with self._leader:
            while not self._stopping.is_set():
                self._turn()

    def _watch(self) -> None:
        """Until stopped: while the leader runs tasks itself, look every
        :data:`WATCH_INTERVAL` seconds whether one runs on, and then ask a pool thread to lead
        the loop meanwhile. Waits for the next such task after :data:`WATCH_IDLE` seconds
        without one, so an idle worker wakes for nothing."""
        stopping = self._stopping
        handled = 0  # the last inline task a pool thread was asked to take over from
        last_seen = time.monotonic()
        while not stopping.is_set():
            if self._watch_idle:
                self._watch_wake.wait(self.fetch_timeout)
                self._watch_wake.clear()
                last_seen = time.monotonic()
                continue
            stopping.wait(WATCH_INTERVAL)
            now = time.monotonic()
            seq, since = self._inline_seq, self._inline_since
            if since:
                last_seen = now
                if seq != handled and now - since >= WATCH_INTERVAL:
                    handled = seq
                    self.pool.apply_async(self._lead, (False,), _ignore)
            elif now - last_seen >= WATCH_IDLE:
                self._watch_idle = True
                if self._inline_since:  # one began as the watchdog went idle: look on
                    self._watch_idle = False

    def _lead(self, wait: bool = True) -> None:
        """Lead the loop in a pool thread, until this thread runs a task itself or the
        consumer stops.

        ``wait``: False when the watchdog asks for a take-over: lead only if the loop is free
        now (the leader running a task itself may have taken it back meanwhile)."""
        if not self._leader.acquire(blocking=wait):
            return
        leading = True
        try:
            while leading and not self._stopping.is_set():
                try:
                    leading = self._turn()  # False: given away (released), this thread ran a task
                except Exception:  # the loop must go on, as the consumer thread's would
                    logger.exception("The task consumer's loop failed; going on")
                    self._stopping.wait(1.0)
        finally:
            if leading:
                self._leader.release()

    def _turn(self) -> bool:
        """One turn of the loop (leader only); False when this thread gave the loop away to run
        a task itself (it no longer leads)."""
        self.loop_at = time.monotonic()  # the loop's last turn, for the liveness file
        if self._queue_changes:
            self._apply_queue_changes()
        next_due = self._run_due()
        self.run_pending()
        window = self.prefetch - self.reserved
        if window <= 0:
            self.consumer.flush()
            self._capacity.wait(0.05 if next_due is None else min(0.05, next_due))
            self._capacity.clear()
            return True
        timeout = self.fetch_timeout if next_due is None else min(self.fetch_timeout, next_due)
        try:
            deliveries = self.consumer.fetch(window, timeout)
            self._backoff = 1.0
        except BrokerConnectionError as exc:
            logger.error("Connection to the broker lost: %s. Trying again in %.0f s.", exc, self._backoff)
            self._stopping.wait(self._backoff)
            self._backoff = min(self._backoff * 2, 30.0)
            return True
        here = self._here
        here.gave_away = False
        last = len(deliveries) - 1
        for index, delivery in enumerate(deliveries):
            self._alone = index == last
            self.on_delivery(delivery)
        if here.gave_away:
            return False
        self._alone = False
        return True

    def run_pending(self) -> None:
        """Run what the pool was given to run in this thread (a consuming pool process runs
        its tasks between fetches); nothing for other pools. Consumer thread only."""

    def stop(self) -> None:
        """Stop fetching (the loop ends within ``fetch_timeout``)."""
        self._stopping.set()
        self._capacity.set()
        self._watch_wake.set()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stopping.is_set()

    # -- receiving ----------------------------------------------------------------------------

    def on_delivery(self, delivery: Delivery) -> None:
        """Decode one delivery and schedule it; bad messages are rejected and logged once."""
        headers = delivery.message.headers if isinstance(delivery.message.headers, dict) else {}
        task_id = headers.get("id") or delivery.message.properties.get("correlation_id")
        try:
            message = decode_task(delivery.message, self.accept)
        except DecodeError as exc:
            logger.error("Rejected message %s from queue %s: %s", task_id or "<no id>", delivery.queue, exc)
            self._reject_bad(delivery, task_id, exc)
            return
        except Exception as exc:
            logger.error("Rejected malformed message %s from queue %s: %r", task_id or "<no id>",
                         delivery.queue, exc)
            self._reject_bad(delivery, task_id, exc)
            return
        task = self.app.tasks.get(message.name)
        if task is None:
            error = NotRegistered(f"Received unregistered task of type {message.name!r}.")
            logger.error("%s The message %s was rejected. Did you import the module that defines "
                         "it (include=[...])?", error, message.id)
            self._reject_bad(delivery, message.id, error)
            return
        try:
            request = Request(task, message, delivery, self.hostname)
        except Exception as exc:
            logger.error("Rejected task %s[%s]: bad headers: %r", message.name, message.id, exc)
            self._reject_bad(delivery, message.id, exc)
            return
        if request.time_limit is None:
            request.time_limit = self._default_time_limit
        if request.soft_time_limit is None:
            request.soft_time_limit = self._default_soft_limit
        if logger.isEnabledFor(logging.INFO):
            logger.info("Task %s[%s] received", request.name, request.id)
        events = self.tracer.events
        if events is not None:
            headers = message.headers
            events.send("task-received", uuid=request.id, name=request.name, args=headers.get("argsrepr"),
                        kwargs=headers.get("kwargsrepr"), root_id=headers.get("root_id"),
                        parent_id=headers.get("parent_id"), retries=headers.get("retries"),
                        eta=headers.get("eta"), expires=headers.get("expires"))
        if request.id in self.tracer.revoked or (request.expires is not None and request.expires < time.time()):
            # Celery checks at receipt too: an ETA task revoked before it arrived is settled now.
            self.tracer.discard(request, "revoked" if request.id in self.tracer.revoked else "expired")
            return
        if request.eta is not None and request.eta > time.time():
            self.held[request.id] = request
            self._defer(request.eta, "eta", request)
            return
        self.dispatch(request)

    def _reject_bad(self, delivery: Delivery, task_id: str | None, exc: BaseException) -> None:
        try:
            self.consumer.reject(delivery, requeue=False)
        except Exception:
            logger.exception("Could not reject message %s", task_id)
        backend = self.tracer.backend
        if task_id and backend is not None and isinstance(task_id, str):
            try:
                backend.store(task_id, make_meta(task_id, states.FAILURE, exc),
                              reply_to=delivery.message.properties.get("reply_to"),
                              correlation_id=task_id)
            except Exception:
                logger.exception("Could not store the failure of message %s", task_id)

    # -- queues -------------------------------------------------------------------------------

    def change_queues(self, add: Queue | None = None, cancel: str | None = None) -> None:
        """Start consuming ``add`` and/or stop consuming the queue named ``cancel``.

        Thread-safe: the change is applied by the consumer thread within ``fetch_timeout``."""
        with self._lock:
            if add is not None:
                self._queue_changes.append(("add", add))
            if cancel is not None:
                self._queue_changes.append(("cancel", cancel))

    @staticmethod
    def _with_changes(queues: list[Queue], changes: list[tuple[str, Queue | str]]) -> list[Queue]:
        out = list(queues)
        for action, value in changes:
            if action == "add" and not isinstance(value, str) and value.name not in {q.name for q in out}:
                out.append(value)
            elif action == "cancel":
                out = [q for q in out if q.name != value]
        return out

    def planned_queues(self) -> list[Queue]:
        """The queues consumed once the pending ``add_consumer``/``cancel_consumer`` commands are
        applied (they are within ``fetch_timeout``): what remote control reports. Thread-safe."""
        with self._lock:
            changes = list(self._queue_changes)
        return self._with_changes(list(self.queues), changes)

    def _apply_queue_changes(self) -> None:
        with self._lock:
            changes, self._queue_changes = self._queue_changes, []
        queues = self._with_changes(list(self.queues), changes)
        if [q.name for q in queues] == [q.name for q in self.queues]:
            return
        known = {q.name for q in self.queues}
        for queue in queues:
            if queue.name not in known:
                self.app.broker.declare(queue)
        switching = self.consumer
        if not isinstance(switching, SwitchingConsumer):
            switching = SwitchingConsumer(lambda qs: self.app.broker.consumer(qs, self.prefetch), self.consumer)
        with self._lock:
            outstanding = [r.delivery for r in (*self.active.values(), *self.held.values())]
        outstanding += [entry[3].delivery for entry in self._deferred]
        try:
            switching.switch(queues, outstanding)
        except Exception:
            logger.exception("Could not change the queues consumed to %s", ", ".join(q.name for q in queues))
            return
        self.consumer = self.tracer.consumer = switching
        self.queues[:] = queues
        logger.info("Consuming from %s", ", ".join(q.name for q in queues) or "no queue")

    # -- deferred work (ETA, rate limits): consumer thread only ------------------------------

    def _defer(self, when: float, kind: str, request: Request) -> None:
        heapq.heappush(self._deferred, (when, next(self._sequence), kind, request))

    def _run_due(self) -> float | None:
        """Dispatch what is due; return seconds until the next deferred request (None: none)."""
        deferred = self._deferred
        while deferred:
            now = time.time()
            if deferred[0][0] > now:
                return deferred[0][0] - now
            _, _, kind, request = heapq.heappop(deferred)
            if kind == "submit":
                self._submit(request)
            elif self.held.pop(request.id, None) is not None:  # not revoked meanwhile
                self.dispatch(request)
        return None

    def task_changed(self, name: str, **settings: Any) -> None:
        """``control rate_limit`` / ``time_limit`` set ``settings`` on task ``name``: the next
        request of it uses them (its rate limit bucket is made anew). Thread-safe."""
        self._buckets.pop(name, None)

    # -- dispatching --------------------------------------------------------------------------

    def _bucket(self, request: Request) -> TokenBucket | None:
        name = request.task.name
        if name not in self._buckets:
            rate = request.task.rate_limit or self.app.conf.get("task_default_rate_limit")
            parsed = parse_rate(rate) if self._rate_limits_enabled else None
            self._buckets[name] = TokenBucket(parsed) if parsed else None
        return self._buckets[name]

    def dispatch(self, request: Request) -> None:
        """Send ``request`` to the pool now, or when its rate limit allows."""
        with self._lock:
            self.reserved += 1
        bucket = self._bucket(request)
        if bucket is not None:
            wait = bucket.reserve()
            if wait > 0:
                self._defer(time.time() + wait, "submit", request)
                return
        self._submit(request)

    def _submit(self, request: Request) -> None:
        if self.pool.process_based and request.id in self.tracer.revoked:
            # A pool process has none of the revoked ids: the parent discards it.
            self.tracer.discard(request, "revoked")
            self._on_done(request)
            return
        with self._lock:
            self.active[request.id] = request
        if self.pool.process_based:
            request.handle = self.pool.apply_async(
                run_payload, (request.to_payload(),), lambda outcome: self._on_process_done(request, outcome),
                on_start=lambda: self._on_start(request))
        else:
            # Bound to the request: a pool may report an exception instead of what _execute
            # returned (a soft time limit landing as the job ended).
            def done(_result: Any) -> None:
                self._on_done(request)

            if (self._alone and self.reserved == 1 and isinstance(self.pool, ThreadPool)
                    and self._last_runtime.get(request.name, 0.0) < SHORT_TASK):
                # The only task in flight, a short one, and no other delivery at hand: run it
                # here (see run).
                self._run_here(request, done)
            else:
                request.handle = self.pool.apply_async(self._execute, (request,), done)

    def _run_here(self, request: Request, done: Callable[[Any], None]) -> None:
        """Run ``request`` in the leader thread; the loop is free meanwhile, for a pool thread
        the watchdog (:meth:`_watch`) sends if the task runs on."""
        pool = self.pool
        assert isinstance(pool, ThreadPool)
        self._alone = False
        self._here.gave_away = True
        handle = request.handle = pool.handle_here()
        self._inline_seq += 1
        self._inline_since = time.monotonic()
        if self._watch_idle:
            self._watch_idle = False
            self._watch_wake.set()
        self._leader.release()
        try:
            outcome = pool.run_here(handle, self._execute, (request,))
        finally:
            self._inline_since = 0.0
        done(outcome)
        if self._leader.acquire(blocking=False):  # nobody took over: lead on, caches warm
            self._here.gave_away = False

    def _on_start(self, request: Request) -> None:
        """A pool slot started ``request``: note the time and start its time limits.

        Called in the pool's thread: the slot thread of a process pool (which acks early here,
        as Celery does; ``acks_late`` waits for the end), or the thread running the task."""
        request.time_start = time.time()
        if self.pool.process_based and not request.acks_late:
            self.tracer.ack(request)
        if self.pool.soft_time_limits:
            timers = request.limit_timers
            if request.soft_time_limit:
                timers.append(self.timer.call_later(
                    float(request.soft_time_limit), lambda: self._interrupt(request, SoftTimeLimitExceeded)))
            if request.time_limit:
                timers.append(self.timer.call_later(
                    float(request.time_limit), lambda: self._interrupt(request, TimeLimitExceeded)))

    def _interrupt(self, request: Request, exc_type: type[BaseException]) -> None:
        if request.id in self.active and self.pool.raise_soft_timeout(request.handle, exc_type):
            logger.warning("Task %s[%s]: %s", request.name, request.id, exc_type.__name__)

    def _execute(self, request: Request) -> Request:
        if self._stopping.is_set() and not request.acked:
            # Warm shutdown: work not started yet goes back to the broker.
            self.tracer.reject(request, requeue=True)
            return request
        self._on_start(request)
        if not isinstance(self.pool, ThreadPool):
            return self.tracer.run(request)
        started = time.monotonic()
        try:
            return self.tracer.run(request)
        finally:
            self._last_runtime[request.name] = time.monotonic() - started

    def _on_process_done(self, request: Request, outcome: Any) -> None:
        """Apply a pool process's ack decision (or handle its death) in the parent."""
        tracer = self.tracer
        try:
            if outcome == "ack":
                tracer.ack(request)
            elif outcome == "revoked":
                tracer.discard(request, "revoked")
            elif isinstance(outcome, str) and outcome.startswith("terminated "):
                tracer.discard(request, "terminated", int(outcome.split()[1]))
            elif outcome in ("reject", "requeue", "notstarted"):
                tracer.reject(request, requeue=outcome != "reject")
            elif outcome == "timeout":
                error: BaseException = TimeLimitExceeded(f"Task {request.name}[{request.id}] exceeded its "
                                                         f"hard time limit of {request.time_limit} s.")
                logger.error("%s The process running it was killed.", error)
                tracer._on_failure(request, error, f"TimeLimitExceeded: {error}\n")
                tracer.ack(request)
            else:
                if request.acks_late and request.task.reject_on_worker_lost:
                    logger.error("The process running %s[%s] died; requeued (reject_on_worker_lost).",
                                 request.name, request.id)
                    tracer.reject(request, requeue=True)
                else:
                    error = WorkerLostError(f"The process running {request.name}[{request.id}] died "
                                            f"unexpectedly ({outcome}).")
                    logger.error("%s", error)
                    tracer._on_failure(request, error, f"WorkerLostError: {error}\n")
                    tracer.ack(request)
        except Exception:
            logger.exception("Could not settle task %s[%s]", request.name, request.id)
        self._on_done(request)

    def _on_done(self, request: Request) -> None:
        for entry in request.limit_timers:
            self.timer.cancel(entry)
        request.limit_timers.clear()
        with self._lock:
            self.reserved -= 1
            self.processed += 1
            self.active.pop(request.id, None)
            name = request.task.name
            self.totals[name] = self.totals.get(name, 0) + 1
            idle = self.reserved == 0
        if idle:
            # Nothing else in flight to batch acks with: they may go now, after the task's
            # result (not with the next delivery, which they would delay).
            self.consumer.on_idle()
        self._capacity.set()

    # -- revokes ------------------------------------------------------------------------------

    def revoke(self, ids: list[str], terminate: bool = False, signum: int | None = None) -> list[str]:
        """Revoke ``ids`` (``control revoke``): they never start here; a held (ETA) or reserved
        one is settled at once (REVOKED stored, message acked). With ``terminate``, the
        process running one is sent ``signum`` (process pools; a task it kills ends REVOKED).
        Returns the ids of running tasks signalled. Thread-safe."""
        tracer = self.tracer
        tracer.revoked.update(ids)
        signalled: list[str] = []
        for task_id in ids:
            held = self.held.pop(task_id, None)
            if held is not None:
                tracer.discard(held, "revoked")
                continue
            with self._lock:
                request = self.active.get(task_id)
            if request is None:
                continue
            if request.time_start is None:
                self.pool.discard(request.handle)  # else the task sees it is revoked when it starts
            elif terminate and signum is not None and self.pool.terminate(request.handle, signum):
                signalled.append(task_id)
        return signalled

    # -- shutdown -----------------------------------------------------------------------------

    def requeue_held(self) -> None:
        """Give deferred messages (ETA or rate limit) back to the broker (warm shutdown).

        Call it from the consumer's thread once :meth:`run` has returned."""
        deferred, self._deferred = self._deferred, []
        for _, _, kind, request in deferred:
            if kind == "submit":
                with self._lock:
                    self.reserved -= 1
            elif self.held.pop(request.id, None) is None:
                continue
            self.tracer.reject(request, requeue=True)
        self.held.clear()

    def close(self) -> None:
        """Stop the timer and close the broker consumer (unacked messages are requeued)."""
        self.timer.stop()
        try:
            self.consumer.flush()
        finally:
            self.consumer.close()
