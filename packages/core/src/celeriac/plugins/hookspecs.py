"""Hook specifications: the manual for Celeriac plugin authors.

A plugin is a module of ``@hookimpl`` functions, published under the ``celeriac`` entry-point
group of its distribution::

    [project.entry-points.celeriac]
    redis = "celeriac_redis.plugin"

Discovery hooks (brokers, backends, pools, serializers, CLI commands) are called once per process
at the first lookup; their results are cached. Task lifecycle hooks are called per task only when
at least one plugin implements them. Hooks must not raise for ordinary input; an exception in a
lifecycle hook is logged and the task goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from celeriac.backends.base import ResultBackend
    from celeriac.broker.base import Broker
    from celeriac.serialization import Serializer
    from celeriac.worker.pool import Pool

hookspec = pluggy.HookspecMarker("celeriac")
hookimpl = pluggy.HookimplMarker("celeriac")

BrokerFactory = Callable[[str, Mapping[str, Any]], "Broker"]
BackendFactory = Callable[[str, Mapping[str, Any]], "ResultBackend"]
PoolFactory = Callable[..., "Pool"]


@hookspec
def celeriac_brokers() -> Mapping[str, BrokerFactory]:
    """Return URL schemes mapped to broker factories.

    A factory is called as ``factory(url, conf)`` with the full broker URL and the app's settings
    and returns a :class:`celeriac.broker.base.Broker`. It must not connect yet. Example:
    ``{"redis": RedisBroker, "rediss": RedisBroker}``. A scheme ending in ``+`` claims every
    scheme that starts with it and no plugin registers exactly (``"kombu+"`` serves
    ``kombu+sqs://`` and ``kombu+sqla+postgresql://``). The plugin's distribution declares the
    celeriac versions it supports as ``celeriac>=X,<Y`` (see :data:`celeriac.plugins.SPI_VERSION`).
    """


@hookspec
def celeriac_result_backends() -> Mapping[str, BackendFactory]:
    """Return URL schemes mapped to result backend factories.

    ``factory(url, conf)`` returns a :class:`celeriac.backends.base.ResultBackend`. A backend
    that needs the broker (``rpc``) creates its own connection with
    ``celeriac.plugins.create_broker(conf["broker_url"], conf)``.
    """


@hookspec
def celeriac_pools() -> Mapping[str, PoolFactory]:
    """Return pool names mapped to pool factories.

    ``factory(concurrency=N, app=app)`` returns a :class:`celeriac.worker.pool.Pool`. A green
    pool monkey-patches in :meth:`Pool.early_init`, which the CLI calls before importing the app.
    """


@hookspec
def celeriac_serializers() -> list[Serializer]:
    """Return serializers to register (:class:`celeriac.serialization.Serializer`)."""


@hookspec
def celeriac_cli_commands() -> list[click.Command]:
    """Return click commands to add to the ``celeriac`` command line."""


@hookspec
def celeriac_task_prerun(task: Any, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Called in the worker just before a task body runs."""


@hookspec
def celeriac_task_postrun(task: Any, task_id: str, state: str, retval: Any) -> None:
    """Called in the worker after a task body ran, whatever the outcome."""


@hookspec
def celeriac_task_success(task: Any, task_id: str, result: Any) -> None:
    """Called in the worker when a task succeeded."""


@hookspec
def celeriac_task_failure(task: Any, task_id: str, exc: BaseException, traceback: str) -> None:
    """Called in the worker when a task failed (after retries were exhausted)."""


@hookspec
def celeriac_task_retry(task: Any, task_id: str, reason: BaseException | None) -> None:
    """Called in the worker when a task asked to be retried."""
