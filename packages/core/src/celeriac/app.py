"""The application object: settings, the task registry, and the client side of sending tasks."""

from __future__ import annotations

import datetime as dt
import importlib
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, overload

from celeriac.config import DEFAULT_BROKER_URL, Settings
from celeriac.exceptions import ImproperlyConfigured, NotRegistered
from celeriac.protocol import encode_task
from celeriac.routing import Queue, Router
from celeriac.task import P, R, Task, current_request

if TYPE_CHECKING:
    from celeriac.backends.base import ResultBackend
    from celeriac.broker.base import Broker
    from celeriac.canvas import Signature
    from celeriac.control import Control
    from celeriac.result import AsyncResult, GroupResult
    from celeriac.result import AsyncResult as _AsyncResult

__all__ = ["Celeriac", "Celery", "TaskRegistry", "shared_task"]

T = TypeVar("T")

_shared_tasks: list[Callable[[Celeriac], Any]] = []
_apps: list[Celeriac] = []


class TaskRegistry(dict[str, "Task[Any, Any]"]):
    """Task name to task. A missing name raises ``NotRegistered`` with a hint."""

    def __missing__(self, key: str) -> Task[Any, Any]:
        raise NotRegistered(
            f"Task {key!r} is not registered in this app. Check the worker imports the module "
            "that defines it (the app's include=[...] or the -A module)."
        )


def _to_utc(value: dt.datetime) -> dt.datetime:
    """Naive datetimes are taken as UTC, as Celery does with ``enable_utc``."""
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value


class Celeriac:
    """A Celeriac application: ``Celeriac('proj', broker=..., backend=..., include=[...])``.

    Without ``broker`` the embedded SQLite broker in the current directory is used; without
    ``backend`` results are not kept. Keyword arguments are settings (Celery's lowercase names).
    """

    def __init__(self, main: str | None = None, broker: str | None = None, backend: str | None = None,
                 include: Iterable[str] = (), config_source: Any = None, **settings: Any) -> None:
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
        self._broker: Broker | None = None
        self._backend: ResultBackend | None = None
        self._router: Router | None = None
        self._router_version = -1
        self._tz: tuple[str, dt.tzinfo] | None = None
        self._inherited: list[Any] = []
        self._lock = threading.RLock()
        _apps.append(self)
        for register in _shared_tasks:
            register(self)
        self._register_builtins()

    def __repr__(self) -> str:
        return f"<Celeriac {self.main or '__main__'} at {id(self):#x}>"

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
        if self._pid != os.getpid():
            # A forked child must not share its parent's sockets: it opens its own, and keeps
            # the inherited objects referenced so that their finalizers never close the
            # parent's connections.
            self._pid = os.getpid()
            self._inherited.extend(x for x in (self._broker, self._backend) if x is not None)
            self._broker = None
            self._backend = None

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

    def close(self) -> None:
        """Close the broker and backend connections of this process."""
        with self._lock:
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
            self._router_version = self.conf.version
        return self._router

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
                  replaced_task_nesting: int = 0, **extra: Any) -> _AsyncResult:
        """Send the task called ``name`` by name; return its :class:`AsyncResult`.

        The options are those of ``Task.apply_async``. The task does not have to be
        registered in this process.
        """
        from celeriac.result import AsyncResult

        task_id = task_id or str(uuid.uuid4())
        args = list(args or ())
        kwargs = dict(kwargs or {})
        now = None
        eta_iso: str | None = None
        not_before: float | None = None
        if countdown is not None:
            now = self.now()
            eta_dt = now + dt.timedelta(seconds=float(countdown))
            eta_iso, not_before = eta_dt.isoformat(), eta_dt.timestamp()
        elif eta is not None:
            eta_dt = _to_utc(dt.datetime.fromisoformat(eta) if isinstance(eta, str) else eta)
            eta_iso, not_before = eta_dt.isoformat(), eta_dt.timestamp()
        expires_iso: str | None = None
        expiration_ms: int | None = None
        if expires is not None:
            now = now or self.now()
            if isinstance(expires, (int, float)):
                expires_dt = now + dt.timedelta(seconds=float(expires))
            elif isinstance(expires, str):
                expires_dt = _to_utc(dt.datetime.fromisoformat(expires))
            else:
                expires_dt = _to_utc(expires)
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
        )
        backend = self.backend
        if backend is not None and not ignore_result:
            backend.on_task_call(task_id, message.properties["reply_to"])
        broker = self.broker
        broker.publish(message, route.exchange, route.routing_key, queue=route.queue,
                       not_before=not_before)
        return AsyncResult(task_id, app=self, task_name=name)


def _sig_list(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [dict(v) for v in value] or None
    return [dict(value)]


Celery = Celeriac


def shared_task(fn: Callable[..., Any] | None = None, **options: Any) -> Any:
    """Define a task for every app, current and future (for reusable libraries)."""
    def decorate(func: Callable[..., Any]) -> Any:
        def register(app: Celeriac) -> Any:
            name = options.get("name") or app.gen_task_name(func)
            if name in app.tasks:
                return app.tasks[name]
            return app.task(**options)(func)

        _shared_tasks.append(register)
        created = [register(app) for app in _apps]
        if created:
            return created[-1]
        # No app exists yet: register with a default one so the task is still callable.
        return register(Celeriac())

    if fn is not None and callable(fn) and not options:
        return decorate(fn)
    return decorate
