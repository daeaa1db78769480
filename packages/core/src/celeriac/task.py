"""Tasks: the ``Task`` class made by ``@app.task``, its request context and ``retry``."""

from __future__ import annotations

import datetime as dt
import functools
import inspect
import random
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from celeriac import states
from celeriac.exceptions import Ignore, ImproperlyConfigured, MaxRetriesExceededError, Retry
from celeriac.protocol import STANDARD_HEADERS

if TYPE_CHECKING:
    from celeriac.app import Celeriac
    from celeriac.canvas import Signature
    from celeriac.result import AsyncResult, EagerResult

__all__ = ["Context", "P", "R", "Task", "backoff_countdown", "current_request"]

P = ParamSpec("P")
R = TypeVar("R")

_local = threading.local()


class Context:
    """What ``self.request`` shows inside a running task (Celery's field names)."""

    id: str | None = None
    args: list[Any] | tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    retries: int = 0
    is_eager: bool = False
    eta: str | None = None
    expires: str | None = None
    group: str | None = None
    group_index: int | None = None
    root_id: str | None = None
    parent_id: str | None = None
    chord: dict[str, Any] | None = None
    chain: list[dict[str, Any]] | None = None
    callbacks: list[dict[str, Any]] | None = None
    errbacks: list[dict[str, Any]] | None = None
    headers: dict[str, Any] | None = None
    delivery_info: dict[str, Any] | None = None
    reply_to: str | None = None
    correlation_id: str | None = None
    hostname: str | None = None
    origin: str | None = None
    timelimit: tuple[Any, Any] | list[Any] | None = None
    ignore_result: bool = False
    task: str | None = None
    shadow: str | None = None
    replaced_task_nesting: int = 0

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def get(self, key: str, default: Any = None) -> Any:
        """Dict-style access to a field."""
        return getattr(self, key, default)

    def __repr__(self) -> str:
        return f"<Context {self.__dict__!r}>"


def _stack() -> list[Context]:
    stack: list[Context] | None = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def current_request() -> Context | None:
    """The request of the task running in this thread, or None outside a task."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


def push_request(context: Context) -> None:
    """Make ``context`` the current request of this thread."""
    _stack().append(context)


def pop_request() -> None:
    """Undo :func:`push_request`."""
    _stack().pop()


def backoff_countdown(factor: float, retries: int, maximum: float, jitter: bool) -> float:
    """Exponential backoff ``factor * 2**retries`` capped at ``maximum``, with full jitter."""
    countdown = float(min(maximum, factor * (2 ** retries)))
    if jitter:
        countdown = float(random.randrange(int(countdown) + 1))
    return countdown


_EMPTY = Context()


class Task(Generic[P, R]):
    """A registered task. Call it to run inline, ``delay``/``apply_async`` to send it."""

    #: Attributes settable with ``@app.task(...)``; None means "use the app's setting".
    OPTION_NAMES = (
        "bind", "ignore_result", "max_retries", "default_retry_delay", "autoretry_for",
        "dont_autoretry_for", "retry_kwargs", "retry_backoff", "retry_backoff_max",
        "retry_jitter", "acks_late", "track_started", "time_limit", "soft_time_limit",
        "rate_limit", "queue", "priority", "serializer", "typing", "reject_on_worker_lost",
        "store_errors_even_if_ignored", "expires", "shadow", "acks_on_failure_or_timeout",
    )

    def __init__(self, fn: Callable[P, R], app: Celeriac, name: str, bind: bool = False,
                 ignore_result: bool | None = None, max_retries: int | None = 3,
                 default_retry_delay: float | None = None,
                 autoretry_for: tuple[type[BaseException], ...] = (),
                 dont_autoretry_for: tuple[type[BaseException], ...] = (),
                 retry_kwargs: dict[str, Any] | None = None, retry_backoff: bool | float = False,
                 retry_backoff_max: float = 600, retry_jitter: bool = True,
                 acks_late: bool | None = None, track_started: bool | None = None,
                 time_limit: float | None = None, soft_time_limit: float | None = None,
                 rate_limit: str | float | None = None, queue: str | None = None,
                 priority: int | None = None, serializer: str | None = None, typing: bool = True,
                 reject_on_worker_lost: bool | None = None,
                 store_errors_even_if_ignored: bool | None = None,
                 expires: float | None = None, shadow: str | None = None,
                 acks_on_failure_or_timeout: bool | None = None, compression: str | None = None,
                 **extra: Any) -> None:
        if soft_time_limit and time_limit and soft_time_limit > time_limit:
            raise ValueError(f"Task {name}: soft_time_limit ({soft_time_limit}) must not exceed "
                             f"time_limit ({time_limit}).")
        self.run = fn
        self.app = app
        self.name = name
        self.bind = bind
        self._ignore_result = ignore_result
        self.max_retries = max_retries
        self._default_retry_delay = default_retry_delay
        self.autoretry_for = tuple(autoretry_for)
        self.dont_autoretry_for = tuple(dont_autoretry_for)
        self.retry_kwargs = dict(retry_kwargs or {})
        self.retry_backoff = retry_backoff
        self.retry_backoff_max = retry_backoff_max
        self.retry_jitter = retry_jitter
        self._acks_late = acks_late
        self._track_started = track_started
        self.time_limit = time_limit
        self.soft_time_limit = soft_time_limit
        self.rate_limit = rate_limit
        self.queue = queue
        self.priority = priority
        self.serializer = serializer
        #: The compression of this task's messages (``"gzip"``, ...), as Celery's task option.
        self.compression = compression
        self.typing = typing
        self._reject_on_worker_lost = reject_on_worker_lost
        self._store_errors_even_if_ignored = store_errors_even_if_ignored
        self.expires = expires
        self.shadow = shadow
        self._acks_on_failure_or_timeout = acks_on_failure_or_timeout
        for key, value in extra.items():
            setattr(self, key, value)
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", name)
        self.__module__ = getattr(fn, "__module__", __name__)
        self.__wrapped__ = fn
        self._signature = self._arg_signature(fn, bind)

    @staticmethod
    def _arg_signature(fn: Callable[..., Any], bind: bool) -> inspect.Signature | None:
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return None
        if bind:
            params = list(sig.parameters.values())[1:]
            sig = sig.replace(parameters=params)
        return sig

    def __repr__(self) -> str:
        return f"<@task: {self.name} of {self.app.main or '__main__'}>"

    # -- settings resolved against the app -----------------------------------------------------

    def _setting(self, own: Any, name: str) -> Any:
        return self.app.conf.get(name) if own is None else own

    @property
    def ignore_result(self) -> bool:
        """True when results of this task are not stored."""
        return bool(self._setting(self._ignore_result, "task_ignore_result"))

    @property
    def acks_late(self) -> bool:
        """True when the message is acked after the task ran instead of before."""
        return bool(self._setting(self._acks_late, "task_acks_late"))

    @property
    def track_started(self) -> bool:
        """True when the STARTED state is stored before the task runs."""
        return bool(self._setting(self._track_started, "task_track_started"))

    @property
    def reject_on_worker_lost(self) -> bool:
        """True when a task whose worker died is requeued instead of failed."""
        return bool(self._setting(self._reject_on_worker_lost, "task_reject_on_worker_lost"))

    @property
    def store_errors_even_if_ignored(self) -> bool:
        """True when failures are stored even with ``ignore_result``."""
        return bool(self._setting(self._store_errors_even_if_ignored, "task_store_errors_even_if_ignored"))

    @property
    def acks_on_failure_or_timeout(self) -> bool:
        """With ``acks_late``: ack failed tasks (True) or reject them (False)."""
        return bool(self._setting(self._acks_on_failure_or_timeout, "task_acks_on_failure_or_timeout"))

    @property
    def default_retry_delay(self) -> float:
        """Seconds before a retry when ``retry()`` gets no countdown or eta."""
        return float(self._setting(self._default_retry_delay, "task_default_retry_delay"))

    # -- calling ------------------------------------------------------------------------------

    @property
    def request(self) -> Context:
        """The request of the current execution of this task (empty outside a task)."""
        return current_request() or _EMPTY

    def check_arguments(self, args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]) -> None:
        """Raise ``TypeError`` when ``args``/``kwargs`` do not fit the task function."""
        if self.typing and self._signature is not None:
            try:
                self._signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise TypeError(f"{self.name}() got arguments that do not match its signature: {exc}") from None

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the task body inline in this process (no message, no result stored)."""
        if self.bind:
            return self.run(self, *args, **kwargs)  # type: ignore[arg-type]
        return self.run(*args, **kwargs)

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult:
        """Send the task with these arguments; shortcut for ``apply_async(args, kwargs)``."""
        return self.apply_async(args, kwargs)  # type: ignore[no-any-return]

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Send the task to a worker; return an :class:`AsyncResult`.

        Options: ``countdown``, ``eta``, ``expires``, ``queue``, ``routing_key``, ``exchange``,
        ``priority``, ``task_id``, ``link``, ``link_error``, ``headers``, ``serializer``,
        ``ignore_result``, ``time_limit``, ``soft_time_limit``, ``compression`` (and the canvas's
        internal ones).
        With ``task_always_eager`` the task runs here and an ``EagerResult`` is returned.
        """
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        self.check_arguments(args, kwargs)
        if self.app.conf.get("task_always_eager"):
            return self.apply(args, kwargs, **options)
        for key, own in (("queue", self.queue), ("priority", self.priority),
                         ("serializer", self.serializer), ("time_limit", self.time_limit),
                         ("soft_time_limit", self.soft_time_limit), ("expires", self.expires),
                         ("shadow", self.shadow), ("compression", self.compression)):
            if own is not None and options.get(key) is None:
                options[key] = own
        if options.get("ignore_result") is None and self._ignore_result is not None:
            options["ignore_result"] = self._ignore_result
        return self.app.send_task(self.name, args, kwargs, **options)

    def apply(self, args: Any = None, kwargs: Any = None, task_id: str | None = None,
              link: Any = None, link_error: Any = None, retries: int = 0,
              throw: bool | None = None, **options: Any) -> EagerResult:
        """Run the task here and now, returning an ``EagerResult`` (retries run inline too)."""
        from celeriac.result import EagerResult

        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        task_id = task_id or str(uuid.uuid4())
        if throw is None:
            throw = bool(self.app.conf.get("task_eager_propagates"))
        while True:
            context = Context(id=task_id, args=args, kwargs=kwargs, retries=retries, is_eager=True,
                              root_id=task_id, task=self.name, headers=options.get("headers"),
                              callbacks=None, errbacks=None, chain=None, delivery_info={})
            push_request(context)
            try:
                retval = self(*args, **kwargs)
            except Retry:
                retries += 1
                continue
            except Exception as exc:
                autoretry = self._autoretry_countdown(exc, retries)
                if autoretry is not None:
                    retries += 1
                    continue
                if throw:
                    raise
                import traceback

                trace = traceback.format_exc()
                result = EagerResult(task_id, exc, states.FAILURE, traceback=trace,
                                     app=self.app, name=self.name)
                self._store_eager(task_id, states.FAILURE, exc, trace, options)
                self._run_eager_errbacks(link_error, context, exc, trace)
                return result
            finally:
                pop_request()
            self._store_eager(task_id, states.SUCCESS, retval, None, options)
            self._run_eager_links(link, (retval,))
            return EagerResult(task_id, retval, states.SUCCESS, app=self.app, name=self.name)

    def _store_eager(self, task_id: str, state: str, result: Any, trace: str | None,
                     options: dict[str, Any]) -> None:
        """Store an eager run's outcome when ``task_store_eager_result`` is on (as Celery does;
        not for ignored results unless a failure and ``store_errors_even_if_ignored``)."""
        if not self.app.conf.get("task_store_eager_result"):
            return
        ignored = options.get("ignore_result")
        if ignored if ignored is not None else self.ignore_result:
            if state != states.FAILURE or not self.store_errors_even_if_ignored:
                return
        backend = self.app.backend
        if backend is not None:
            from celeriac.backends.base import make_meta

            backend.store(task_id, make_meta(task_id, state, result, traceback=trace),
                          correlation_id=task_id)

    @staticmethod
    def _run_eager_links(links: Any, args: tuple[Any, ...]) -> None:
        if not links:
            return
        for link in links if isinstance(links, (list, tuple)) else [links]:
            link.apply(args)

    def _run_eager_errbacks(self, errbacks: Any, context: Context, exc: BaseException, trace: str) -> None:
        """Run the error callbacks of an eager run as the worker does: one whose task takes more
        than one positional argument gets ``(request, exc, traceback)``, the others the task id."""
        if not errbacks:
            return
        from celeriac.worker.trace import _takes_request

        for errback in errbacks if isinstance(errbacks, (list, tuple)) else [errbacks]:
            if _takes_request(self.app.tasks.get(errback.name)):
                errback(context, exc, trace)
            else:
                errback.apply((context.id,))

    def _autoretry_countdown(self, exc: BaseException, retries: int) -> float | None:
        """The countdown for an automatic retry of ``exc``, or None when it must not retry.

        The retry itself is ``self.retry(exc=exc, countdown=..., **self.autoretry_options())``:
        ``retry_kwargs`` (``max_retries`` included) apply to automatic retries only.
        """
        if not self.autoretry_for or not isinstance(exc, self.autoretry_for):
            return None
        if self.dont_autoretry_for and isinstance(exc, self.dont_autoretry_for):
            return None
        max_retries = self.retry_kwargs.get("max_retries", self.max_retries)
        if max_retries is not None and retries >= max_retries:
            return None
        if self.retry_backoff:
            factor = 1.0 if self.retry_backoff is True else float(self.retry_backoff)
            return backoff_countdown(factor, retries, self.retry_backoff_max, self.retry_jitter)
        return float(self.retry_kwargs.get("countdown", self.default_retry_delay))

    def autoretry_options(self) -> dict[str, Any]:
        """The ``retry()`` options of an automatic retry: ``retry_kwargs`` without the countdown
        (computed by :meth:`_autoretry_countdown`, backoff included)."""
        return {k: v for k, v in self.retry_kwargs.items() if k not in ("countdown", "eta", "exc")}

    # -- retries ------------------------------------------------------------------------------

    def retry(self, args: Any = None, kwargs: Any = None, exc: BaseException | None = None,
              throw: bool = True, eta: dt.datetime | None = None, countdown: float | None = None,
              max_retries: int | None = None, **options: Any) -> Retry:
        """Re-send this task (same id, ``retries + 1``) and end the current run.

        Raises :class:`Retry` (the worker stores RETRY) or, when ``max_retries`` is reached,
        re-raises ``exc`` (or :class:`MaxRetriesExceededError`).
        """
        request = self.request
        if request.id is None:
            raise RuntimeError(f"{self.name}.retry() can only be called while the task runs in a worker.")
        limit = self.max_retries if max_retries is None else max_retries
        if limit is not None and request.retries >= limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(
                f"Can't retry {self.name}[{request.id}] args:{request.args} kwargs:{request.kwargs}: "
                f"it was retried {request.retries} times already (max_retries={limit})."
            )
        if eta is None and countdown is None:
            countdown = self.default_retry_delay
        when: Any = eta or countdown
        if request.is_eager:
            if throw:
                raise Retry(exc=exc, when=when)
            return Retry(exc=exc, when=when)
        delivery = request.delivery_info or {}
        queue = options.pop("queue", None)
        if queue is None and delivery.get("exchange", "") == "" and delivery.get("routing_key"):
            queue = delivery["routing_key"]
        timelimit = request.timelimit or (None, None)
        headers = {k: v for k, v in (request.headers or {}).items()
                   if k not in STANDARD_HEADERS} or None
        send = functools.partial(
            self.app.send_task,
            self.name, request.args if args is None else args,
            request.kwargs if kwargs is None else kwargs,
            task_id=request.id, retries=request.retries + 1, countdown=countdown, eta=eta,
            queue=queue, expires=request.expires, group_id=request.group,
            group_index=request.group_index, chord=request.chord, chain=request.chain,
            link=request.callbacks, link_error=request.errbacks, root_id=request.root_id,
            parent_id=request.parent_id, reply_to=request.reply_to, headers=headers,
            time_limit=timelimit[0], soft_time_limit=timelimit[1],
            ignore_result=request.ignore_result, **options,
        )
        error = Retry(exc=exc, when=when)
        if throw:
            # The worker stores RETRY and then sends: sent first, a quick second run could
            # store its final state before this run's RETRY overwrote it.
            error.send = send
            raise error
        send()
        return error

    # -- replacing -----------------------------------------------------------------------------

    def replace(self, sig: Signature) -> Any:
        """End this run and have ``sig`` (a task, chain, group or chord) take its place.

        The replacement inherits this task's id, so a caller's ``AsyncResult`` gets the
        replacement's result (a group's list of results: the group becomes the header of a chord
        into ``celery.accumulate``). It also inherits what came after this task: its link
        callbacks and error callbacks, the rest of its chain, its chord membership and its root
        id, as in Celery. Use ``return self.replace(sig)``.

        In a worker, sends ``sig`` and raises :class:`~celeriac.exceptions.Ignore` (no state is
        stored for this run). When run eagerly (``apply()``), runs ``sig`` here and returns its
        value. Raises ``ImproperlyConfigured`` for a ``sig`` that is a chord member itself (a
        ``chord`` option) or an empty chain.
        """
        request = self.request
        if request.id is None:
            raise RuntimeError(f"{self.name}.replace() can only be called while the task runs.")
        # Results of the replacement's steps answer this task's caller (rpc://), not the worker.
        with self.app.replying_to(None if request.is_eager else request.reply_to):
            return self._replace(request, sig)

    def _replace(self, request: Context, sig: Signature) -> Any:
        from celeriac.canvas import _as_list, _chain, group, maybe_signature, signature

        sig = maybe_signature(sig, self.app)
        if sig.options.get("chord"):
            raise ImproperlyConfigured("A signature replacing a task must not be a chord member itself "
                                       "(it has a 'chord' option): replace with the chord instead.")
        if isinstance(sig, _chain) and not sig.tasks:
            raise ImproperlyConfigured("Cannot replace a task with an empty chain.")
        if isinstance(sig, group):
            # The group's results travel on as one list: the body of a chord that returns them.
            sig = sig | self.app.tasks["celery.accumulate"].s(index=0)
        for callback in _as_list(request.callbacks):
            sig.link(maybe_signature(callback, self.app))
        for errback in _as_list(request.errbacks):
            sig.link_error(maybe_signature(errback, self.app))
        sig.freeze(request.id)
        nesting = (request.replaced_task_nesting or 0) + 1
        inherited: dict[str, Any] = {"chord": request.chord, "group_id": request.group,
                                     "group_index": request.group_index, "root_id": request.root_id}
        sig.set(replaced_task_nesting=nesting, **{k: v for k, v in inherited.items() if v is not None})
        if isinstance(sig, _chain):
            for step in sig.tasks:
                step.set(replaced_task_nesting=nesting)
        for step in reversed(request.chain or []):
            sig = sig | signature(step, app=self.app).set(replaced_task_nesting=nesting)
        return self.on_replace(sig)

    def on_replace(self, sig: Signature) -> Any:
        """Send (or, eager, run) the replacement prepared by :meth:`replace`; override it to act
        on a replacement, calling ``super().on_replace(sig)``.

        Eager: returns the replacement's value. In a worker: raises
        :class:`~celeriac.exceptions.Ignore` once ``sig`` is sent."""
        if self.request.is_eager:
            return sig.apply().get()
        sig.delay()
        raise Ignore("Replaced by new task")

    def add_to_chord(self, sig: Signature, lazy: bool = False) -> Any:
        """Add ``sig`` as one more member of the chord this task is a member of; the chord's
        body then waits for it too and gets its result with the others (at this task's place
        in the list). Returns the sent ``AsyncResult``, or with ``lazy`` the prepared signature
        (send it with ``delay()``).

        Raises ``ValueError`` when this task is not a chord member, and ``NotImplementedError``
        when the result backend cannot change a running chord (Celery: Redis only; Celeriac:
        Redis, SQLite and in-memory).
        """
        request = self.request
        if not request.chord or not request.group:
            raise ValueError(f"{self.name}[{request.id}] is not a member of any chord: add_to_chord "
                             "can only be called by a chord header task while it runs.")
        backend = self.app.backend
        if backend is None:
            raise ValueError("add_to_chord needs a result backend.")
        from celeriac.canvas import chord_size

        sig.set(group_id=request.group, group_index=request.group_index, chord=request.chord,
                root_id=request.root_id)
        # Freezing with the chord's ids makes every member report to it (a group's members too,
        # which would otherwise report to a group id of their own).
        sig.freeze(group_id=request.group, chord=request.chord, group_index=request.group_index,
                   root_id=request.root_id)
        backend.add_to_chord(request.group, chord_size(sig, self.app))
        return sig if lazy else sig.delay()

    # -- signatures ---------------------------------------------------------------------------

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A partial signature of this task: ``add.s(2)``."""
        from celeriac.canvas import Signature

        return Signature(self.name, args, kwargs, {}, app=self.app)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """An immutable signature: parent results are not prepended to its arguments."""
        from celeriac.canvas import Signature

        return Signature(self.name, args, kwargs, {}, immutable=True, app=self.app)

    def signature(self, args: Any = None, kwargs: Any = None, **options: Any) -> Signature:
        """A signature with call options: ``add.signature((2, 2), countdown=10)``."""
        from celeriac.canvas import Signature

        immutable = options.pop("immutable", False)
        return Signature(self.name, args, kwargs, options, immutable=immutable, app=self.app)

    subtask = signature

    def map(self, it: Any) -> Signature:
        """``xmap``: one task call per item, run as one task in the worker."""
        from celeriac.canvas import xmap

        return xmap(self.s(), it, app=self.app)

    def starmap(self, it: Any) -> Signature:
        """``xstarmap``: like ``map`` with each item unpacked as arguments."""
        from celeriac.canvas import xstarmap

        return xstarmap(self.s(), it, app=self.app)

    def chunks(self, it: Any, n: int) -> Signature:
        """Split ``it`` into chunks of ``n`` argument tuples, one task per chunk."""
        from celeriac.canvas import chunks

        return chunks(self.s(), it, n, app=self.app)

    def AsyncResult(self, task_id: str) -> AsyncResult:  # noqa: N802 - Celery API
        """The result handle of ``task_id`` for this task."""
        from celeriac.result import AsyncResult

        return AsyncResult(task_id, app=self.app, task_name=self.name)

    def update_state(self, task_id: str | None = None, state: str | None = None,
                     meta: Any = None) -> None:
        """Store a custom state (e.g. progress) for the current or given task."""
        from celeriac.backends.base import make_meta

        backend = self.app.backend
        task_id = task_id or self.request.id
        if backend is None or task_id is None:
            return
        backend.store(task_id, make_meta(task_id, state or states.PENDING, meta),
                      reply_to=self.request.reply_to, correlation_id=task_id)

    # Overridable handlers, as in Celery.
    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        """Called in the worker after the task succeeded."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Called in the worker after the task failed."""

    def on_retry(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Called in the worker when the task is retried."""

    def after_return(self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any,
                     einfo: Any) -> None:
        """Called in the worker after the task returned, whatever the state."""
