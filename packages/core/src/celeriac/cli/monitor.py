"""The live screen of ``celeriac events``: workers and recent tasks, drawn with curses.

A daemon thread (:class:`EventPump`) receives events and queues them; the UI thread folds them
into an :class:`~celeriac.events_state.EventState` and redraws a few times a second, so keys are
answered at once whatever the event rate. Keys: Up/Down or j/k select a task, PgUp/PgDn page,
Home/g follows the newest task, Enter (or i, t, r) shows the selected task, Esc/Enter/Backspace
go back, q or Ctrl-C quits. The terminal is restored however the monitor ends.
"""

from __future__ import annotations

import curses
import locale
import logging
import os
import queue
import signal
import textwrap
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from celeriac import states
from celeriac.events_state import EventState, TaskInfo, WorkerInfo

if TYPE_CHECKING:
    from celeriac.events import EventReceiver

__all__ = ["Column", "EventPump", "Monitor", "detail_lines", "format_age", "format_row", "format_runtime",
           "run_monitor", "task_columns", "task_row", "task_summary", "worker_columns"]

MIN_WIDTH, MIN_HEIGHT = 40, 8
_ENTER = (10, 13, curses.KEY_ENTER)
_BACK = (27, 8, 127, curses.KEY_BACKSPACE, curses.KEY_LEFT, ord("h"))
_STATE_COLORS = {states.SUCCESS: 1, "online": 1, states.FAILURE: 2, states.REVOKED: 2, states.REJECTED: 2,
                 "offline": 2, "lost": 2, states.STARTED: 3, states.RETRY: 3, states.RECEIVED: 4}


# -- formatting (pure) --------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One table column: title, width in cells, and whether its text is right-aligned."""

    title: str
    width: int
    right: bool = False


def _one_line(text: str) -> str:
    """``text`` with control characters (newlines, escapes) turned into spaces."""
    return "".join(" " if ord(c) < 32 or 127 <= ord(c) < 160 else c for c in text)


def _clip(text: str, cells: int) -> str:
    """The longest start of ``text`` that fits in ``cells`` terminal cells (wide characters take 2)."""
    if text.isascii():
        return text[:cells]
    used = 0
    for i, char in enumerate(text):
        used += 0 if unicodedata.combining(char) else 2 if unicodedata.east_asian_width(char) in "WF" else 1
        if used > cells:
            return text[:i]
    return text


def format_row(values: list[str], columns: list[Column]) -> str:
    """Cells padded or cut to their column's width, one space apart, after a one-space margin."""
    cells = []
    for value, column in zip(values, columns, strict=True):
        text = _one_line(value)[:column.width]
        cells.append(text.rjust(column.width) if column.right else text.ljust(column.width))
    return " " + " ".join(cells)


def format_runtime(seconds: float | None) -> str:
    """``0.4ms``, ``1.234s``, ``12.35s``, ``3m05s`` or empty when unknown."""
    if seconds is None:
        return ""
    if seconds < 0.1:
        return f"{seconds * 1000:.1f}ms"
    if seconds < 10:
        return f"{seconds:.3f}s"
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def format_age(seconds: float | None) -> str:
    """``1.2s ago``, ``5m ago``, ``2h ago``, or ``-`` when unknown."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s ago"
    if seconds < 3600:
        return f"{int(seconds // 60)}m ago"
    return f"{int(seconds // 3600)}h ago"


def _hms(timestamp: float | None) -> str:
    if timestamp is None:
        return ""
    try:
        return time.strftime("%H:%M:%S", time.localtime(timestamp))
    except (OverflowError, OSError, ValueError):
        return "?"


def task_summary(task: TaskInfo) -> str:
    """Args (and kwargs), then ``-> result`` or ``-> exception`` once the task has one."""
    text = task.args or ""
    if task.kwargs and task.kwargs not in ("{}", "None"):
        text = f"{text} {task.kwargs}".strip()
    outcome = task.exception if task.state in (states.FAILURE, states.RETRY) else task.result
    if outcome:
        text = f"{text} -> {outcome}"
    return text


def worker_columns(width: int) -> list[Column]:
    """The workers table for a screen ``width`` cells wide."""
    fixed = [Column("STATUS", 7), Column("ACTIVE", 6, True), Column("PROCESSED", 9, True),
             Column("HEARTBEAT", 10, True)]
    used = 1 + sum(c.width + 1 for c in fixed)
    return [Column("WORKER", max(8, width - used)), *fixed]


def task_columns(width: int) -> list[Column]:
    """The tasks table for a screen ``width`` cells wide (whole uuids from 120 cells)."""
    uuid = 36 if width >= 120 else 8
    fixed = uuid + 8 + 8 + 7 + 6  # uuid, state, received, runtime, and six separators
    rest = max(0, width - 1 - fixed)
    name = max(8, rest * 34 // 100)
    worker = max(8, rest * 24 // 100)
    info = max(0, rest - name - worker)
    return [Column("UUID", uuid), Column("NAME", name), Column("STATE", 8), Column("WORKER", worker),
            Column("RECEIVED", 8), Column("RUNTIME", 7, True), Column("ARGS -> RESULT", info)]


def task_row(task: TaskInfo, columns: list[Column]) -> str:
    """One line of the tasks table."""
    return format_row([task.uuid, task.name or "?", task.state, task.hostname or "",
                       _hms(task.received_at or task.sent_at), format_runtime(task.runtime),
                       task_summary(task)], columns)


def detail_lines(task: TaskInfo, width: int) -> list[str]:
    """Every known field of ``task``, labelled and wrapped to ``width`` cells."""
    lines: list[str] = []
    indent = 13
    wrap = max(10, width - indent - 1)
    for label, text in task.fields():
        first = True
        for raw in text.splitlines() or [""]:
            for piece in textwrap.wrap(_one_line(raw.expandtabs(4)), wrap, drop_whitespace=False) or [""]:
                lines.append((f" {label:<10}: " if first else " " * indent) + piece)
                first = False
    return lines


# -- the receiver thread ------------------------------------------------------------------------


class EventPump:
    """Receives events in a daemon thread; the UI thread takes them with :meth:`drain`.

    A receive error is queued as the exception (the UI shows it) and receiving resumes a second
    later. Thread-safe: one thread receives, any thread may drain or stop.
    """

    def __init__(self, receiver: EventReceiver) -> None:
        self.receiver = receiver
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="celeriac-events", daemon=True)

    def start(self) -> None:
        """Start receiving."""
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                # Short captures, so a stop request is seen within about half a second.
                for event in self.receiver.itercapture(timeout=0.5):
                    self.queue.put(event)
                    if self._stop.is_set():
                        return
            except Exception as exc:
                self.queue.put(exc)
                self._stop.wait(1.0)

    def drain(self, limit: int = 10_000) -> Iterator[Any]:
        """Yield what was received so far (events, or exceptions), at most ``limit`` items."""
        for _ in range(limit):
            try:
                yield self.queue.get_nowait()
            except queue.Empty:
                return

    def stop(self, timeout: float = 3.0) -> None:
        """Ask the thread to stop and wait up to ``timeout`` s for it."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)


# -- the screen ---------------------------------------------------------------------------------


class Monitor:
    """The UI state (selection, scrolling, detail view) and the drawing of one frame."""

    def __init__(self, state: EventState, title: str) -> None:
        self.state = state
        self.title = title
        self.selected: str | None = None  # None: follow the newest task
        self.index = 0
        self.top = 0
        self.page = 10
        self.detail: str | None = None
        self.detail_top = 0
        self.notices: deque[tuple[float, str]] = deque(maxlen=20)
        self.colors = False
        self.encoding = "utf-8"

    # -- input ----------------------------------------------------------------------------------

    def fold(self, item: Any) -> None:
        """Take one item from the pump: an event, or a receive error to show."""
        if isinstance(item, BaseException):
            self.notice(f"receiving events failed: {item!r}; retrying")
            return
        try:
            self.state.fold(item)
        except Exception as exc:  # a bug must not take the screen down: count it and go on
            self.state.malformed += 1
            self.notice(f"could not use an event: {exc!r}")

    def notice(self, text: str) -> None:
        """Show ``text`` in the footer for a while."""
        self.notices.append((time.monotonic(), text))

    def handle_key(self, key: int) -> bool:
        """React to one key; True means quit."""
        if key in (ord("q"), ord("Q")):
            return True
        moves = {curses.KEY_UP: -1, ord("k"): -1, curses.KEY_DOWN: 1, ord("j"): 1,
                 curses.KEY_PPAGE: -self.page, curses.KEY_NPAGE: self.page}
        if self.detail is not None:
            if key in _BACK or key in _ENTER:
                self.detail = None
            elif key in moves:
                self.detail_top = max(0, self.detail_top + moves[key])
            elif key in (curses.KEY_HOME, ord("g")):
                self.detail_top = 0
            return False
        tasks = self.state.recent_tasks()
        if key in moves and tasks:
            self._locate(tasks)
            self.index = min(len(tasks) - 1, max(0, self.index + moves[key]))
            self.selected = tasks[self.index].uuid
        elif key in (curses.KEY_HOME, ord("g")):
            self.selected, self.index = None, 0
        elif key in (curses.KEY_END, ord("G")) and tasks:
            self.index = len(tasks) - 1
            self.selected = tasks[-1].uuid
        elif (key in _ENTER or key in (curses.KEY_RIGHT, ord("l"), ord("i"), ord("t"), ord("r"))) and tasks:
            self._locate(tasks)
            self.detail = tasks[self.index].uuid
            self.detail_top = 0
        return False

    def _locate(self, tasks: list[TaskInfo]) -> None:
        """Point ``index`` at the selected task (it moves as new tasks arrive above it)."""
        if self.selected is None:
            self.index = 0
            return
        for i, task in enumerate(tasks):
            if task.uuid == self.selected:
                self.index = i
                return
        self.index = min(self.index, max(0, len(tasks) - 1))  # forgotten: stay near its place

    # -- drawing --------------------------------------------------------------------------------

    def setup(self, win: curses.window) -> None:
        """Colours (when the terminal has them), no cursor, keys with a short Esc delay."""
        self.encoding = getattr(win, "encoding", None) or "utf-8"
        try:
            curses.curs_set(0)
        except curses.error:
            pass
        if curses.has_colors():
            try:
                curses.use_default_colors()
                background = -1
            except curses.error:
                background = curses.COLOR_BLACK
            for pair, color in ((1, curses.COLOR_GREEN), (2, curses.COLOR_RED), (3, curses.COLOR_YELLOW),
                                (4, curses.COLOR_CYAN)):
                curses.init_pair(pair, color, background)
            self.colors = True

    def _put(self, win: curses.window, y: int, x: int, text: str, attr: int = 0, fill: bool = False) -> None:
        height, width = win.getmaxyx()
        if not 0 <= y < height or x >= width:
            return
        text = _one_line(text)
        if fill:
            text = text.ljust(width - x)
        text = _clip(text, width - x).encode(self.encoding, "replace").decode(self.encoding, "replace")
        try:
            win.addstr(y, x, text, attr)
        except curses.error:  # the bottom-right cell cannot be written without scrolling
            pass

    def _color(self, key: str) -> int:
        pair = _STATE_COLORS.get(key)
        return curses.color_pair(pair) if self.colors and pair else 0

    def draw(self, win: curses.window) -> None:
        """Draw one frame (the detail view when a task is open, else workers and tasks)."""
        height, width = win.getmaxyx()
        win.erase()
        if height < MIN_HEIGHT or width < MIN_WIDTH:
            self._put(win, 0, 0, f"Terminal too small ({width}x{height}); need {MIN_WIDTH}x{MIN_HEIGHT}.")
            self._put(win, 1, 0, "Enlarge it, or press q to quit.")
        elif self.detail is not None:
            self._draw_detail(win, height, width)
        else:
            self._draw_lists(win, height, width)
        win.noutrefresh()
        curses.doupdate()

    def _header(self, win: curses.window, width: int, left: str) -> None:
        right = f"{self.state.event_count} events  {time.strftime('%H:%M:%S')} "
        self._put(win, 0, 0, left[:max(0, width - len(right) - 1)].ljust(width - len(right)) + right,
                  curses.A_REVERSE, fill=True)

    def _footer(self, win: curses.window, height: int, width: int, keys: str) -> None:
        now = time.monotonic()
        recent = [text for when, text in self.notices if now - when < 10]
        self._put(win, height - 1, 0, f" {keys}", curses.A_REVERSE, fill=True)
        if recent and width > len(keys) + 12:
            message = recent[-1][:width - len(keys) - 5]
            self._put(win, height - 1, width - len(message) - 1, message, curses.A_REVERSE | self._color("lost"))

    def _draw_lists(self, win: curses.window, height: int, width: int) -> None:
        now = time.time()
        state = self.state
        self._header(win, width, f" celeriac events: {self.title}")
        workers = sorted(state.workers.values(), key=lambda w: w.hostname)
        by_status: dict[str, int] = {}
        for worker in workers:
            by_status[worker.status(now)] = by_status.get(worker.status(now), 0) + 1
        summary = ", ".join(f"{by_status[s]} {s}" for s in ("online", "lost", "offline") if s in by_status)
        self._put(win, 1, 0, f" Workers: {summary or 'none seen yet'}", curses.A_BOLD)
        columns = worker_columns(width)
        self._put(win, 2, 0, format_row([c.title for c in columns], columns), curses.A_UNDERLINE)
        y = 3
        room = max(1, (height - 9) // 3)
        if not workers:
            self._put(win, y, 0, "  (none yet: workers show up at their next heartbeat; start them with -E)")
            y += 1
        for i, worker in enumerate(workers):
            if i == room - 1 and len(workers) > room:
                self._put(win, y, 0, f"  ... and {len(workers) - i} more")
                y += 1
                break
            self._draw_worker(win, y, worker, columns, now)
            y += 1
        y += 1
        counts = state.state_counts()
        ignored = state.malformed + state.unknown
        tail = f"  ({ignored} events ignored)" if ignored else ""
        self._put(win, y, 0, f" Tasks: {len(state.tasks)}  "
                  + "  ".join(f"{s} {n}" for s, n in sorted(counts.items())) + tail, curses.A_BOLD)
        columns = task_columns(width)
        self._put(win, y + 1, 0, format_row([c.title for c in columns], columns), curses.A_UNDERLINE)
        first = y + 2
        self.page = rows = max(1, height - 1 - first)
        tasks = state.recent_tasks()
        self._locate(tasks)
        self.top = min(self.top, self.index)
        if self.index >= self.top + rows:
            self.top = self.index - rows + 1
        self.top = max(0, min(self.top, len(tasks) - rows))
        if not tasks:
            self._put(win, first, 0, "  (no task events yet)")
        for row, task in enumerate(tasks[self.top:self.top + rows]):
            selected = self.top + row == self.index
            line = task_row(task, columns)
            self._put(win, first + row, 0, line, curses.A_REVERSE if selected else 0, fill=selected)
            if not selected:
                x = 1 + sum(c.width + 1 for c in columns[:2])
                self._put(win, first + row, x, task.state, self._color(task.state))
        self._footer(win, height, width, "Up/Down j/k: select  Enter: details  q: quit")

    def _draw_worker(self, win: curses.window, y: int, worker: WorkerInfo, columns: list[Column],
                     now: float) -> None:
        status = worker.status(now)
        values = [worker.hostname, status, "" if worker.active is None else str(worker.active),
                  "" if worker.processed is None else str(worker.processed), format_age(worker.heartbeat_age(now))]
        self._put(win, y, 0, format_row(values, columns))
        self._put(win, y, 1 + columns[0].width + 1, status, self._color(status))

    def _draw_detail(self, win: curses.window, height: int, width: int) -> None:
        task = self.state.tasks.get(self.detail or "")
        self._header(win, width, f" Task {self.detail}")
        if task is None:
            lines = ["", "  This task is no longer tracked (only the most recent tasks are kept)."]
        else:
            lines = detail_lines(task, width)
        rows = height - 2
        self.page = max(1, rows - 1)
        self.detail_top = max(0, min(self.detail_top, len(lines) - rows))
        for row, line in enumerate(lines[self.detail_top:self.detail_top + rows]):
            attr = self._color(task.state) if task is not None and line.startswith(" State ") else 0
            self._put(win, 1 + row, 0, line, attr)
        self._footer(win, height, width, "Esc/Enter: back  Up/Down: scroll  q: quit")


# -- running it ---------------------------------------------------------------------------------


class _NoticeHandler(logging.Handler):
    """Shows log records in the footer instead of writing over the screen."""

    def __init__(self, monitor: Monitor) -> None:
        super().__init__(logging.WARNING)
        self.monitor = monitor

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.monitor.notice(record.getMessage())
        except Exception:
            pass


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _loop(win: curses.window, monitor: Monitor, pump: EventPump, deadline: float | None,
          interval: float) -> None:
    monitor.setup(win)
    win.keypad(True)
    win.timeout(50)
    next_draw = 0.0
    dirty = True
    while deadline is None or time.monotonic() < deadline:
        for item in pump.drain():
            monitor.fold(item)
        now = time.monotonic()
        if dirty or now >= next_draw:
            monitor.draw(win)
            next_draw, dirty = now + interval, False
        key = win.getch()
        if key == -1:
            continue
        if key == curses.KEY_RESIZE:
            win.clear()  # repaint everything at the new size
        elif monitor.handle_key(key):
            return
        dirty = True


def run_monitor(receiver: EventReceiver, title: str, timeout: float | None = None, max_tasks: int = 1000,
                interval: float = 0.25) -> None:
    """Run the live screen on this terminal until q, Ctrl-C, SIGTERM or ``timeout`` seconds.

    Raises ``curses.error`` when the terminal cannot be driven (unknown ``TERM``); the terminal
    is restored in every case. The caller closes ``receiver``.
    """
    locale.setlocale(locale.LC_ALL, "")
    os.environ.setdefault("ESCDELAY", "25")
    for name in ("LINES", "COLUMNS"):  # when exported, curses would take them over the real size
        os.environ.pop(name, None)     # and never follow a resize
    monitor = Monitor(EventState(max_tasks=max_tasks), title)
    pump = EventPump(receiver)
    root = logging.getLogger()
    saved_handlers = root.handlers[:]
    root.handlers = [_NoticeHandler(monitor)]
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main else None
    deadline = None if timeout is None else time.monotonic() + timeout
    pump.start()
    try:
        curses.wrapper(_loop, monitor, pump, deadline, interval)
    except KeyboardInterrupt:
        pass
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        root.handlers = saved_handlers
        pump.stop()
