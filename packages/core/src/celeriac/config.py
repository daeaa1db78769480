"""Settings with Celery's lowercase names and defaults.

Precedence, lowest first: defaults, ``Celeriac(**settings)`` and ``config_from_object``,
``app.conf.update`` / attribute assignment, then the environment variables
``CELERIAC_BROKER_URL`` and ``CELERIAC_RESULT_BACKEND`` (deployment beats code), then the command
line (``-b``, ``--result-backend``).

Every setting in :data:`DEFAULTS` is honoured. Celery settings that Celeriac does not implement
are listed in :data:`UNSUPPORTED` with the reason: setting one logs a warning instead of being
silently ignored.
"""

from __future__ import annotations

import datetime as dt
import importlib
import logging
import os
import types
from collections.abc import Iterator, Mapping
from typing import Any

from celeriac.exceptions import ImproperlyConfigured

__all__ = ["DEFAULTS", "DEFAULT_BROKER_URL", "UNSUPPORTED", "Settings"]

logger = logging.getLogger("celeriac")

DEFAULT_BROKER_URL = "sqlite:///celeriac-broker.db"

DEFAULTS: dict[str, Any] = {
    "broker_url": None,
    "broker_transport_options": {},
    "broker_connection_retry": True,
    "broker_connection_max_retries": 100,
    "broker_heartbeat": 120,
    "result_backend": None,
    "result_backend_transport_options": {},
    "result_serializer": "json",
    "result_expires": dt.timedelta(days=1),
    "result_persistent": False,
    "result_extended": False,
    "task_default_queue": "celery",
    "task_default_exchange": None,
    "task_default_exchange_type": "direct",
    "task_default_routing_key": None,
    "task_default_priority": None,
    "task_default_rate_limit": None,
    "task_default_retry_delay": 180,
    "task_queues": None,
    "task_queue_max_priority": None,
    "task_create_missing_queues": True,
    "task_routes": None,
    "task_serializer": "json",
    "task_compression": None,
    "accept_content": ["json"],
    "task_ignore_result": False,
    "task_store_errors_even_if_ignored": False,
    "task_track_started": False,
    "task_acks_late": False,
    "task_acks_on_failure_or_timeout": True,
    "task_reject_on_worker_lost": False,
    "task_always_eager": False,
    "task_eager_propagates": False,
    "task_store_eager_result": False,
    "task_time_limit": None,
    "task_soft_time_limit": None,
    "task_inherit_parent_priority": False,
    "task_send_sent_event": False,
    "timezone": None,
    "enable_utc": True,
    "worker_concurrency": None,
    "worker_max_tasks_per_child": None,
    "worker_max_memory_per_child": None,
    "worker_prefetch_multiplier": 4,
    "worker_disable_rate_limits": False,
    "worker_send_task_events": False,
    # Celeriac's own: process pools whose children consume from the broker themselves
    # (celeriac_prefork.direct); off means the parent consumes and hands tasks to the children.
    "worker_direct_consume": True,
    # Celeriac's own: at most this many glibc malloc arenas in a worker process (see
    # celeriac.worker.malloc); None or 0 keeps glibc's default, MALLOC_ARENA_MAX overrides it.
    "worker_malloc_arena_max": 2,
}

#: Celery settings Celeriac accepts but does not implement, with what to do instead. Setting one
#: logs a warning (once per name and process).
UNSUPPORTED: dict[str, str] = {
    "broker_connection_retry_on_startup": "the worker retries its first connection like later "
                                          "ones, per broker_connection_retry",
    "result_accept_content": "results are decoded with the result_serializer's content type",
    "worker_deduplicate_successful_tasks": "use idempotent tasks with acks_late",
    "worker_hijack_root_logger": "the worker configures logging only when run from the CLI",
    "control_exchange": "remote control always uses Celery's default 'celery.pidbox' exchange",
    "event_exchange": "events always use Celery's default 'celeryev' exchange",
    "task_protocol": "Celeriac always sends protocol 2 (and reads 1 and 2)",
    "result_compression": "results are stored uncompressed",
    "worker_pool_restarts": "pool restarts by remote control are not implemented",
    "worker_autoscaler": "autoscaling is not implemented",
}
_warned: set[str] = set()

_ENV_OVERRIDES = {"broker_url": "CELERIAC_BROKER_URL", "result_backend": "CELERIAC_RESULT_BACKEND"}


class Settings(Mapping[str, Any]):
    """The app's configuration: a mapping with attribute access (``app.conf.broker_url``).

    Unknown keys are kept (plugins read their own settings). Reading a key that is neither set
    nor a known default raises ``KeyError`` with the name.
    """

    def __init__(self, initial: Mapping[str, Any] | None = None) -> None:
        object.__setattr__(self, "_data", dict(DEFAULTS))
        object.__setattr__(self, "_changes", 0)
        if initial:
            self.update(initial)

    # Mapping protocol
    def __getitem__(self, key: str) -> Any:
        if key in _ENV_OVERRIDES:
            env = os.environ.get(_ENV_OVERRIDES[key])
            if env:
                return env
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str, default: Any = None) -> Any:
        """Like ``dict.get``, with the environment overrides applied."""
        try:
            return self[key]
        except KeyError:
            return default

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"No setting named {key!r}.") from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __setitem__(self, key: str, value: Any) -> None:
        if key in UNSUPPORTED and key not in _warned and value is not None:
            _warned.add(key)
            logger.warning("The setting %s is not supported by Celeriac and is ignored: %s.",
                           key, UNSUPPORTED[key])
        self._data[key] = value
        object.__setattr__(self, "_changes", self._changes + 1)

    @property
    def version(self) -> int:
        """Increases on every change, so cached derived values know when to rebuild."""
        return int(self._changes)

    def update(self, other: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        """Set many settings at once (``app.conf.update(result_expires=3600)``)."""
        for source in (other or {}, kwargs):
            for key, value in source.items():
                self[key] = value

    def setdefault(self, key: str, value: Any) -> Any:
        """Set ``key`` to ``value`` unless it is already set; return the current value."""
        if key not in self._data or self._data[key] is None:
            self[key] = value
        return self[key]

    def from_object(self, obj: Any) -> None:
        """Load every lowercase public attribute of ``obj`` (a module, class or dotted path)."""
        if isinstance(obj, str):
            try:
                obj = importlib.import_module(obj)
            except ImportError:
                module_name, _, attr = obj.rpartition(":") if ":" in obj else obj.rpartition(".")
                try:
                    obj = getattr(importlib.import_module(module_name), attr)
                except (ImportError, AttributeError, ValueError) as exc:
                    raise ImproperlyConfigured(
                        f"Cannot load configuration from {obj!r}: {exc}. Give an importable "
                        "module name such as 'proj.celeryconfig'."
                    ) from exc
        values = obj if isinstance(obj, Mapping) else {
            name: getattr(obj, name) for name in dir(obj) if not name.startswith("_")
        }
        for key, value in values.items():
            if key in DEFAULTS or (key.islower() and not callable(value)
                                   and not isinstance(value, types.ModuleType)):
                self[key] = value

    # Derived values Celery computes from others
    @property
    def default_exchange(self) -> str:
        """``task_default_exchange``, or the default queue's name."""
        return str(self._data["task_default_exchange"] or self._data["task_default_queue"])

    @property
    def default_routing_key(self) -> str:
        """``task_default_routing_key``, or the default queue's name."""
        return str(self._data["task_default_routing_key"] or self._data["task_default_queue"])

    def __repr__(self) -> str:
        changed = {k: v for k, v in self._data.items() if DEFAULTS.get(k, object()) != v}
        return f"<Settings {changed!r}>"
