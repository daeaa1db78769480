"""The worker's log handlers: every line once, whole, in order per thread, without lock waits."""

from __future__ import annotations

import io
import logging
import os
import threading
import time

import pytest

from celeriac.worker.logsink import CombiningFileHandler, CombiningStreamHandler
from celeriac.worker.worker import WorkerFormatter, setup_logging


def _logger(handler: logging.Handler, name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    return logger


def test_lines_from_many_threads_are_whole_and_each_written_once() -> None:
    stream = io.StringIO()
    logger = _logger(CombiningStreamHandler(stream), "test.logsink.threads")

    def work(k: int) -> None:
        for i in range(2000):
            logger.info("thread %d line %d %s", k, i, "x" * (i % 50))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 16000
    for k in range(8):
        mine = [line for line in lines if line.startswith(f"thread {k} ")]
        assert mine == [f"thread {k} line {i} {'x' * (i % 50)}" for i in range(2000)]


class _SlowStream(io.StringIO):
    """A stream whose first write blocks until released, to hold the writer's turn."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(10)
        return super().write(text)


def test_a_line_logged_while_another_thread_writes_is_written_without_a_later_call() -> None:
    stream = _SlowStream()
    logger = _logger(CombiningStreamHandler(stream), "test.logsink.slow")
    first = threading.Thread(target=logger.info, args=("first",))
    first.start()
    assert stream.entered.wait(10)
    logger.info("second")  # returns at once: the first thread is writing
    assert stream.getvalue() == ""
    stream.release.set()
    first.join(10)
    assert stream.getvalue() == "first\nsecond\n"


def test_file_handler_appends(tmp_path: pytest.TempPathFactory) -> None:
    path = os.path.join(str(tmp_path), "worker.log")
    with open(path, "w") as handle:
        handle.write("earlier\n")
    handler = CombiningFileHandler(path)
    logger = _logger(handler, "test.logsink.file")
    logger.info("one")
    logger.warning("two")
    handler.close()
    with open(path) as handle:
        assert handle.read() == "earlier\none\ntwo\n"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_while_the_parent_writes_can_log(tmp_path: pytest.TempPathFactory) -> None:
    path = os.path.join(str(tmp_path), "fork.log")
    stream = _SlowStream()
    logger = _logger(CombiningStreamHandler(stream), "test.logsink.fork")
    writer = threading.Thread(target=logger.info, args=("parent",))
    writer.start()
    assert stream.entered.wait(10)  # the parent's writer holds its turn while we fork
    logger.info("pending in the parent")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            with open(path, "w") as out:
                handler = logger.handlers[0]
                assert isinstance(handler, CombiningStreamHandler)
                handler.setStream(out)
                logger.info("child")
                out.flush()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    stream.release.set()
    writer.join(10)
    assert os.waitstatus_to_exitcode(status) == 0
    with open(path) as handle:
        assert handle.read() == "child\n"
    assert stream.getvalue() == "parent\npending in the parent\n"


def test_worker_formatter_stamps_each_record_with_its_own_second() -> None:
    formatter = WorkerFormatter()
    records = []
    for created in (1_700_000_000.25, 1_700_000_001.5, 1_700_000_000.75):
        record = logging.LogRecord("x", logging.INFO, "", 0, "m", None, None)
        record.created, record.msecs = created, (created % 1) * 1000
        records.append(formatter.formatTime(record))
    expected = [time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(c))) for c in
                (1_700_000_000, 1_700_000_001, 1_700_000_000)]
    assert records == [f"{expected[0]},250", f"{expected[1]},500", f"{expected[2]},750"]


def test_setup_logging_installs_the_combining_handler(tmp_path: pytest.TempPathFactory) -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        setup_logging("INFO", os.path.join(str(tmp_path), "w.log"))
        assert [type(h) for h in root.handlers] == [CombiningFileHandler]
        setup_logging("WARNING")
        assert [type(h) for h in root.handlers] == [CombiningStreamHandler]
        assert root.level == logging.WARNING
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(level)


def _wait_for(predicate, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return bool(predicate())


def test_info_lines_are_written_together_within_the_flush_interval() -> None:
    writes: list[str] = []

    class Recording(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return super().write(text)

    stream = Recording()
    logger = _logger(CombiningStreamHandler(stream, flush_interval=0.2), "test.logsink.interval")
    for i in range(5):
        logger.info("line %d", i)
    assert stream.getvalue() == ""  # held back...
    assert _wait_for(lambda: stream.getvalue() != "", 5)  # ...and written with no further call
    assert writes == ["line 0\nline 1\nline 2\nline 3\nline 4\n"]  # in one write


def test_a_warning_is_written_at_once_after_the_info_lines_before_it() -> None:
    stream = io.StringIO()
    logger = _logger(CombiningStreamHandler(stream, flush_interval=30), "test.logsink.warning")
    logger.info("first")
    logger.warning("second")
    assert stream.getvalue() == "first\nsecond\n"


def test_a_full_batch_is_written_without_waiting() -> None:
    stream = io.StringIO()
    logger = _logger(CombiningStreamHandler(stream, flush_interval=30, batch=3), "test.logsink.batch")
    logger.info("a")
    logger.info("b")
    assert stream.getvalue() == ""
    logger.info("c")
    assert stream.getvalue() == "a\nb\nc\n"


def test_a_held_line_shows_its_arguments_as_they_were_when_it_was_logged() -> None:
    """Lines held for the flusher may be formatted late, but never show a later state: a list
    argument is formatted at once, plain values whenever; the order stays the logging order."""
    stream = io.StringIO()
    handler = CombiningStreamHandler(stream, flush_interval=30)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = _logger(handler, "test.logsink.frozen")
    items = [1]
    logger.info("task %s[%s] succeeded in %.3fs: %r", "t.add", "id-1", 0.5, 4)
    logger.info("items %r", items)
    logger.info("mapping %(a)s", {"a": items})
    items.append(2)
    try:
        raise ValueError("boom")
    except ValueError:
        logger.info("with a traceback", exc_info=True)
    handler.flush()
    lines = stream.getvalue().splitlines()
    assert lines[:3] == ["INFO task t.add[id-1] succeeded in 0.500s: 4", "INFO items [1]", "INFO mapping [1]"]
    assert lines[3] == "INFO with a traceback" and "ValueError: boom" in stream.getvalue()


def test_a_plain_info_line_is_formatted_by_the_flusher_not_by_the_caller() -> None:
    formatted_in: list[str] = []

    class Recording(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            formatted_in.append(threading.current_thread().name)
            return super().format(record)

    stream = io.StringIO()
    handler = CombiningStreamHandler(stream, flush_interval=0.05)
    handler.setFormatter(Recording("%(message)s"))
    logger = _logger(handler, "test.logsink.deferred")
    logger.info("Task %s[%s] received", "t.add", "id-2")
    assert formatted_in == []
    assert _wait_for(lambda: stream.getvalue() == "Task t.add[id-2] received\n", 5)
    assert formatted_in == ["LogFlusher"]


def test_flush_writes_what_is_pending() -> None:
    stream = io.StringIO()
    handler = CombiningStreamHandler(stream, flush_interval=30)
    logger = _logger(handler, "test.logsink.flush")
    logger.info("pending")
    handler.flush()
    assert stream.getvalue() == "pending\n"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_writes_its_info_lines_with_its_own_flusher(tmp_path: pytest.TempPathFactory) -> None:
    path = os.path.join(str(tmp_path), "child.log")
    stream = io.StringIO()
    handler = CombiningStreamHandler(stream, flush_interval=0.05)
    logger = _logger(handler, "test.logsink.forkflush")
    logger.info("parent before")  # arms the parent's flusher
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            with open(path, "w") as out:
                handler.setStream(out)
                logger.info("child")
                code = 0 if _wait_for(lambda: os.path.getsize(path) > 0, 5) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with open(path) as handle:
        assert handle.read() == "child\n"
    assert _wait_for(lambda: stream.getvalue() == "parent before\n")


def test_the_worker_writes_its_ready_line_at_once(tmp_path: pytest.TempPathFactory) -> None:
    from celeriac import Celeriac
    from celeriac.testing.plugin import start_worker

    stream = io.StringIO()
    handler = CombiningStreamHandler(stream, flush_interval=30)  # batches would wait 30 s
    handler.setFormatter(WorkerFormatter())
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    app = Celeriac("logsink", broker=f"sqlite:///{tmp_path}/broker.db", backend=None)
    worker = start_worker(app, hostname="logsink@test")
    try:
        assert worker.ready.wait(20)
        assert "logsink@test ready." in stream.getvalue()
    finally:
        worker.stop()
        worker._thread.join(10)  # type: ignore[attr-defined]
        root.handlers[:] = saved
        root.setLevel(level)
