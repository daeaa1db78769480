"""What a monitor knows about workers and tasks, folded from the events they send.

:class:`EventState` is pure: it takes event dicts (as :meth:`celeriac.events.EventReceiver.itercapture`
yields them, with Celery's field names) and keeps the latest picture of every worker and of the
most recent tasks. It does no I/O and keeps bounded memory (``max_tasks``, ``max_workers``, and
every text field cut to :data:`MAX_FIELD` characters), so a monitor can run for days::

    state = EventState()
    for event in EventReceiver(app).itercapture():
        state.fold(event)
        print(state.workers, state.recent_tasks()[:10])

An event that is not understood (not a dict, no type, an unknown type, a task event without a
``uuid``, a worker event without a ``hostname``) is counted in ``malformed`` or ``unknown`` and
otherwise ignored; a field of the wrong type is dropped, never raised on.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

from celeriac import states

__all__ = ["MAX_FIELD", "TASK_EVENT_STATES", "WORKER_EVENTS", "EventState", "TaskInfo", "WorkerInfo"]

MAX_FIELD = 4096
"""Longest text kept for one field (args, result, traceback, ...); the rest is cut with ``...``."""

TASK_EVENT_STATES = {
    "task-sent": states.PENDING,
    "task-received": states.RECEIVED,
    "task-started": states.STARTED,
    "task-succeeded": states.SUCCESS,
    "task-failed": states.FAILURE,
    "task-retried": states.RETRY,
    "task-revoked": states.REVOKED,
    "task-rejected": states.REJECTED,
}
"""The state a task is in after each task event type."""

WORKER_EVENTS = frozenset({"worker-online", "worker-heartbeat", "worker-offline"})
"""The worker event types (each one also counts as a sign of life, except ``worker-offline``)."""

# Text fields copied from task events when present (and not None).
_TASK_TEXT = ("name", "args", "kwargs", "result", "exception", "traceback", "root_id", "parent_id",
              "eta", "expires", "queue", "routing_key", "exchange")
# When each state was entered, by event type.
_TASK_TIMES = {"task-sent": "sent", "task-received": "received", "task-started": "started",
               "task-succeeded": "finished", "task-failed": "finished", "task-revoked": "finished",
               "task-retried": "finished", "task-rejected": "finished"}


def _text(value: Any) -> str | None:
    """``value`` as bounded text, or None when it is None."""
    if value is None:
        return None
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= MAX_FIELD else text[:MAX_FIELD - 3] + "..."


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None when it is not a number (bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number == number and abs(number) != float("inf") else None


def _count(value: Any) -> int | None:
    """``value`` as a non-negative int, or None."""
    number = _number(value)
    return int(number) if number is not None and number >= 0 else None


@dataclass
class WorkerInfo:
    """One worker as its events describe it. Times are this machine's clock (``time.time()``)."""

    hostname: str
    offline: bool = False
    active: int | None = None
    processed: int | None = None
    freq: float = 2.0
    last_heartbeat: float | None = None
    last_seen: float | None = None
    loadavg: tuple[float, ...] = ()
    sw_ident: str | None = None
    sw_ver: str | None = None
    pid: int | None = None

    def status(self, now: float | None = None) -> str:
        """``online``, ``offline`` (it said goodbye) or ``lost`` (no news for three heartbeats)."""
        if self.offline:
            return "offline"
        heard = max((t for t in (self.last_heartbeat, self.last_seen) if t is not None), default=None)
        now = time.time() if now is None else now
        if heard is not None and now - heard > max(self.freq, 1.0) * 3:
            return "lost"
        return "online"

    def heartbeat_age(self, now: float | None = None) -> float | None:
        """Seconds since the last ``worker-online``/``worker-heartbeat``, or None before the first."""
        if self.last_heartbeat is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.last_heartbeat)


@dataclass
class TaskInfo:
    """One task as its events describe it. ``*_at`` times are the worker's event timestamps."""

    uuid: str
    seq: int
    state: str = states.PENDING
    name: str | None = None
    hostname: str | None = None
    args: str | None = None
    kwargs: str | None = None
    result: str | None = None
    exception: str | None = None
    traceback: str | None = None
    runtime: float | None = None
    retries: int | None = None
    root_id: str | None = None
    parent_id: str | None = None
    eta: str | None = None
    expires: str | None = None
    queue: str | None = None
    routing_key: str | None = None
    exchange: str | None = None
    sent_at: float | None = None
    received_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    state_timestamp: float | None = None
    events: list[str] = field(default_factory=list)

    def fields(self) -> list[tuple[str, str]]:
        """(label, text) for every field that is known, in the order a detail view shows them."""
        out: list[tuple[str, str | None]] = [
            ("UUID", self.uuid), ("Name", self.name), ("State", self.state), ("Worker", self.hostname),
            ("Args", self.args), ("Kwargs", self.kwargs), ("Result", self.result),
            ("Exception", self.exception),
            ("Runtime", None if self.runtime is None else f"{self.runtime:.6f}s"),
            ("Retries", None if self.retries is None else str(self.retries)),
            ("Sent", _clock(self.sent_at)), ("Received", _clock(self.received_at)),
            ("Started", _clock(self.started_at)), ("Finished", _clock(self.finished_at)),
            ("ETA", self.eta), ("Expires", self.expires), ("Root id", self.root_id),
            ("Parent id", self.parent_id), ("Queue", self.queue), ("Routing key", self.routing_key),
            ("Events", " > ".join(self.events) or None), ("Traceback", self.traceback)]
        return [(label, text) for label, text in out if text]


def _clock(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) + f".{int(timestamp % 1 * 1000):03d}"
    except (OverflowError, OSError, ValueError):
        return None


class EventState:
    """Workers and the last ``max_tasks`` tasks, updated by :meth:`fold` one event at a time.

    Not thread-safe: fold and read from one thread (a monitor's UI thread drains a queue that a
    receiver thread fills).
    """

    def __init__(self, max_tasks: int = 1000, max_workers: int = 200) -> None:
        self.max_tasks = max(1, max_tasks)
        self.max_workers = max(1, max_workers)
        self.workers: dict[str, WorkerInfo] = {}
        # Least recently updated first, so the oldest news is evicted first.
        self.tasks: OrderedDict[str, TaskInfo] = OrderedDict()
        self.event_count = 0
        self.by_type: Counter[str] = Counter()
        self.malformed = 0
        self.unknown = 0
        self._seq = itertools.count()

    def fold(self, event: object, now: float | None = None) -> bool:
        """Apply one event; True when it was understood, False when it was counted and ignored.

        ``now`` is when it arrived (default: the event's ``local_received``, else ``time.time()``).
        Never raises on bad input.
        """
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            self.malformed += 1
            return False
        kind: str = event["type"]
        if now is None:
            now = _number(event.get("local_received")) or time.time()
        if kind in TASK_EVENT_STATES:
            applied = self._fold_task(kind, event, now)
        elif kind in WORKER_EVENTS:
            applied = self._fold_worker(kind, event, now)
        else:
            self.unknown += 1
            return False
        if not applied:
            self.malformed += 1
            return False
        self.event_count += 1
        self.by_type[kind] += 1
        return True

    def _worker(self, hostname: str) -> WorkerInfo:
        worker = self.workers.get(hostname)
        if worker is None:
            if len(self.workers) >= self.max_workers:
                stale = min(self.workers.values(), key=lambda w: w.last_seen or 0.0)
                del self.workers[stale.hostname]
            worker = self.workers[hostname] = WorkerInfo(hostname)
        return worker

    def _fold_worker(self, kind: str, event: dict[str, Any], now: float) -> bool:
        hostname = event.get("hostname")
        if not isinstance(hostname, str) or not hostname:
            return False
        worker = self._worker(_text(hostname) or hostname)
        worker.last_seen = now
        worker.offline = kind == "worker-offline"
        if not worker.offline:
            worker.last_heartbeat = now
        for name in ("active", "processed", "pid"):
            value = _count(event.get(name))
            if value is not None:
                setattr(worker, name, value)
        freq = _number(event.get("freq"))
        if freq is not None and freq > 0:
            worker.freq = freq
        load = event.get("loadavg")
        if isinstance(load, (list, tuple)):
            worker.loadavg = tuple(n for n in (_number(x) for x in load[:3]) if n is not None)
        for name in ("sw_ident", "sw_ver"):
            if event.get(name) is not None:
                setattr(worker, name, _text(event[name]))
        return True

    def _fold_task(self, kind: str, event: dict[str, Any], now: float) -> bool:
        uuid = event.get("uuid")
        if not isinstance(uuid, str) or not uuid:
            return False
        uuid = _text(uuid) or uuid
        task = self.tasks.get(uuid)
        if task is None:
            if len(self.tasks) >= self.max_tasks:
                self.tasks.popitem(last=False)
            task = self.tasks[uuid] = TaskInfo(uuid, next(self._seq))
        else:
            self.tasks.move_to_end(uuid)
        timestamp = _number(event.get("timestamp"))
        # Events can arrive out of order (several workers, several connections): a state is
        # replaced only by one at least as recent, but every field an event carries is kept.
        if timestamp is None or task.state_timestamp is None or timestamp >= task.state_timestamp:
            task.state = TASK_EVENT_STATES[kind]
            if timestamp is not None:
                task.state_timestamp = timestamp
        if len(task.events) < 32:
            task.events.append(kind[5:])
        setattr(task, _TASK_TIMES[kind] + "_at", timestamp if timestamp is not None else now)
        for name in _TASK_TEXT:
            if event.get(name) is not None:
                setattr(task, name, _text(event[name]))
        runtime = _number(event.get("runtime"))
        if runtime is not None:
            task.runtime = runtime
        retries = _count(event.get("retries"))
        if retries is not None:
            task.retries = retries
        hostname = event.get("hostname")
        if isinstance(hostname, str) and hostname:
            task.hostname = _text(hostname)
            self._worker(task.hostname or hostname).last_seen = now
        return True

    def recent_tasks(self) -> list[TaskInfo]:
        """Tracked tasks, the most recently seen first (by their first event)."""
        return sorted(self.tasks.values(), key=lambda t: t.seq, reverse=True)

    def state_counts(self) -> Counter[str]:
        """How many tracked tasks are in each state."""
        return Counter(task.state for task in self.tasks.values())
