"""The plugin manager: entry-point discovery, registries, and the helpful "not installed" errors."""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from celeriac.exceptions import PluginNotFound
from celeriac.plugins import hookspecs

__all__ = [
    "KNOWN_PROVIDERS",
    "PluginInfo",
    "backend_factory",
    "broker_factory",
    "get_manager",
    "lifecycle",
    "plugin_infos",
    "pool_factory",
    "reset",
    "spi_mismatch",
]

logger = logging.getLogger("celeriac.plugins")

ENTRY_POINT_GROUP = "celeriac"

#: Which distribution provides a scheme or pool that is not installed.
KNOWN_PROVIDERS: dict[str, str] = {
    "amqp": "celeriac-amqp", "amqps": "celeriac-amqp", "pyamqp": "celeriac-amqp",
    "redis": "celeriac-redis", "rediss": "celeriac-redis", "redis+socket": "celeriac-redis",
    "sentinel": "celeriac-redis", "rpc": "celeriac-rpc", "amqp10": "celeriac-qpid",
    "qpid": "celeriac-qpid", "prefork": "celeriac-prefork", "gevent": "celeriac-gevent",
    "eventlet": "celeriac-eventlet", "kombu+": "celeriac-kombu",
}


@dataclass
class PluginInfo:
    """What ``celeriac plugins`` prints about one plugin."""

    name: str
    distribution: str
    version: str
    brokers: list[str] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)
    pools: list[str] = field(default_factory=list)
    serializers: list[str] = field(default_factory=list)
    error: str | None = None

    def provides(self) -> str:
        """A one-line summary such as ``brokers: redis, rediss; backends: redis``."""
        parts = []
        for label, names in (("brokers", self.brokers), ("backends", self.backends),
                             ("pools", self.pools), ("serializers", self.serializers)):
            if names:
                parts.append(f"{label}: {', '.join(names)}")
        return "; ".join(parts) or "hooks only"


class _Registry:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("celeriac")
        self.pm.add_hookspecs(hookspecs)
        self.infos: list[PluginInfo] = []
        self.brokers: dict[str, Callable[..., Any]] = {}
        self.backends: dict[str, Callable[..., Any]] = {}
        self.pools: dict[str, Callable[..., Any]] = {}
        self._load()

    def _load(self) -> None:
        from celeriac import __version__
        from celeriac.plugins import builtin

        self.pm.register(builtin, name="builtin")
        self._collect(builtin, PluginInfo("builtin", "celeriac", __version__))
        if os.environ.get("CELERIAC_DISABLE_PLUGIN_AUTOLOAD"):
            return
        blocked = {n.strip() for n in os.environ.get("CELERIAC_DISABLED_PLUGINS", "").split(",") if n.strip()}
        for dist in metadata.distributions():
            for ep in dist.entry_points:
                if ep.group != ENTRY_POINT_GROUP or ep.name in blocked:
                    continue
                if self.pm.get_plugin(ep.name) is not None:
                    continue
                dist_name = dist.metadata["Name"] or ep.name
                info = PluginInfo(ep.name, dist_name, dist.version or "?")
                mismatch = spi_mismatch(dist_name, dist.version or "?", dist.requires or ())
                if mismatch:  # checked before importing: a plugin for another SPI may not import
                    info.error = mismatch
                    logger.warning("%s", mismatch)
                    self.infos.append(info)
                    continue
                try:
                    module = ep.load()
                    self.pm.register(module, name=ep.name)
                    self._collect(module, info)
                except Exception as exc:  # a broken plugin must not take the others down
                    info.error = f"{type(exc).__name__}: {exc}"
                    logger.warning("Plugin %s (%s) failed to load: %s", ep.name, dist_name, info.error)
                    self.infos.append(info)

    def _collect(self, module: Any, info: PluginInfo) -> None:
        def call(hook: str) -> Any:
            impl = getattr(module, hook, None)
            return impl() if impl is not None else None

        brokers = call("celeriac_brokers") or {}
        backends = call("celeriac_result_backends") or {}
        pools = call("celeriac_pools") or {}
        serializers = call("celeriac_serializers") or []
        self.brokers.update(brokers)
        self.backends.update(backends)
        self.pools.update(pools)
        from celeriac.serialization import register

        for serializer in serializers:
            register(serializer)
        info.brokers = sorted(brokers)
        info.backends = sorted(backends)
        info.pools = sorted(pools)
        info.serializers = [s.name for s in serializers]
        self.infos.append(info)


def _version_key(version: str) -> tuple[int, ...]:
    parts = [int(p) for p in re.findall(r"\d+", version.split("+")[0])[:4]]
    return tuple(parts + [0] * (4 - len(parts)))


def _satisfies(version: str, specifier: str) -> bool:
    """Whether ``version`` meets a PEP 440 ``specifier`` such as ``>=0.1,<0.2`` (release
    numbers only: enough for the ``celeriac`` ranges plugins declare)."""
    have = _version_key(version)
    for clause in filter(None, (c.strip() for c in specifier.split(","))):
        op, want = re.match(r"(~=|===|==|!=|<=|>=|<|>)?\s*(.*)", clause).groups()  # type: ignore[union-attr]
        if want.endswith(".*"):
            prefix = _version_key(want[:-2])[: want[:-2].count(".") + 1]
            ok = have[: len(prefix)] == prefix
            if (op == "!=") == ok:
                return False
            continue
        key = _version_key(want)
        ok = {"<": have < key, "<=": have <= key, ">": have > key, ">=": have >= key, "!=": have != key,
              "~=": have >= key and have[: max(want.count("."), 1)] == key[: max(want.count("."), 1)]
              }.get(op or "==", have == key)
        if not ok:
            return False
    return True


def spi_mismatch(distribution: str, version: str, requires: Any) -> str | None:
    """One line when a plugin distribution's ``celeriac`` requirement (from its metadata's
    ``Requires-Dist``) excludes the installed celeriac, else None."""
    from celeriac import __version__
    from celeriac.plugins import SPI_VERSION

    for requirement in requires:
        match = re.match(r"^celeriac\s*(?:\[[^\]]*\])?\s*\(?\s*([<>=!~][^;)]*)?\)?\s*(;.*)?$",
                         str(requirement).strip())
        if match is None or (match.group(2) and "extra" in match.group(2)):
            continue
        wanted = (match.group(1) or "").strip()
        if wanted and not _satisfies(__version__, wanted):
            return (f"{distribution} {version} needs celeriac{wanted.replace(' ', '')}, but this is celeriac "
                    f"{__version__} (plugin interface {SPI_VERSION}): install the {distribution} release "
                    f"made for celeriac {__version__}, or a celeriac that {distribution} supports.")
    return None


_registry: _Registry | None = None
_lock = threading.Lock()


def get_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loading entry points on first use."""
    return _get().pm


def _get() -> _Registry:
    global _registry
    if _registry is None:
        with _lock:
            if _registry is None:
                _registry = _Registry()
    return _registry


def reset() -> None:
    """Forget loaded plugins so the next lookup scans entry points again (tests)."""
    global _registry
    with _lock:
        _registry = None


def plugin_infos() -> list[PluginInfo]:
    """Every loaded (or failed) plugin, built-ins first."""
    return list(_get().infos)


def _missing(kind: str, name: str, installed: Mapping[str, Any]) -> PluginNotFound:
    have = ", ".join(sorted(installed)) or "none"
    hint = KNOWN_PROVIDERS.get(name) or KNOWN_PROVIDERS.get(name.split("+", 1)[0] + "+")
    advice = (f" Install it with: pip install {hint}" if hint
              else " No known package provides it; check the spelling or install its plugin.")
    broken = [i for i in _get().infos if i.error]
    note = ""
    if broken:
        note = " Plugins that failed to load: " + ", ".join(f"{i.name} ({i.error})" for i in broken) + "."
    return PluginNotFound(f"No {kind} is installed for {name!r}. Installed: {have}.{advice}{note}")


def _scheme(url: str) -> str:
    if "://" not in url:
        raise PluginNotFound(f"{url!r} is not a URL; expected something like 'redis://localhost:6379/0'.")
    return url.split("://", 1)[0].lower()


def broker_factory(url: str) -> Callable[..., Any]:
    """The broker factory for ``url``'s scheme, or a ``PluginNotFound`` naming the package."""
    scheme = _scheme(url)
    registry = _get()
    factory = registry.brokers.get(scheme)
    # A scheme registered with a trailing "+" claims every scheme that starts with it
    # (celeriac-kombu's "kombu+" serves kombu+sqs, kombu+sqla+postgresql ...); longest first.
    while factory is None and "+" in scheme[:-1]:
        scheme = scheme[:scheme.rindex("+", 0, len(scheme) - 1) + 1]
        factory = registry.brokers.get(scheme)
    if factory is None:
        raise _missing("broker", _scheme(url), registry.brokers)
    return factory


def backend_factory(url: str) -> Callable[..., Any]:
    """The result backend factory for ``url``'s scheme (``rpc://`` included)."""
    scheme = _scheme(url)
    registry = _get()
    factory = registry.backends.get(scheme)
    if factory is None:
        raise _missing("result backend", scheme, registry.backends)
    return factory


def pool_factory(name: str) -> Callable[..., Any]:
    """The pool factory called ``name``."""
    registry = _get()
    factory = registry.pools.get(name)
    if factory is None:
        raise _missing("pool", name, registry.pools)
    return factory


def available_pools() -> list[str]:
    """Names of every installed pool."""
    return sorted(_get().pools)


def _guarded(caller: Any) -> Callable[..., None] | None:
    """``caller(**kwargs)``, with any exception a plugin raises logged with the task id and
    swallowed: a broken hook never changes a task's outcome. None when nothing implements it."""
    if not caller.get_hookimpls():
        return None

    def call(**kwargs: Any) -> None:
        try:
            caller(**kwargs)
        except Exception:
            task = kwargs.get("task")
            logger.exception("The %s hook raised for task %s[%s]; the task goes on.", caller.name,
                             getattr(task, "name", "?"), kwargs.get("task_id"))

    return call


class _Lifecycle:
    """Per-task hook callers that cost nothing when no plugin implements the hook."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        hook = pm.hook
        self.prerun = _guarded(hook.celeriac_task_prerun)
        self.postrun = _guarded(hook.celeriac_task_postrun)
        self.success = _guarded(hook.celeriac_task_success)
        self.failure = _guarded(hook.celeriac_task_failure)
        self.retry = _guarded(hook.celeriac_task_retry)


def lifecycle() -> _Lifecycle:
    """The lifecycle hook callers (None where nothing is implemented)."""
    return _Lifecycle(get_manager())
