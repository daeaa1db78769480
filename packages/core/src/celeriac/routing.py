"""Broker-neutral queue and exchange declarations, and the task router.

The router resolves where a task message goes, in Celery's order of precedence: options given
at call time win over the task's own attributes, which win over ``task_routes``, which win over
the defaults (``task_default_queue``).
"""

from __future__ import annotations

import fnmatch
import importlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Exchange", "Queue", "Route", "Router"]


@dataclass(frozen=True, slots=True)
class Exchange:
    """An exchange declaration. ``type`` is ``direct``, ``topic`` or ``fanout``."""

    name: str
    type: str = "direct"
    durable: bool = True
    auto_delete: bool = False


@dataclass(frozen=True, slots=True)
class Queue:
    """A queue declaration, bound to ``exchange`` with ``routing_key`` (Celery's defaults)."""

    name: str
    exchange: Exchange | None = None
    routing_key: str | None = None
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    max_priority: int | None = None
    message_ttl: float | None = None
    expires: float | None = None
    queue_arguments: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.exchange is None:
            object.__setattr__(self, "exchange", Exchange(self.name))
        if self.routing_key is None:
            object.__setattr__(self, "routing_key", self.name)

    @property
    def exchange_name(self) -> str:
        """The bound exchange's name."""
        assert self.exchange is not None
        return self.exchange.name

    @property
    def binding_key(self) -> str:
        """The routing key of the binding."""
        return self.routing_key or ""


@dataclass(frozen=True, slots=True)
class Route:
    """Where one message goes: the queue and, when a named exchange is used, exchange + key."""

    queue: Queue
    exchange: str
    routing_key: str


RouterFn = Callable[..., Any]


def _import_callable(path: str) -> Any:
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


class _MapRouter:
    """A dict of task name (exact, glob or compiled regex) to route."""

    def __init__(self, mapping: Mapping[Any, Any]) -> None:
        self.exact: dict[str, Any] = {}
        self.patterns: list[tuple[re.Pattern[str], Any]] = []
        for key, value in mapping.items():
            if isinstance(key, re.Pattern):
                self.patterns.append((key, value))
            elif "*" in key or "?" in key:
                self.patterns.append((re.compile(fnmatch.translate(key)), value))
            else:
                self.exact[key] = value

    def __call__(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if name in self.exact:
            return self.exact[name]
        for pattern, value in self.patterns:
            if pattern.match(name):
                return value
        return None


def _prepare_routers(routes: Any) -> list[RouterFn]:
    if routes is None:
        return []
    if isinstance(routes, (Mapping, str)) or callable(routes):
        routes = [routes]
    routers: list[RouterFn] = []
    for entry in routes:
        if isinstance(entry, str):
            entry = _import_callable(entry)
        if isinstance(entry, Mapping):
            routers.append(_MapRouter(entry))
        elif hasattr(entry, "route_for_task"):
            routers.append(entry.route_for_task)
        elif callable(entry):
            routers.append(entry)
        else:
            raise TypeError(f"task_routes entry {entry!r} is not a dict, a callable or a dotted path.")
    return routers


class Router:
    """Resolves a task call to a :class:`Route`.

    ``queues`` are the declared queues (``task_queues``), ``routes`` the ``task_routes`` setting.
    Queues named but not declared are created as Celery does (exchange and key = queue name).
    """

    def __init__(self, queues: Iterable[Queue], routes: Any, default_queue: str,
                 default_exchange: str, default_routing_key: str,
                 default_exchange_type: str = "direct") -> None:
        self.queues: dict[str, Queue] = {q.name: q for q in queues}
        self.routers = _prepare_routers(routes)
        self.default_queue_name = default_queue
        if default_queue not in self.queues:
            self.queues[default_queue] = Queue(
                default_queue, Exchange(default_exchange, default_exchange_type), default_routing_key
            )
        self._route_cache: dict[str, dict[str, Any]] = {}
        # Dict routers depend on the task name only, so their answer can be cached per name.
        self._cacheable = all(isinstance(r, _MapRouter) for r in self.routers)

    def queue(self, name: str) -> Queue:
        """Return the declared queue ``name``, creating a direct queue when it is unknown."""
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = Queue(name)
        return queue

    def _lookup(self, name: str, args: Any, kwargs: Any, options: Mapping[str, Any]) -> dict[str, Any]:
        for router in self.routers:
            try:
                found = router(name, args, kwargs, options, task=None)
            except TypeError:
                found = router(name, args, kwargs, options)
            if found is None:
                continue
            if isinstance(found, str):
                return {"queue": found}
            if isinstance(found, Queue):
                return {"queue": found}
            return dict(found)
        return {}

    def route(self, name: str, options: Mapping[str, Any], args: Any = (), kwargs: Any = None) -> Route:
        """Resolve the destination of task ``name`` given its call-time ``options``."""
        cacheable = self._cacheable
        if cacheable and name in self._route_cache:
            base = self._route_cache[name]
        else:
            base = self._lookup(name, args, kwargs or {}, options)
            if cacheable:
                self._route_cache[name] = base
        merged = dict(base)
        for key in ("queue", "exchange", "routing_key"):
            value = options.get(key)
            if value is not None:
                merged[key] = value
        queue_value = merged.get("queue")
        if queue_value is None:
            queue = self.queues[self.default_queue_name]
        elif isinstance(queue_value, Queue):
            queue = self.queues.setdefault(queue_value.name, queue_value)
        else:
            queue = self.queue(str(queue_value))
        exchange = merged.get("exchange")
        if isinstance(exchange, Exchange):
            exchange = exchange.name
        routing_key = merged.get("routing_key")
        assert queue.exchange is not None
        if queue.exchange.type == "direct":
            if exchange and routing_key:
                return Route(queue, str(exchange), str(routing_key))
            return Route(queue, "", queue.name)
        return Route(queue, str(exchange or queue.exchange.name), str(routing_key or queue.binding_key))
