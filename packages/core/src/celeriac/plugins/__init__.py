"""Plugin system: hook specs (:mod:`celeriac.plugins.hookspecs`) and the manager.

Plugin authors import ``hookimpl`` from here::

    from celeriac.plugins import hookimpl

    @hookimpl
    def celeriac_brokers():
        return {"mybroker": MyBroker}
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from celeriac.plugins.hookspecs import hookimpl, hookspec

if TYPE_CHECKING:
    from celeriac.backends.base import ResultBackend
    from celeriac.broker.base import Broker

__all__ = ["SPI_VERSION", "create_backend", "create_broker", "hookimpl", "hookspec", "lazy_exports"]

#: The version of the plugin interface: the hook specs and the broker, result backend and pool
#: SPIs. It changes, with celeriac's minor version while celeriac is 0.x, whenever a plugin built
#: for the previous one may break; so a plugin for SPI 1 requires ``celeriac>=0.1,<0.2``. The
#: plugin manager refuses, with one line naming both versions, a plugin whose ``celeriac``
#: requirement excludes the installed celeriac.
SPI_VERSION = 1


def create_broker(url: str, conf: Mapping[str, Any]) -> Broker:
    """Create the broker for ``url`` through whichever plugin provides its scheme."""
    from celeriac.plugins.manager import broker_factory

    return broker_factory(url)(url, conf)  # type: ignore[no-any-return]


def create_backend(url: str, conf: Mapping[str, Any]) -> ResultBackend:
    """Create the result backend for ``url`` through whichever plugin provides its scheme."""
    from celeriac.plugins.manager import backend_factory

    return backend_factory(url)(url, conf)  # type: ignore[no-any-return]


def lazy_exports(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) for a plugin package's root: ``names`` maps each
    exported name to the module that defines it, imported on first access, so discovering the
    plugin imports no client library. Other names raise ``AttributeError``::

        __getattr__ = lazy_exports(__name__, {"MyBroker": "celeriac_mine.broker"})
    """

    def __getattr__(name: str) -> Any:  # noqa: N807 - a module's __getattr__
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return __getattr__
