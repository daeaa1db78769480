"""The application object: settings, the task registry, and the client side of sending tasks."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import importlib
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

from celeriac import current
from celeriac.config import DEFAULT_BROKER_URL, Settings
from celeriac.exceptions import ImproperlyConfigured, NotRegistered, QueueNotFound
from celeriac.protocol import encode_task, parse_iso8601
from celeriac.routing import Queue, Router
from celeriac.task import P, R, Task, current_request

if TYPE_CHECKING:
    from celeriac.backends.base import ResultBackend
    from celeriac.broker.base import Broker
    from celeriac.canvas import Signature
    from celeriac.control import Control
    from celeriac.result import AsyncResult, GroupResult
    from celeriac.result import AsyncResult as _AsyncResult

__all__ = ["Celeriac", "Celery", "SharedTask", "TaskRegistry", "shared_task"]

T = TypeVar("T")

#: Every ``@shared_task`` defined so far (task definitions, not apps: no app is kept alive here).
_shared_tasks: list[SharedTask] = []


class _AliveApps(Sequence["Celeriac"]):
    """A read-only view of the apps alive, the current app last (``_apps[-1]``).

    Kept for modules that still look up ``celeriac.app._apps``; it holds no reference to any
    app (:mod:`celeriac.current` owns the current app)."""

    def _snapshot(self) -> list[Celeriac]:
        apps = current.all_apps()
        now = current.get_current_app()
        if now is not None and now in apps:
            apps.remove(now)
            apps.append(now)
        return apps

    @overload
    def __getitem__(self, index: int) -> Celeriac: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Celeriac]: ...

    def __getitem__(self, index: int | slice) -> Celeriac | Sequence[Celeriac]:
        return self._snapshot()[index]

    def __len__(self) -> int:
        return len(self._snapshot())


_apps = _AliveApps()


class TaskRegistry(dict[str, "Task[Any, Any]"]):
    """Task name to task. A missing name raises ``NotRegistered`` with a hint."""

    def __missing__(self, key: str) -> Task[Any, Any]:
        raise NotRegistered(
            f"Task {key!r} is not registered in this app. Check the worker imports the module "
            "that defines it (the app's include=[...] or the -A module)."
        )


def _to_utc(value: dt.datetime, local: dt.tzinfo | None = None) -> dt.datetime:
    """``value`` in UTC. Naive datetimes are UTC (Celery's ``enable_utc=True``), or wall-clock
    time in ``local`` when given (``enable_utc=False``: the app's ``timezone``)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=local or dt.timezone.utc)
    return value.astimezone(dt.timezone.utc)


# Forks of this process so far (counted in the child): the connections' owner check costs an
# integer comparison per publish instead of a getpid() call.
_forks = [0]


def _count_fork() -> None:
    _forks[0] += 1


if hasattr(os, "register_at_fork"):  # no fork(), no forks to notice
    os.register_at_fork(after_in_child=_count_fork)


class Celeriac:
    """A Celeriac application: ``Celeriac('proj', broker=..., backend=..., include=[...])``.

    Without ``broker`` the embedded SQLite broker in the current directory is used; without
    ``backend`` results are not kept. Keyword arguments are settings (Celery's lowercase names).
    The new app becomes the current app (:mod:`celeriac.current`, used by ``@shared_task``)
    unless ``set_as_current=False``.
    """

    def __init__(self, main: str | None = None, broker: str | None = None, backend: str | None = None,
                 include: Iterable[str] = (), config_source: Any = None, set_as_current: bool = True,
                 **settings: Any) -> None:
        self.main = main
        self.conf = Settings()
        if config_source is not None:
            self.conf.from_object(config_source)
        if broker:
            self.conf["broker_url"] = broker
        if backend:
            self.conf["result_backend"] = backend
        self.conf.update(settings)
        self.include = list(include)
        self.tasks = TaskRegistry()
        self._local = threading.local()
        self._pid = os.getpid()
        self._forks = _forks[0]
        self._broker: Broker | None = None
        self._backend: ResultBackend | None = None
        self._router: Router | None = None
        self._router_version = -1
        self._tz: tuple[str, dt.tzinfo] | None = None
        self._declared_queues: frozenset[str] = frozenset()
        self._strict_queues = False
        self._sent_event_on = False
        self._sent_events: Any = None
        self._inherited: list[Any] = []
        self._lock = threading.RLock()
        current.register_app(self, make_current=set_as_current)
        for shared in list(_shared_tasks):
            shared.task_for(self)
        self._register_builtins()

    def __repr__(self) -> str:
        return f"<Celeriac {self.main or '__main__'} at {id(self):#x}>"

    def set_current(self) -> None:
        """Make this app the current app (what ``@shared_task`` tasks send with)."""
        current.set_current_app(self)

    # -- configuration ----------------------------------------------------------------------

    def config_from_object(self, obj: Any) -> None:
        """Load settings from a module, class, mapping or dotted path."""
        self.conf.from_object(obj)

    @property
    def broker_url(self) -> str:
        """The broker URL in effect (the embedded SQLite broker when none is configured)."""
        return str(self.conf.get("broker_url") or DEFAULT_BROKER_URL)

    @property
    def backend_url(self) -> str | None:
        """The result backend URL in effect, or None when results are disabled."""
        url = self.conf.get("result_backend")
        if not url or url in ("disabled", "disabled://"):
            return None
        return str(url)

    # -- connections --------------------------------------------------------------------------

    def _check_fork(self) -> None:
        if self._forks != _forks[0] and self._pid != os.getpid():
            # A forked child must not share its parent's sockets: it opens its own, and keeps
            # the inherited objects referenced so that their finalizers never close the
            # parent's connections.
            self._pid = os.getpid()
            self._forks = _forks[0]
            self._inherited.extend(x for x in (self._broker, self._backend) if x is not None)
            self._broker = None
            self._backend = None
            self._sent_events = None

    @property
    def broker(self) -> Broker:
        """This process's broker connection, created on first use."""
        self._check_fork()
        if self._broker is None:
            with self._lock:
                if self._broker is None:
                    from celeriac.plugins import create_broker

                    self._broker = create_broker(self.broker_url, self.conf)
        return self._broker

    @property
    def backend(self) -> ResultBackend | None:
        """This process's result backend, or None when results are disabled."""
        self._check_fork()
        if self._backend is None:
            url = self.backend_url
            if url is None:
                return None
            with self._lock:
                if self._backend is None:
                    from celeriac.plugins import create_backend

                    self._backend = create_backend(url, self.conf)
        return self._backend

    def setup_security(self, allowed_serializers: Any = None, key: str | None = None,
                       key_password: str | bytes | None = None, cert: str | None = None,
                       store: str | None = None, digest: str | None = None,
                       serializer: str = "json") -> Any:
        """Sign task messages and accept only signed ones, as Celery's ``app.setup_security``:
        see :func:`celeriac.security.setup_security` (arguments, settings, errors). Needs
        ``pip install 'celeriac[auth]'``."""
        from celeriac.security import setup_security

        return setup_security(self, allowed_serializers, key=key, key_password=key_password,
                              cert=cert, store=store, digest=digest, serializer=serializer)

    def close(self) -> None:
        """Close the broker and backend connections of this process."""
        with self._lock:
            self._sent_events = None
            if self._broker is not None:
                self._broker.close()
                self._broker = None
            if self._backend is not None:
                self._backend.close()
                self._backend = None

    @property
    def router(self) -> Router:
        """The router built from ``task_queues`` and ``task_routes`` (rebuilt when they change)."""
        if self._router is None or self._router_version != self.conf.version:
            queues = self.conf.get("task_queues") or ()
            max_priority = self.conf.get("task_queue_max_priority")
            default_queue = self.conf["task_default_queue"]
            self._router = Router(
                [q if isinstance(q, Queue) else Queue(str(q)) for q in queues],
                self.conf.get("task_routes"),
                default_queue,
                self.conf.default_exchange,
                self.conf.default_routing_key,
                self.conf["task_default_exchange_type"],
            )
            if max_priority and not queues:
                self._router.queues[default_queue] = Queue(
                    default_queue, routing_key=self.conf.default_routing_key, max_priority=max_priority
                )
            self._declared_queues = frozenset(self._router.queues)
            # Send-path settings, read once per configuration change rather than per message.
            self._strict_queues = not self.conf.get("task_create_missing_queues", True)
            self._sent_event_on = bool(self.conf.get("task_send_sent_event"))
            self._router_version = self.conf.version
        return self._router

    @contextlib.contextmanager
    def replying_to(self, reply_to: str | None) -> Iterator[None]:
        """Within the block, tasks sent from this thread name ``reply_to`` (a reply queue name,
        e.g. a running task's ``request.reply_to``) instead of :attr:`thread_oid`: their results
        reach that caller through ``rpc://``. ``None`` changes nothing. ``Task.replace`` uses it so
        the replacement answers the original caller, not the worker."""
        if not reply_to:
            yield
            return
        saved = getattr(self._local, "oid", None)
        self._local.oid = reply_to
        try:
            yield
        finally:
            self._local.oid = saved

    @property
    def thread_oid(self) -> str:
        """A per-thread id (uuid3) used as the ``reply_to`` of sent tasks, as Celery does."""
        oid: str | None = getattr(self._local, "oid", None)
        if oid is None:
            name = f"{uuid.getnode():x}-{os.getpid():x}-{threading.get_ident():x}-{id(self):x}"
            oid = str(uuid.uuid3(uuid.NAMESPACE_OID, name))
            self._local.oid = oid
        return oid

    @property
    def timezone(self) -> dt.tzinfo:
        """The ``timezone`` setting as a tzinfo (UTC when unset)."""
        name = self.conf.get("timezone")
        if not name:
            return dt.timezone.utc
        if self._tz is None or self._tz[0] != name:
            try:
                from zoneinfo import ZoneInfo

                self._tz = (name, ZoneInfo(str(name)))
            except Exception as exc:
                raise ImproperlyConfigured(
                    f"timezone={name!r} is not a known time zone ({exc}); use an IANA name such as "
                    "'Europe/London'."
                ) from exc
        return self._tz[1]

    def now(self) -> dt.datetime:
        """The current time, aware, in the app's ``timezone`` (UTC by default)."""
        return dt.datetime.now(self.timezone)

    # -- tasks --------------------------------------------------------------------------------

    def _register_builtins(self) -> None:
        from celeriac.builtins import register_builtins

        register_builtins(self)

    def gen_task_name(self, fn: Callable[..., Any]) -> str:
        """Celery's naming: ``module.function``; ``__main__`` becomes the app's main name."""
        module = fn.__module__
        if module == "__main__" and self.main:
            module = self.main
        return f"{module}.{fn.__name__}"

    @overload
    def task(self, fn: Callable[P, R]) -> Task[P, R]: ...

    @overload
    def task(self, fn: None = None, **options: Any) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(self, fn: Callable[P, R] | None = None, **options: Any) -> Any:
        """Register a function as a task: ``@app.task`` or ``@app.task(bind=True, ...)``."""
        def decorate(func: Callable[P, R]) -> Task[P, R]:
            base = options.pop("base", None) or Task
            name = options.pop("name", None) or self.gen_task_name(func)
            task = base(func, app=self, name=name, **options)
            self.tasks[name] = task
            return task  # type: ignore[no-any-return]

        if fn is not None and callable(fn) and not options:
            return decorate(fn)
        return decorate

    def register_task(self, task: Task[Any, Any]) -> Task[Any, Any]:
        """Add an already built task to the registry."""
        self.tasks[task.name] = task
        return task

    def import_includes(self) -> None:
        """Import the ``include`` modules so their tasks are registered (done by the worker)."""
        for module in self.include:
            importlib.import_module(module)

    def signature(self, name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Signature:
        """A signature of the task called ``name`` (it need not be registered here)."""
        from celeriac.canvas import Signature

        return Signature(name, args, kwargs, options, app=self)

    def AsyncResult(self, task_id: str, **kwargs: Any) -> AsyncResult:  # noqa: N802 - Celery API
        """The result handle of ``task_id``."""
        from celeriac.result import AsyncResult

        return AsyncResult(task_id, app=self, **kwargs)

    def GroupResult(self, group_id: str, results: list[Any] | None = None) -> GroupResult:  # noqa: N802
        """The result handle of a group."""
        from celeriac.result import GroupResult

        return GroupResult(group_id, results or [], app=self)

    @property
    def control(self) -> Control:
        """Remote control of workers (``app.control.revoke``, ``inspect()``)."""
        from celeriac.control import Control

        return Control(self)

    # -- command line -------------------------------------------------------------------------

    def start(self, argv: list[str] | None = None) -> None:
        """Run the ``celeriac`` command line for this app, as ``celeriac -A <app> ...`` would.

        ``argv`` is the list of arguments after the program name (default: ``sys.argv[1:]``),
        e.g. ``app.start(["worker", "-l", "info"])``. Exits the process with the command's exit
        code (``SystemExit``), like the command line.
        """
        import sys

        from celeriac.cli.main import main

        # ``python -m proj.celery worker``: the module runs as ``__main__``. Register it under its
        # own name too, so ``from proj.celery import app`` in the task modules finds this app
        # instead of importing the module a second time and building another app.
        module = sys.modules.get("__main__")
        spec = getattr(module, "__spec__", None)
        if (spec is not None and spec.name and spec.name not in sys.modules
                and any(value is self for value in vars(module).values())):
            sys.modules[spec.name] = module  # type: ignore[assignment]
        main(argv, app=self)

    def worker_main(self, argv: list[str] | None = None) -> None:
        """Start a worker for this app from command-line arguments: ``app.worker_main(["worker", "-l", "info"])``.

        Raises ``ValueError`` when ``argv`` does not name the ``worker`` command (use
        :meth:`start` for other commands)."""
        from celeriac.cli.main import command_args

        args = command_args(argv)
        if "worker" not in args:
            raise ValueError("The worker sub-command must be given in argv, e.g. "
                             "app.worker_main(['worker', '-l', 'info']); use app.start() for other commands.")
        self.start(args)

    # -- sending ------------------------------------------------------------------------------

    def send_task(self, name: str, args: Any = None, kwargs: Any = None, *,
                  countdown: float | None = None, eta: dt.datetime | str | None = None,
                  expires: float | dt.datetime | str | None = None, task_id: str | None = None,
                  queue: str | Queue | None = None, routing_key: str | None = None,
                  exchange: str | None = None, priority: int | None = None,
                  link: Any = None, link_error: Any = None, headers: Mapping[str, Any] | None = None,
                  serializer: str | None = None, ignore_result: bool | None = None,
                  time_limit: float | None = None, soft_time_limit: float | None = None,
                  group_id: str | None = None, group_index: int | None = None,
                  chord: Any = None, chain: list[Any] | None = None, retries: int = 0,
                  parent_id: str | None = None, root_id: str | None = None,
                  shadow: str | None = None, reply_to: str | None = None,
                  replaced_task_nesting: int = 0, compression: str | None = None,
                  **extra: Any) -> _AsyncResult:
        """Send the task called ``name`` by name; return its :class:`AsyncResult`.

        The options are those of ``Task.apply_async``. The task does not have to be
        registered in this process. ``compression`` (default ``task_compression``: None) is
        ``"gzip"``, ``"bzip2"``, ``"lzma"``, ``"brotli"`` or ``"zstd"``, as in Celery.
        """
        from celeriac.result import AsyncResult

        task_id = task_id or str(uuid.uuid4())
        args = list(args or ())
        kwargs = dict(kwargs or {})
        # Every time is computed in UTC: seconds added to a local wall-clock time would be off
        # by the DST change between now and then.
        now = None
        eta_iso: str | None = None
        not_before: float | None = None
        if countdown is not None:
            now = self.now().astimezone(dt.timezone.utc)
            eta_dt = now + dt.timedelta(seconds=float(countdown))
            eta_iso, not_before = eta_dt.isoformat(), eta_dt.timestamp()
        elif eta is not None:
            eta_dt = self._utc(eta)
            eta_iso, not_before = eta_dt.isoformat(), eta_dt.timestamp()
        expires_iso: str | None = None
        expiration_ms: int | None = None
        if expires is not None:
            now = now or self.now().astimezone(dt.timezone.utc)
            if isinstance(expires, (int, float)):
                expires_dt = now + dt.timedelta(seconds=float(expires))
            else:
                expires_dt = self._utc(expires)
            expires_iso = expires_dt.isoformat()
            expiration_ms = int((expires_dt - now).total_seconds() * 1000)
        parent = current_request()
        if parent is not None and not parent.is_eager:
            parent_id = parent_id or parent.id
            root_id = root_id or parent.root_id
            if priority is None and self.conf.get("task_inherit_parent_priority"):
                priority = (parent.delivery_info or {}).get("priority")
        if priority is None:
            priority = self.conf.get("task_default_priority")
        route = self.router.route(
            name, {"queue": queue, "routing_key": routing_key, "exchange": exchange}, args, kwargs
        )
        if self._strict_queues and route.queue.name not in self._declared_queues:
            raise QueueNotFound(
                f"Task {name} is routed to queue {route.queue.name!r}, which is not in task_queues, "
                "and task_create_missing_queues is False: declare the queue in task_queues."
            )
        if ignore_result is None:
            ignore_result = bool(self.conf.get("task_ignore_result"))
        message = encode_task(
            name, task_id, args, kwargs,
            serializer=serializer or self.conf["task_serializer"],
            eta=eta_iso, expires=expires_iso, expiration_ms=expiration_ms,
            group=group_id, group_index=group_index, retries=retries,
            timelimit=(time_limit, soft_time_limit), root_id=root_id, parent_id=parent_id,
            shadow=shadow, ignore_result=ignore_result,
            callbacks=_sig_list(link), errbacks=_sig_list(link_error),
            chain=[dict(s) for s in chain] if chain else None,
            chord=dict(chord) if chord is not None else None,
            reply_to=reply_to or self.thread_oid, priority=priority,
            extra_headers=dict(headers) if headers else None,
            replaced_task_nesting=replaced_task_nesting,
            compression=compression or self.conf.get("task_compression"),
        )
        backend = self.backend
        if backend is not None and not ignore_result:
            backend.on_task_call(task_id, message.properties["reply_to"])
        broker = self.broker
        broker.publish(message, route.exchange, route.routing_key, queue=route.queue,
                       not_before=not_before)
        if self._sent_event_on:
            self._send_sent_event(message.headers, route.queue.name, route.exchange, route.routing_key)
        result = AsyncResult(task_id, app=self, task_name=name)
        result.ignored = bool(ignore_result)
        return result

    def _send_sent_event(self, headers: Mapping[str, Any], queue: str, exchange: str,
                         routing_key: str) -> None:
        """The ``task-sent`` event (``task_send_sent_event``), with Celery's fields."""
        if self._sent_events is None:
            from celeriac.events import EventDispatcher
            from celeriac.protocol import default_origin

            self._sent_events = EventDispatcher(self.broker, default_origin().partition("@")[2] or "")
        self._sent_events.send(
            "task-sent", uuid=headers["id"], root_id=headers.get("root_id"),
            parent_id=headers.get("parent_id"), name=headers["task"], args=headers.get("argsrepr"),
            kwargs=headers.get("kwargsrepr"), retries=headers.get("retries"), eta=headers.get("eta"),
            expires=headers.get("expires"), queue=queue, exchange=exchange, routing_key=routing_key)


    def _utc(self, value: dt.datetime | str) -> dt.datetime:
        """A user's ``eta``/``expires`` (datetime or ISO 8601 string) in UTC; naive values are
        UTC, or wall-clock time in ``timezone`` with ``enable_utc=False``."""
        local = dt.timezone.utc if self.conf.get("enable_utc", True) else self.timezone
        return _to_utc(parse_iso8601(value, local) if isinstance(value, str) else value, local)


def _sig_list(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [dict(v) for v in value] or None
    return [dict(value)]


Celery = Celeriac


class SharedTask:
    """A task defined with ``@shared_task``: bound to the current app when it is used.

    Every attribute and method is the one of the task registered in the current app
    (:func:`celeriac.current.current_app`), looked up at call time, so a module imported before
    the app was created still sends to that app's broker. Every app registers it as well, so a
    worker of any app runs it.
    """

    def __init__(self, fn: Callable[..., Any], options: dict[str, Any]) -> None:
        self.__wrapped__ = fn
        self._options = options
        functools.update_wrapper(self, fn, updated=())

    def task_for(self, app: Celeriac) -> Task[Any, Any]:
        """This task as registered in ``app`` (registered now if it is not yet)."""
        name = self._options.get("name") or app.gen_task_name(self.__wrapped__)
        found = app.tasks.get(name)
        if found is None:
            found = app.task(**dict(self._options))(self.__wrapped__)
        return found

    @property
    def app(self) -> Celeriac:
        """The current app (raises ``ImproperlyConfigured`` when none exists)."""
        return current.current_app()

    @property
    def task(self) -> Task[Any, Any]:
        """The task registered in the current app."""
        return self.task_for(current.current_app())

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.task, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the body inline (no app needed unless the task is bound)."""
        if not self._options.get("bind") and current.get_current_app() is None:
            return self.__wrapped__(*args, **kwargs)
        return self.task(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<@shared_task: {self._options.get('name') or self.__wrapped__.__qualname__}>"


def shared_task(fn: Callable[..., Any] | None = None, **options: Any) -> Any:
    """Define a task for every app, current and future (for reusable libraries, Django apps).

    Returns a :class:`SharedTask`: ``add.delay()`` sends with the app that is current at call
    time, so the module may be imported before the app is created.
    """
    def decorate(func: Callable[..., Any]) -> SharedTask:
        shared = SharedTask(func, dict(options))
        _shared_tasks.append(shared)
        for app in current.all_apps():
            shared.task_for(app)
        return shared

    if fn is not None and callable(fn) and not options:
        return decorate(fn)
    return decorate
