"""The prefork pool: one forked child process per slot.

The parent writes each job to a child over a socket pair as one frame (a fixed header and a
pickle), from the thread that submits it; one I/O thread in the parent reads the children's
answers (the ack decisions), several per system call, and watches for their deaths. A dead
child is replaced.

Pipelining: while more jobs wait than children are idle, a child whose last job was short gets
a second job behind the one it runs, so it goes on without waiting for the parent. The second
job counts as started (``on_start``) when the first one's answer arrives: the child starts it
right after sending that answer. A second job that has waited behind a long one while another
child is idle is taken back (:meth:`PreforkPool._take_back`): the child and the parent agree
under a lock shared with the child whether it was started, so a job never runs twice.

Time limits: a soft limit sends SIGUSR1, and the child raises ``SoftTimeLimitExceeded`` only if
it still runs the job the limit was meant for (memory shared with the child holds the sequence
numbers of the jobs it started and finished); a hard limit kills the child unless it has
already finished that job.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import multiprocessing
import os
import pickle
import selectors
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from celeriac.exceptions import SoftTimeLimitExceeded
from celeriac.worker.pool import Callback

from celeriac_prefork.child import (
    CANCEL,
    EVENTS,
    FINISHED,
    HEAD,
    RETIRE,
    SHARED_SIZE,
    SOFT,
    STARTED,
    child_main,
)
from celeriac_prefork.forking import ForkingPool

__all__ = ["PreforkPool"]

logger = logging.getLogger("celeriac.worker")

#: Pipeline a second job only behind jobs that ran at most this long (seconds), and only small
#: frames (for a large one the hand-off is not what costs; it would wait in the parent's buffer).
_PIPELINE_RUNTIME = 0.01
_PIPELINE_BYTES = 16 * 1024
#: Take a pipelined job back when it has waited this long (seconds) while a child is idle.
_TAKE_BACK_AFTER = 0.02
#: The I/O thread's longest wait (seconds) between checks that the children are alive.
_CHECK_INTERVAL = 0.5


class _Job:
    """One submitted call; also the handle the worker uses for time limits."""

    __slots__ = ("body", "callback", "done", "killed", "on_start", "pid", "sent_at", "seq", "slot",
                 "started")

    def __init__(self, body: bytes, callback: Callback, on_start: Callable[[], None] | None) -> None:
        self.body = body
        self.callback = callback
        self.on_start = on_start
        #: The child's pid once sent (``inspect active`` shows it).
        self.pid: int | None = None
        self.slot: _Slot | None = None
        self.seq = 0
        self.sent_at = 0.0
        self.started = False
        self.done = False
        self.killed: str | None = None


def _report(job: _Job, outcome: Any) -> None:
    try:
        job.callback(outcome)
    except Exception:
        logger.exception("The pool's result callback failed")


class _Slot:
    """A child process, its socket, and the jobs sent to it that have not answered yet."""

    __slots__ = ("cancelled", "dead", "fast", "inflight", "lock", "process", "rbuf", "replace",
                 "retiring", "sent", "shared", "shm", "sock", "wbuf", "writing")

    def __init__(self, process: Any, sock: socket.socket, lock: Any, shm: mmap.mmap,
                 shared: memoryview) -> None:
        self.process = process
        self.sock = sock
        self.lock = lock
        self.shm = shm
        self.shared = shared
        #: Jobs sent and not answered, oldest first; the first one is running.
        self.inflight: deque[_Job] = deque()
        self.rbuf = bytearray()
        #: What a send could not write at once (a large frame): the I/O thread writes it.
        self.wbuf = bytearray()
        self.writing = False
        #: Jobs sent to this child (for ``max_tasks_per_child``).
        self.sent = 0
        #: True while its last job ran for at most ``_PIPELINE_RUNTIME``.
        self.fast = False
        #: The sequence number of a job taken back that the child has not passed yet.
        self.cancelled = 0
        #: No more jobs: retire once the jobs in flight have answered (``replace``: fork another).
        self.retiring = False
        self.replace = False
        self.dead = False

    def can_take(self, limit: int | None) -> bool:
        return not (self.retiring or self.dead) and (not limit or self.sent < limit)


class PreforkPool(ForkingPool):
    """``-P prefork``: ``concurrency`` forked child processes."""

    name = "prefork"
    soft_time_limits = True
    terminates = True
    process_based = True

    def __init__(self, concurrency: int = 1, app: Any = None, max_tasks_per_child: int | None = None,
                 max_memory_per_child: int | None = None, **options: Any) -> None:
        super().__init__(concurrency, app, max_tasks_per_child, max_memory_per_child, **options)
        self._initializer: tuple[Callable[..., Any], tuple[Any, ...]] | None = None
        #: Jobs not sent yet, in order.
        self._queue: deque[_Job] = deque()
        self._slots: list[_Slot] = []
        self._seq = itertools.count(1)
        self._abandon = False
        # Slots the I/O thread must start watching; processes retired, to reap.
        self._new_slots: list[_Slot] = []
        self._exiting: list[Any] = []
        self._want_write = False
        self._chunk = bytearray(65536)  # the I/O thread's receive buffer
        self._chunk_view = memoryview(self._chunk)
        self._turn = 0
        self._shared_views: dict[int, memoryview] = {}  # the shared memory of each live child

    def init_processes(self, initializer: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._initializer = (initializer, args)

    # -- children ------------------------------------------------------------------------------

    def _spawn(self) -> _Slot:
        shm = mmap.mmap(-1, SHARED_SIZE)
        shared = memoryview(shm).cast("q")
        lock = multiprocessing.get_context("fork").Lock()
        with self._spawn_lock:
            shared[EVENTS] = int(self._events)
            self._shared_views[id(shared)] = shared
        process, parent_end = self._fork(
            child_main, lambda child_end, inherited: (child_end, lock, shared, self._initializer, inherited,
                                                      self.max_memory_per_child))
        parent_end.setblocking(False)
        return _Slot(process, parent_end, lock, shm, shared)

    def start(self) -> None:
        self._open_wake_pipe()
        slots = [self._spawn() for _ in range(self.concurrency)]
        self._io = threading.Thread(target=self._io_loop, name="PoolIO", daemon=True)
        self._io.start()
        with self._lock:
            self._slots.extend(slots)
            self._new_slots.extend(slots)
            self._dispatch()  # what was submitted before start
        self._wake()

    def grow(self, n: int = 1) -> None:
        """Fork ``n`` more children (thread-safe)."""
        slots = [self._spawn() for _ in range(n)]
        with self._lock:
            self._slots.extend(slots)
            self._new_slots.extend(slots)
            self.concurrency += n
            self._dispatch()
        self._wake()

    def shrink(self, n: int = 1) -> None:
        """Retire ``n`` children once they are idle, keeping at least one (thread-safe)."""
        with self._lock:
            n = min(n, self.concurrency - 1)
            self.concurrency -= n
            # the idlest children go first
            candidates = sorted((s for s in self._slots if not s.retiring and not s.dead),
                                key=lambda s: len(s.inflight))
            for slot in candidates[:n]:
                slot.retiring, slot.replace = True, False
        self._wake()

    # -- sending (any thread, under the lock) --------------------------------------------------

    def apply_async(self, target: Callable[..., Any], args: tuple[Any, ...], callback: Callback,
                    on_start: Callable[[], None] | None = None) -> Any:
        job = _Job(pickle.dumps((target, args), pickle.HIGHEST_PROTOCOL), callback, on_start)
        with self._lock:
            if not self._abandon:
                self._queue.append(job)
                self._dispatch()
                return job
        job.done = True
        callback("notstarted")
        return job

    def _dispatch(self) -> None:
        """Send queued jobs: first to idle children, then behind short jobs. Lock held."""
        queue = self._queue
        if not queue:
            return
        limit = self.max_tasks_per_child
        slots = self._slots
        if len(slots) > 1:  # idle children take turns
            self._turn = turn = (self._turn + 1) % len(slots)
            slots = slots[turn:] + slots[:turn]
        for slot in slots:
            if not slot.inflight and slot.can_take(limit):
                self._send(slot, queue.popleft())
                if not queue:
                    return
        for slot in slots:
            if (len(slot.inflight) == 1 and slot.fast and not slot.cancelled and not slot.wbuf
                    and slot.can_take(limit) and len(queue[0].body) <= _PIPELINE_BYTES):
                self._send(slot, queue.popleft())
                if not queue:
                    return

    def _send(self, slot: _Slot, job: _Job) -> None:
        job.seq = seq = next(self._seq)
        job.sent_at = now = time.monotonic()
        body = job.body
        frame = HEAD.pack(len(body), seq, now) + body
        if slot.wbuf:
            slot.wbuf += frame
        else:
            try:
                sent = slot.sock.send(frame)
            except BlockingIOError:
                sent = 0
            except OSError:  # the child is gone; the I/O thread will see it. It never got this job.
                slot.dead = True
                self._queue.appendleft(job)
                return
            if sent < len(frame):
                slot.wbuf += memoryview(frame)[sent:]
                self._want_write = True
                self._wake()
        job.slot, job.pid = slot, slot.process.pid
        slot.sent += 1
        if self.max_tasks_per_child and slot.sent >= self.max_tasks_per_child:
            slot.retiring = slot.replace = True
        slot.inflight.append(job)
        if len(slot.inflight) == 1:
            self._started(job)

    @staticmethod
    def _started(job: _Job) -> None:
        job.started = True
        if job.on_start is not None:
            try:
                job.on_start()
            except Exception:
                logger.exception("on_start callback failed")

    def _take_back(self, slot: _Slot, job: _Job) -> bool:
        """Take the pipelined ``job`` back from ``slot`` unless the child has started it. Lock held.

        The child checks for the cancel mark and records a start under the same lock, so
        exactly one of the two happens."""
        if slot.cancelled or not slot.lock.acquire(timeout=0.05):
            return False
        try:
            if slot.shared[STARTED] >= job.seq:
                return False
            slot.shared[CANCEL] = job.seq
        finally:
            slot.lock.release()
        slot.inflight.remove(job)
        slot.cancelled = job.seq
        slot.sent -= 1
        if (slot.replace and self.max_tasks_per_child and slot.sent < self.max_tasks_per_child
                and not slot.shared[RETIRE]):
            slot.retiring = slot.replace = False
        job.slot = job.pid = None
        return True

    # -- the I/O thread ------------------------------------------------------------------------

    def _io_loop(self) -> None:
        """The I/O thread: read answers, write what sends left over, notice dead children."""
        while True:
            try:
                self._io_run()
                return
            except Exception:  # keep serving the children: a worker must not hang on a bug here
                logger.exception("Internal error in the prefork pool's I/O thread")
                time.sleep(0.1)
                with self._lock:  # watch every child again, with a new selector
                    self._new_slots = list(self._slots)
                    for slot in self._slots:
                        slot.writing = False
                    self._want_write = True

    def _io_run(self) -> None:
        with selectors.DefaultSelector() as selector:
            self._serve(selector, {})

    def _serve(self, selector: selectors.BaseSelector, watched: dict[_Slot, tuple[int, int]]) -> None:
        selector.register(self._wake_r, selectors.EVENT_READ, None)
        next_check = time.monotonic() + _CHECK_INTERVAL
        timeout = _CHECK_INTERVAL
        while True:
            if self._new_slots:
                with self._lock:
                    new, self._new_slots = self._new_slots, []
                for slot in new:
                    self._watch(selector, watched, slot)
            if self._want_write:
                with self._lock:
                    self._want_write = False
                    for slot in watched:
                        if slot.wbuf and not slot.writing:
                            slot.writing = True
                            selector.modify(slot.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, slot)
            for key, mask in selector.select(timeout):
                slot = key.data
                if slot is None:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                elif key.fileobj is slot.sock:
                    if mask & selectors.EVENT_WRITE:
                        self._flush(selector, slot)
                    if mask & selectors.EVENT_READ:
                        self._on_readable(selector, watched, slot)
                elif slot in watched:  # its process sentinel: the child exited
                    self._on_exit(selector, watched, slot)
            if self._closing:
                self._close_all(selector, watched)
                return
            now = time.monotonic()
            timeout = _CHECK_INTERVAL
            with self._lock:
                retiring = [s for s in self._slots if s.retiring and not s.inflight and not s.dead]
                dead = [s for s in self._slots if s.dead]
                hostages = self._hostages(now)
            for slot in dead:
                self._on_exit(selector, watched, slot)
            for slot in retiring:
                self._retire(selector, watched, slot)
            if hostages:
                timeout = _TAKE_BACK_AFTER / 2
            if now >= next_check:
                next_check = now + _CHECK_INTERVAL
                for slot in list(watched):
                    if not slot.process.is_alive():
                        self._on_exit(selector, watched, slot)
                self._exiting = [p for p in self._exiting if p.is_alive()]

    def _watch(self, selector: selectors.BaseSelector, watched: dict[_Slot, tuple[int, int]],
               slot: _Slot) -> None:
        if slot in watched or slot.sock.fileno() < 0:
            return
        sentinel = slot.process.sentinel
        selector.register(slot.sock, selectors.EVENT_READ, slot)
        selector.register(sentinel, selectors.EVENT_READ, slot)
        watched[slot] = (slot.sock.fileno(), sentinel)

    def _unwatch(self, selector: selectors.BaseSelector, watched: dict[_Slot, tuple[int, int]],
                 slot: _Slot) -> None:
        if watched.pop(slot, None) is not None:
            selector.unregister(slot.sock)
            selector.unregister(slot.process.sentinel)
        with self._spawn_lock:
            self._parent_ends.discard(slot.sock)
            self._shared_views.pop(id(slot.shared), None)
        slot.sock.close()

    def _flush(self, selector: selectors.BaseSelector, slot: _Slot) -> None:
        """Write what :meth:`_send` left over, as far as the child reads."""
        with self._lock:
            try:
                sent = slot.sock.send(slot.wbuf)
            except BlockingIOError:
                return
            except OSError:
                slot.dead = True
                sent = len(slot.wbuf)
            del slot.wbuf[:sent]
            if slot.wbuf or not slot.writing:
                return
            slot.writing = False
        selector.modify(slot.sock, selectors.EVENT_READ, slot)

    def _hostages(self, now: float) -> bool:
        """Take back pipelined jobs waiting behind a long one while a child is idle; True while
        some pipelined job may still need it. Lock held."""
        limit = self.max_tasks_per_child
        slots = self._slots
        pipelined = [s for s in slots if len(s.inflight) > 1]
        if not pipelined or self._stopping or self._queue:
            return False
        if not any(not s.inflight and s.can_take(limit) for s in slots):
            return False
        taken = False
        for slot in pipelined:
            job = slot.inflight[-1]
            if now - job.sent_at >= _TAKE_BACK_AFTER and self._take_back(slot, job):
                self._queue.appendleft(job)
                taken = True
        if taken:
            self._dispatch()
        return True

    def _read(self, slot: _Slot, block: bool = True) -> tuple[list[tuple[int, float, Any]], bool]:
        """Read what the child sent: its answers and whether its end is closed."""
        eof = False
        buf, chunk, view = slot.rbuf, self._chunk, self._chunk_view
        try:
            while True:  # recv_into a buffer kept for it: recv(n) allocates n bytes each time
                size = slot.sock.recv_into(chunk)
                if not size:
                    eof = True
                    break
                buf += view[:size]
                if block and size < len(chunk):
                    break
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            eof = True
        answers = []
        pos, size_all = 0, len(buf)
        head_size, unpack_from = HEAD.size, HEAD.unpack_from
        while size_all - pos >= head_size:
            size, seq, runtime = unpack_from(buf, pos)
            end = pos + head_size + size
            if end > size_all:
                break
            try:
                result = pickle.loads(buf[pos + head_size:end])
            except Exception:
                logger.exception("Cannot read the result a pool process sent")
                result = "reject"
            answers.append((seq, runtime, result))
            pos = end
        if pos:
            del buf[:pos]
        return answers, eof

    def _on_readable(self, selector: selectors.BaseSelector, watched: dict[_Slot, tuple[int, int]],
                     slot: _Slot) -> None:
        answers, eof = self._read(slot)
        if answers:
            self._on_answers(slot, answers)
        if eof:
            self._on_exit(selector, watched, slot)

    def _on_answers(self, slot: _Slot, answers: list[tuple[int, float, Any]], dead: bool = False) -> None:
        done: list[tuple[_Job, Any]] = []
        with self._lock:
            inflight = slot.inflight
            for seq, runtime, result in answers:
                if not inflight or inflight[0].seq != seq:
                    logger.error("Pool process %s answered a job it was not given (%s)", slot.process.pid, seq)
                    continue
                job = inflight.popleft()
                job.done = True
                done.append((job, result))
                slot.fast = runtime <= _PIPELINE_RUNTIME
                if slot.cancelled and seq > slot.cancelled:
                    slot.cancelled = 0
                if inflight and not dead:  # the child starts the next one right after answering
                    self._started(inflight[0])
            if slot.shared[RETIRE] and not slot.retiring:  # max_memory_per_child: no more jobs
                slot.retiring = slot.replace = True
            if not slot.dead:
                self._dispatch()
            if self._stopping:
                self._changed.notify_all()
        for job, result in done:
            _report(job, result)

    def _on_exit(self, selector: selectors.BaseSelector, watched: dict[_Slot, tuple[int, int]],
                 slot: _Slot) -> None:
        """The child exited (or closed its end): settle its jobs and fork a replacement."""
        if slot not in watched:
            return
        with self._lock:
            slot.dead = True
        process = slot.process
        process.join(5)
        if process.is_alive():  # closed its socket but did not exit
            process.kill()
            process.join(5)
        answers, _ = self._read(slot, block=False)
        if answers:
            self._on_answers(slot, answers, dead=True)
        self._unwatch(selector, watched, slot)
        outcomes: list[tuple[_Job, Any]] = []
        with self._lock:
            if slot in self._slots:
                self._slots.remove(slot)
            for job in slot.inflight:
                job.done = True
                if not job.started and slot.shared[STARTED] >= job.seq:  # it died in that job
                    self._started(job)
                if job.started:
                    outcomes.append((job, job.killed or f"lost (exit code {process.exitcode})"))
                else:
                    outcomes.append((job, "notstarted"))
            slot.inflight.clear()
            replace = not self._stopping and not (slot.retiring and not slot.replace)
            if self._stopping:
                self._changed.notify_all()
        for job, outcome in outcomes:
            _report(job, outcome)
        if replace:
            self._replace(selector, watched)

    def _retire(self, selector: selectors.BaseSelector, watched: dict[_Slot, tuple[int, int]],
                slot: _Slot) -> None:
        """An idle child that is done (``max_tasks_per_child``, shrink): let it exit."""
        with self._lock:
            if slot.inflight or slot not in self._slots:
                return
            self._slots.remove(slot)
            replace = slot.replace and not self._stopping
        self._unwatch(selector, watched, slot)  # the child reads EOF and exits
        self._exiting.append(slot.process)
        if replace:
            self._replace(selector, watched)

    def _replace(self, selector: selectors.BaseSelector, watched: dict[_Slot, tuple[int, int]]) -> None:
        try:
            slot = self._spawn()
        except Exception:
            logger.exception("Could not fork a pool process")
            return
        self._watch(selector, watched, slot)
        with self._lock:
            self._slots.append(slot)
            self._dispatch()

    def _close_all(self, selector: selectors.BaseSelector, watched: dict[_Slot, tuple[int, int]]) -> None:
        for slot in list(watched):
            if slot.inflight or not slot.process.is_alive():
                self._on_exit(selector, watched, slot)
            else:
                self._unwatch(selector, watched, slot)
                self._exiting.append(slot.process)
        for process in self._exiting:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)
        self._exiting = []

    def set_task_events(self, enabled: bool) -> None:
        """Each child reads the setting from its shared memory before its next job."""
        with self._spawn_lock:
            self._events = enabled
            for shared in self._shared_views.values():
                shared[EVENTS] = int(enabled)

    # -- revokes -------------------------------------------------------------------------------

    def discard(self, handle: Any) -> bool:
        """Drop a job not started yet: still queued in the parent, or sent to a child behind
        another job and taken back (under the lock shared with the child, so it never also
        runs). Its callback gets ``"revoked"``."""
        if not isinstance(handle, _Job):
            return False
        with self._lock:
            if handle.done or handle.started:
                return False
            if handle in self._queue:
                self._queue.remove(handle)
            elif handle.slot is None or not self._take_back(handle.slot, handle):
                return False
            handle.done = True
        _report(handle, "revoked")
        return True

    def terminate(self, handle: Any, signum: int) -> bool:
        """Signal the child running ``handle``; if it dies, the job's outcome is
        ``"terminated <signum>"``."""
        if not isinstance(handle, _Job) or handle.done or not handle.started or handle.pid is None:
            return False
        slot = handle.slot
        if slot is not None and slot.shared[FINISHED] >= handle.seq:
            return False
        handle.killed = f"terminated {signum}"
        try:
            os.kill(handle.pid, signum)
        except ProcessLookupError:
            return False
        return True

    # -- time limits and stopping --------------------------------------------------------------

    def raise_soft_timeout(self, handle: Any, exc_type: type[BaseException]) -> bool:
        if not isinstance(handle, _Job) or handle.done or not handle.started:
            return False
        slot = handle.slot
        if slot is None or handle.pid is None:
            return False
        shared = slot.shared
        if shared[FINISHED] >= handle.seq:  # the child is past it: its answer is on the way
            return False
        try:
            if issubclass(exc_type, SoftTimeLimitExceeded):
                if shared[STARTED] != handle.seq:
                    return False
                shared[SOFT] = handle.seq
                os.kill(handle.pid, signal.SIGUSR1)
            else:
                handle.killed = "timeout"
                os.kill(handle.pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def stop(self, wait: bool = True) -> None:
        """Stop the pool. Jobs not started are handed back (``notstarted``) so the worker
        requeues them; with ``wait`` the running ones finish first, else their children are
        killed (their jobs are ``lost``)."""
        with self._lock:
            self._abandon = self._stopping = True
            dropped = list(self._queue)
            self._queue.clear()
            if wait:
                for slot in self._slots:
                    if len(slot.inflight) > 1:
                        job = slot.inflight[-1]
                        if self._take_back(slot, job):
                            dropped.append(job)
        for job in dropped:
            job.done = True
            _report(job, "notstarted")
        if self._io is None:
            return
        if wait:
            with self._lock:
                while any(s.inflight and not s.dead for s in self._slots):
                    self._changed.wait(0.5)
        else:
            with self._lock:
                processes = [s.process for s in self._slots]
            for process in processes:
                try:
                    process.kill()
                except Exception:
                    pass
        self._closing = True
        self._wake()
        self._io.join(30)


def _direct_variant() -> None:
    from celeriac_prefork.direct import DirectPreforkPool

    PreforkPool.direct_variant = DirectPreforkPool


_direct_variant()
