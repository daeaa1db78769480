"""The prefork pool with children that consume themselves (``worker_direct_consume = True``).

Each child opens its own broker connection with a prefetch of ``worker_prefetch_multiplier``
(the worker's total stays concurrency x multiplier, as in Celery) and runs what it receives
inline (:mod:`celeriac_prefork.direct_child`): no per-task message between parent and child.

The parent reads the memory it shares with each child only when it needs it:

- a hard time limit: the child writes the running task's deadline; the parent's I/O thread
  checks it every :data:`_CHECK_INTERVAL` and kills the child when it passes;
- a child that died: the parent stores what Celery stores for its running task
  (``WorkerLostError``, ``TimeLimitExceeded``, or REVOKED after ``revoke --terminate``) from the
  payload in shared memory, with errbacks and chord as usual. Its late-acked or not-yet-acked
  message comes back from the broker marked redelivered; a child asks the parent before running
  such a message, and the parent answers "drop" for a task it settled (Celery acks those) and
  "run" otherwise (``reject_on_worker_lost``, a message from another worker);
- ``inspect active/reserved/scheduled/stats`` ask the children over the socket pair; revokes,
  queue changes and warm shutdown are sent to every child.

Rate limits apply per child (each child has its own token bucket per task), not per worker.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import pickle
import selectors
import signal
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from celeriac.broker.base import Consumer, Delivery
from celeriac.routing import Queue
from celeriac.worker.consumer import TaskConsumer
from celeriac.worker.pool import Callback
from celeriac.worker.request import Request

from celeriac_prefork import child as classic
from celeriac_prefork.direct_child import (
    DEADLINE_OFFSET,
    PAYLOAD_LEN,
    PAYLOAD_OFFSET,
    SHM_SIZE,
    ChildSpec,
    direct_child_main,
    read_frames,
    send_frame,
)
from celeriac_prefork.forking import ForkingPool

__all__ = ["DirectConsumer", "DirectPreforkPool"]

logger = logging.getLogger("celeriac.worker")

#: Seconds between the I/O thread's checks of hard time limits and of the children's health.
_CHECK_INTERVAL = 0.1
#: Seconds :meth:`DirectPreforkPool.start` waits for the first children to consume.
_READY_TIMEOUT = 30.0
#: Seconds ``inspect`` waits for the children's answers.
_QUERY_TIMEOUT = 2.0
#: A child that exits sooner than this (seconds) after it started delays the next fork, by
#: twice as long each time up to ``_RESPAWN_MAX`` seconds.
_QUICK_EXIT = 1.0
_RESPAWN_MAX = 10.0
#: Task ids settled after their process was lost, kept to answer a redelivery ("drop").
_SETTLED_MAX = 10000


class _Slot:
    __slots__ = ("born", "deadline", "killed", "lock", "process", "retiring", "shared", "shm", "sock")

    def __init__(self, process: Any, sock: socket.socket, shm: mmap.mmap) -> None:
        self.process = process
        self.sock = sock
        self.lock = threading.Lock()  # whole frames to the child
        self.shm = shm
        self.shared = memoryview(shm)[:PAYLOAD_OFFSET].cast("q")
        self.deadline = memoryview(shm)[DEADLINE_OFFSET:DEADLINE_OFFSET + 8].cast("d")
        #: (sequence, outcome) when the parent killed the child in that task.
        self.killed: tuple[int, str] | None = None
        self.retiring = False
        self.born = time.monotonic()

    def running(self) -> tuple[int, dict[str, Any]] | None:
        """The sequence number and payload of the task the child runs now, or None."""
        shared = self.shared
        seq = shared[classic.STARTED]
        if seq == shared[classic.FINISHED]:
            return None
        size = shared[PAYLOAD_LEN]
        body = bytes(self.shm[PAYLOAD_OFFSET:PAYLOAD_OFFSET + size])
        if shared[classic.STARTED] != seq:  # moved on while we read
            return None
        try:
            return seq, pickle.loads(body)
        except Exception:
            logger.exception("Cannot read the task pool process %s runs", self.process.pid)
            return None


class _Handle:
    """What ``inspect`` shows as the worker process of a request."""

    __slots__ = ("pid",)

    def __init__(self, pid: int | None) -> None:
        self.pid = pid


class _SettledRecorder(Consumer):
    """The parent's "consumer": the messages of tasks it settles belong to a dead child's
    channel. An ack or a reject without requeue records the id, so that the redelivered
    message is dropped; a requeue records nothing (the message runs again)."""

    def __init__(self) -> None:
        self.settled: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def _record(self, delivery: Delivery) -> None:
        headers = delivery.message.headers if isinstance(delivery.message.headers, dict) else {}
        task_id = headers.get("id")
        if task_id:
            with self._lock:
                self.settled[task_id] = None
                while len(self.settled) > _SETTLED_MAX:
                    self.settled.popitem(last=False)

    def fetch(self, max_count: int, timeout: float) -> list[Delivery]:
        return []

    def ack(self, delivery: Delivery) -> None:
        self._record(delivery)

    def reject(self, delivery: Delivery, requeue: bool = False) -> None:
        if not requeue:
            self._record(delivery)

    def is_settled(self, task_id: str) -> bool:
        with self._lock:
            return task_id in self.settled

    def close(self) -> None:
        pass


class DirectConsumer(TaskConsumer):
    """The worker's task consumer when the children consume: what remote control and the
    worker ask of a task consumer, answered from the children."""

    def __init__(self, app: Any, pool: DirectPreforkPool, hostname: str, prefetch: int,
                 fetch_timeout: float, time_limit: float | None, soft_time_limit: float | None,
                 queues: list[Queue]) -> None:
        self.recorder = _SettledRecorder()
        self._direct_pool = pool
        super().__init__(app, self.recorder, pool, hostname, prefetch, fetch_timeout, time_limit,
                         soft_time_limit, queues=queues)

    # Views of the children's state; TaskConsumer.__init__ assigns these, the setters ignore it.
    def _snapshots(self) -> list[dict[str, Any]]:
        return self._direct_pool.query()

    def _requests(self, key: str) -> dict[str, Request]:
        out: dict[str, Request] = {}
        for snap in self._snapshots():
            for payload in snap[key]:
                try:
                    request = Request.from_payload(self.app, payload)
                except Exception:
                    continue
                request.time_start = payload.get("time_start")
                request.eta = payload.get("eta")
                request.handle = _Handle(snap.get("pid"))
                out[request.id] = request
        return out

    @property  # type: ignore[override]
    def active(self) -> dict[str, Request]:
        """Running and reserved tasks of every child (asked now)."""
        return self._requests("active")

    @active.setter
    def active(self, value: Any) -> None:
        pass

    @property  # type: ignore[override]
    def held(self) -> dict[str, Request]:
        """Tasks the children hold for their ETA (asked now)."""
        return self._requests("held")

    @held.setter
    def held(self, value: Any) -> None:
        pass

    @property  # type: ignore[override]
    def reserved(self) -> int:
        """Tasks the children received and have not finished (asked now)."""
        return sum(snap.get("reserved", 0) for snap in self._snapshots())

    @reserved.setter
    def reserved(self, value: Any) -> None:
        pass

    @property  # type: ignore[override]
    def processed(self) -> int:
        """Tasks the children finished."""
        return self._direct_pool.processed()

    @processed.setter
    def processed(self, value: Any) -> None:
        pass

    @property  # type: ignore[override]
    def totals(self) -> dict[str, int]:
        """Tasks finished per name (children asked now, and those that exited)."""
        out = dict(self._direct_pool.exited_totals)
        for snap in self._snapshots():
            for name, count in snap["totals"].items():
                out[name] = out.get(name, 0) + count
        return out

    @totals.setter
    def totals(self, value: Any) -> None:
        pass

    def run(self) -> None:
        """Wait until :meth:`stop` (the children do the consuming)."""
        while not self._stopping.wait(min(1.0, self.fetch_timeout)):
            self.loop_at = time.monotonic()

    def change_queues(self, add: Queue | None = None, cancel: str | None = None) -> None:
        if add is not None:
            self.app.broker.declare(add)
        with self._lock:
            self.queues[:] = self._with_changes(list(self.queues), [("add", add)] if add else [])
            if cancel is not None:
                self.queues[:] = [q for q in self.queues if q.name != cancel]
        self._direct_pool.broadcast(("queues", add, cancel))
        logger.info("Consuming from %s", ", ".join(q.name for q in self.queues) or "no queue")

    def planned_queues(self) -> list[Queue]:
        with self._lock:
            return list(self.queues)

    def revoke(self, ids: list[str], terminate: bool = False, signum: int | None = None) -> list[str]:
        self.tracer.revoked.update(ids)
        self._direct_pool.broadcast(("revoke", list(ids)))
        if terminate and signum is not None:
            return self._direct_pool.terminate_ids(set(ids), signum)
        return []

    def task_changed(self, name: str, **settings: Any) -> None:
        self._direct_pool.broadcast(("task", name, settings))

    def settle(self, payload: dict[str, Any], outcome: str) -> None:
        """Settle the task a dead child was running (called by the pool's I/O thread)."""
        try:
            request = Request.from_payload(self.app, payload)
        except Exception:
            logger.exception("Cannot settle task %s lost with its process", payload.get("headers", {}).get("id"))
            return
        request.time_start = time.time()
        self._on_process_done(request, outcome)

    def _on_done(self, request: Request) -> None:
        pass

    def requeue_held(self) -> None:
        pass  # the children give back what they hold when they stop

    def close(self) -> None:
        self.timer.stop()


class DirectPreforkPool(ForkingPool):
    """``-P prefork`` with ``worker_direct_consume``: forked children that consume themselves."""

    name = "prefork"
    soft_time_limits = True
    terminates = True
    process_based = True
    consumes_directly = True

    def __init__(self, concurrency: int = 1, app: Any = None, max_tasks_per_child: int | None = None,
                 max_memory_per_child: int | None = None, **options: Any) -> None:
        super().__init__(concurrency, app, max_tasks_per_child, max_memory_per_child, **options)
        self.consumer: DirectConsumer | None = None
        self._spec: dict[str, Any] = {}
        self._slots: list[_Slot] = []
        self._new_slots: list[_Slot] = []
        self._queries = itertools.count(1)
        self._replies: dict[int, list[dict[str, Any]]] = {}
        self._processed_base = 0
        #: Tasks finished per name by children that exited cleanly.
        self.exited_totals: dict[str, int] = {}
        self._respawn_at = 0.0
        self._respawn_delay = 0.0
        self._ready = 0  # children that reported they consume

    def direct_consumer(self, hostname: str, queues: list[Queue], prefetch_multiplier: int,
                        fetch_timeout: float, time_limit: float | None,
                        soft_time_limit: float | None) -> TaskConsumer:
        """The worker's task consumer for this pool; call before :meth:`start`."""
        self._spec = dict(hostname=hostname, prefetch=max(1, prefetch_multiplier),
                          fetch_timeout=fetch_timeout, time_limit=time_limit,
                          soft_time_limit=soft_time_limit)
        self.consumer = DirectConsumer(self.app, self, hostname, self.concurrency * max(1, prefetch_multiplier),
                                       fetch_timeout, time_limit, soft_time_limit, queues)
        return self.consumer

    def apply_async(self, target: Callable[..., Any], args: tuple[Any, ...], callback: Callback,
                    on_start: Callable[[], None] | None = None) -> Any:
        raise RuntimeError("The children of this pool consume their tasks themselves.")

    # -- children ------------------------------------------------------------------------------

    def _spawn(self) -> _Slot:
        consumer = self.consumer
        if consumer is None:
            raise RuntimeError("Call direct_consumer() before starting the pool.")
        shm = mmap.mmap(-1, SHM_SIZE)
        memoryview(shm)[:PAYLOAD_OFFSET].cast("q")[classic.EVENTS] = int(self._events)
        spec = ChildSpec(self.app, queues=list(consumer.planned_queues()),
                         max_tasks=self.max_tasks_per_child, max_memory=self.max_memory_per_child,
                         revoked=set(consumer.tracer.revoked),
                         share=self.concurrency,
                         **self._spec)
        process, parent_end = self._fork(
            direct_child_main, lambda child_end, inherited: (child_end, shm, spec, inherited))
        return _Slot(process, parent_end, shm)

    def start(self) -> None:
        self._open_wake_pipe()
        slots = [self._spawn() for _ in range(self.concurrency)]
        with self._lock:
            self._slots.extend(slots)
            self._new_slots.extend(slots)
        self._io = threading.Thread(target=self._io_loop, name="PoolIO", daemon=True)
        self._io.start()
        # The worker says it is ready once its children consume (their connections are up).
        deadline = time.monotonic() + _READY_TIMEOUT
        with self._lock:
            while self._ready < len(slots):
                left = deadline - time.monotonic()
                if left <= 0:
                    logger.warning("%d of %d pool processes are not consuming yet (connecting to "
                                   "the broker); they start when they can", len(slots) - self._ready,
                                   len(slots))
                    break
                self._changed.wait(left)

    def grow(self, n: int = 1) -> None:
        slots = [self._spawn() for _ in range(n)]
        with self._lock:
            self._slots.extend(slots)
            self._new_slots.extend(slots)
            self.concurrency += n
        self._wake()

    def shrink(self, n: int = 1) -> None:
        with self._lock:
            n = min(n, self.concurrency - 1)
            self.concurrency -= n
            live = [s for s in self._slots if not s.retiring]
            # idle children first
            live.sort(key=lambda s: s.shared[classic.STARTED] != s.shared[classic.FINISHED])
            chosen = live[:n]
            for slot in chosen:
                slot.retiring = True
        for slot in chosen:
            self._send(slot, ("stop",))

    def _send(self, slot: _Slot, message: tuple[Any, ...]) -> bool:
        try:
            send_frame(slot.sock, slot.lock, message)
            return True
        except OSError:
            return False

    def broadcast(self, message: tuple[Any, ...]) -> None:
        """Send ``message`` to every live child."""
        with self._lock:
            slots = list(self._slots)
        for slot in slots:
            self._send(slot, message)

    def query(self, timeout: float = _QUERY_TIMEOUT) -> list[dict[str, Any]]:
        """Every live child's :func:`~celeriac_prefork.direct_child.snapshot`."""
        n = next(self._queries)
        with self._lock:
            slots = [s for s in self._slots if s.process.is_alive()]
            self._replies[n] = []
        asked = sum(self._send(slot, ("query", n)) for slot in slots)
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._replies[n]) < asked:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            return self._replies.pop(n)

    def processed(self) -> int:
        """Tasks finished by the children, those that exited included."""
        with self._lock:
            return self._processed_base + sum(s.shared[classic.FINISHED] for s in self._slots)

    def terminate_ids(self, ids: set[str], signum: int) -> list[str]:
        """Send ``signum`` to the children running one of ``ids``; return the ids signalled."""
        with self._lock:
            slots = list(self._slots)
        signalled = []
        for slot in slots:
            running = slot.running()
            if running is None:
                continue
            seq, payload = running
            task_id = payload["headers"].get("id")
            if task_id not in ids:
                continue
            slot.killed = (seq, f"terminated {signum}")
            try:
                os.kill(slot.process.pid, signum)
            except ProcessLookupError:
                continue
            signalled.append(task_id)
        return signalled

    def set_task_events(self, enabled: bool) -> None:
        with self._lock:
            self._events = enabled
            for slot in self._slots:
                slot.shared[classic.EVENTS] = int(enabled)

    # -- the I/O thread ------------------------------------------------------------------------

    def _io_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ, None)
            buffers: dict[_Slot, bytearray] = {}
            while True:
                try:
                    if self._serve_once(selector, buffers):
                        return
                except Exception:  # the pool must outlive one bad turn (a failed store, ...)
                    logger.exception("The prefork pool's I/O thread failed; going on")
                    time.sleep(_CHECK_INTERVAL)

    def _serve_once(self, selector: selectors.BaseSelector, buffers: dict[_Slot, bytearray]) -> bool:
        """One turn of the I/O thread; True once the pool is closed."""
        if self._new_slots:
            with self._lock:
                new, self._new_slots = self._new_slots, []
            for slot in new:
                buffers[slot] = bytearray()
                selector.register(slot.sock, selectors.EVENT_READ, slot)
                selector.register(slot.process.sentinel, selectors.EVENT_READ, slot)
        for key, _mask in selector.select(_CHECK_INTERVAL):
            slot = key.data
            if slot is None:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except OSError:
                    pass
            elif slot in buffers:
                if key.fileobj is slot.sock:
                    self._on_readable(slot, buffers)
                else:
                    self._on_exit(selector, buffers, slot)
            else:  # a child already settled (in this turn both its sentinel and socket fired)
                try:
                    selector.unregister(key.fd)  # by number: its socket may be closed (fd -1)
                except (KeyError, ValueError):
                    pass
        if self._closing:
            for slot in list(buffers):
                self._on_exit(selector, buffers, slot)
            return True
        self._check(selector, buffers)
        return False

    def _check(self, selector: selectors.BaseSelector, buffers: dict[_Slot, bytearray]) -> None:
        """Hard time limits, and children that died without the sentinel telling yet."""
        now = time.monotonic()
        for slot in list(buffers):
            deadline = slot.deadline[0]
            if deadline and now >= deadline and slot.killed is None:
                running = slot.running()
                if running is not None:
                    seq, payload = running
                    slot.killed = (seq, "timeout")
                    logger.error("Hard time limit (%ss) exceeded for %s[%s]; killing pool process %s",
                                 payload.get("time_limit"), payload["headers"].get("task"),
                                 payload["headers"].get("id"), slot.process.pid)
                    try:
                        os.kill(slot.process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            if not slot.process.is_alive():
                self._on_exit(selector, buffers, slot)
        if self._respawn_at and now >= self._respawn_at:
            self._respawn_at = 0.0
            self._replace_missing()

    def _on_readable(self, slot: _Slot, buffers: dict[_Slot, bytearray]) -> None:
        try:
            data = slot.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            return  # the sentinel reports the exit
        buf = buffers[slot]
        buf += data
        for message in read_frames(buf):
            self._on_message(slot, buffers, message)

    def _on_message(self, slot: _Slot, buffers: dict[_Slot, bytearray], message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ready":
            with self._lock:
                self._ready += 1
                self._changed.notify_all()
        elif kind == "reply":
            with self._lock:
                replies = self._replies.get(message[1])
                if replies is not None:
                    replies.append(message[2])
                    self._changed.notify_all()
        elif kind == "totals":
            with self._lock:
                for name, count in message[1].items():
                    self.exited_totals[name] = self.exited_totals.get(name, 0) + count
        elif kind == "ask":
            # A redelivered task: settle any child that died first (its message is what came back).
            for other in list(buffers):
                if other is not slot and not other.process.is_alive():
                    self._on_exit_quiet(other, buffers)
            consumer = self.consumer
            settled = consumer is not None and consumer.recorder.is_settled(message[2])
            self._send(slot, ("answer", message[1], "drop" if settled else "run"))

    def _on_exit_quiet(self, slot: _Slot, buffers: dict[_Slot, bytearray]) -> None:
        # Deferred unregistering: the selector is not at hand here; the next _check finishes it.
        self._settle_exit(slot)

    def _on_exit(self, selector: selectors.BaseSelector, buffers: dict[_Slot, bytearray], slot: _Slot) -> None:
        if buffers.pop(slot, None) is None:
            return
        # Read what the child sent last (its totals when it exited cleanly).
        try:
            slot.sock.setblocking(False)
            tail = bytearray()
            while True:
                data = slot.sock.recv(65536)
                if not data:
                    break
                tail += data
        except OSError:
            pass
        for message in read_frames(tail) if tail else []:
            self._on_message(slot, buffers, message)
        selector.unregister(slot.sock)
        selector.unregister(slot.process.sentinel)
        self._settle_exit(slot)
        self._forget_parent_end(slot.sock)
        slot.sock.close()
        if time.monotonic() - slot.born < _QUICK_EXIT and slot.process.exitcode and not slot.retiring:
            # A child that cannot even start (an import error, ...): fork the next one later.
            self._respawn_delay = min(max(2 * self._respawn_delay, 0.5), _RESPAWN_MAX)
            self._respawn_at = time.monotonic() + self._respawn_delay
            logger.error("Pool process %s exited %.1f s after it started (exit code %s); the next "
                         "one starts in %.1f s", slot.process.pid, time.monotonic() - slot.born,
                         slot.process.exitcode, self._respawn_delay)
        else:
            self._respawn_delay = 0.0
        self._replace_missing()

    def _replace_missing(self) -> None:
        """Fork children until the pool has :attr:`concurrency` of them (I/O thread)."""
        if self._stopping or time.monotonic() < self._respawn_at:
            return
        with self._lock:
            missing = self.concurrency - sum(1 for s in self._slots if not s.retiring)
        for _ in range(missing):
            try:
                new = self._spawn()
            except Exception:
                logger.exception("Could not fork a pool process")
                return
            with self._lock:
                self._slots.append(new)
                self._new_slots.append(new)

    def _settle_exit(self, slot: _Slot) -> None:
        """Remove a dead child and settle the task it was running (once)."""
        with self._lock:
            if slot not in self._slots:
                return
            self._slots.remove(slot)
        process = slot.process
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)
        running = slot.running()
        with self._lock:
            self._processed_base += slot.shared[classic.FINISHED]
            self._changed.notify_all()
        if running is not None and self.consumer is not None:
            seq, payload = running
            killed = slot.killed
            outcome = killed[1] if killed is not None and killed[0] == seq else \
                f"lost (exit code {process.exitcode})"
            self.consumer.settle(payload, outcome)

    # -- stopping ------------------------------------------------------------------------------

    def stop(self, wait: bool = True) -> None:
        """Warm (``wait``): every child stops fetching, finishes its task, gives back what it
        holds and exits. Cold: the children are killed (their running tasks are lost)."""
        with self._lock:
            self._stopping = True
            slots = list(self._slots)
        if wait:
            for slot in slots:
                self._send(slot, ("stop",))
            with self._lock:
                while self._slots:
                    self._changed.wait(0.5)
        else:
            for slot in slots:
                try:
                    slot.process.kill()
                except Exception:
                    pass
        self._closing = True
        self._wake()
        if self._io is not None:
            self._io.join(30)
