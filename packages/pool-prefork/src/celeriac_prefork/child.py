"""The loop of a prefork pool process, and the frame and shared-memory layout it shares with
the parent (:mod:`celeriac_prefork.pool`).

A job frame is :data:`HEAD` (body size, sequence number, time sent) and the pickle of
``(target, args)``; an answer frame is :data:`HEAD` (size, the job's sequence number, how long
it ran) and the pickle of the result. Jobs run in the order they arrive.
"""

from __future__ import annotations

import logging
import os
import pickle
import resource
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from celeriac.exceptions import SoftTimeLimitExceeded
from celeriac.worker.trace import set_process_events
from celeriac.worker.worker import flush_log_handlers

__all__ = ["CANCEL", "EVENTS", "FINISHED", "HEAD", "RETIRE", "SHARED_SIZE", "SOFT", "STARTED", "child_main",
           "over_memory", "prepare_process"]

logger = logging.getLogger("celeriac.worker")

#: Every frame: body size, sequence number, and a float (parent -> child: when it was sent;
#: child -> parent: how long the job ran, in seconds).
HEAD = struct.Struct("<QQd")
#: Indexes in a slot's shared memory (signed 64-bit integers): the last job the child started
#: and finished, the job a soft limit is meant for, a pipelined job the parent took back,
#: whether task events are on (1) or off (0), which ``control enable_events`` changes, and 1
#: once the child asks to be replaced (its peak memory passed ``max_memory_per_child``).
STARTED, FINISHED, SOFT, CANCEL, EVENTS, RETIRE = range(6)
#: Bytes of a slot's shared memory.
SHARED_SIZE = 8 * 6

_shared: memoryview | None = None  # this process's slot memory (set in child_main)


def over_memory(limit_kib: int) -> bool:
    """True when this process's peak resident memory (``getrusage`` ``ru_maxrss``) is above
    ``limit_kib`` KiB, Celery's ``worker_max_memory_per_child`` test; logs it once then."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":  # bytes there, KiB on Linux
        peak //= 1024
    if peak <= limit_kib:
        return False
    logger.info("Pool process %s: peak memory %d KiB is above max_memory_per_child (%d KiB); "
                "it is replaced.", os.getpid(), peak, limit_kib)
    return True


def _on_sigusr1(signum: int, frame: Any) -> None:
    shared = _shared
    if shared is not None and shared[SOFT] == shared[STARTED] != shared[FINISHED]:
        raise SoftTimeLimitExceeded("The task's soft time limit was exceeded.")


def prepare_process(inherited: list[Any], shared: memoryview) -> None:
    """First steps of every pool process (after fork): close the parent's ends of the pool
    sockets it inherited (``inherited``: sockets and file descriptors), leave Ctrl+C and
    SIGHUP to the parent, and raise ``SoftTimeLimitExceeded`` on SIGUSR1 for the job the slot
    memory ``shared`` names."""
    global _shared
    for other in inherited:
        try:
            if isinstance(other, int):
                os.close(other)
            else:
                other.close()
        except OSError:
            pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "SIGQUIT"):
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _shared = shared
    signal.signal(signal.SIGUSR1, _on_sigusr1)


def child_main(sock: socket.socket, lock: Any, shared: memoryview,
               initializer: tuple[Callable[..., Any], tuple[Any, ...]] | None,
               inherited: list[Any], max_memory: int | None = None) -> None:
    """The loop of a pool process: read a job frame, run ``target(*args)``, send the answer.

    The child closes the parent's ends of every pool socket it inherited, and exits when its
    parent is gone, so a killed worker never leaves children behind. Once its peak resident
    memory is above ``max_memory`` KiB it asks the parent, with its answer, to replace it: the
    parent sends it no more jobs and stops it when it is idle.
    """
    parent = os.getppid()
    prepare_process(inherited, shared)
    if initializer is not None:
        fn, args = initializer
        fn(*args)
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        head_size, unpack_from, pack = HEAD.size, HEAD.unpack_from, HEAD.pack
        loads, dumps, clock = pickle.loads, pickle.dumps, time.monotonic
        events = -1  # the task-events setting applied in this process (-1: the initializer's)
        buf = bytearray()
        chunk = bytearray(65536)
        view = memoryview(chunk)
        while True:
            try:
                while True:  # until buf holds a whole frame
                    if len(buf) >= head_size:
                        size, seq, _sent_at = unpack_from(buf)
                        end = head_size + size
                        if len(buf) >= end:
                            break
                    if not poller.poll(1000):
                        if os.getppid() != parent:
                            return
                        continue
                    got = sock.recv_into(chunk)
                    if not got:
                        return
                    buf += view[:got]
            except (OSError, SoftTimeLimitExceeded):
                return
            body = buf[head_size:end]
            del buf[:end]
            if shared[EVENTS] != events:
                events = shared[EVENTS]
                set_process_events(bool(events))
            started = clock()
            try:
                try:
                    with lock:
                        if shared[CANCEL] == seq:  # taken back by the parent: it runs elsewhere
                            continue
                        shared[STARTED] = seq
                    target, args = loads(body)
                    result = target(*args)
                finally:
                    shared[FINISHED] = seq
            except SoftTimeLimitExceeded:  # landed after the task body had returned
                result = "ack"
            except BaseException:
                logger.exception("Internal error in pool process")
                result = "reject"
            shared[FINISHED] = seq
            runtime = clock() - started
            try:
                out = dumps(result, pickle.HIGHEST_PROTOCOL)
            except Exception:
                logger.exception("Cannot send the result of a pool job to the parent")
                out = dumps("reject", pickle.HIGHEST_PROTOCOL)
            if max_memory and not shared[RETIRE] and over_memory(max_memory):
                shared[RETIRE] = 1  # read by the parent with this answer
            try:
                sock.sendall(pack(len(out), seq, runtime) + out)
            except (OSError, SoftTimeLimitExceeded):
                return
    finally:
        flush_log_handlers()  # the process ends with os._exit: no atexit, no logging.shutdown
