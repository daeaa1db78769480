"""Finding the app named by ``-A/--app``, with Celery's search order."""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Any

from celeriac.exceptions import ImproperlyConfigured

__all__ = ["find_app"]


def _is_app(obj: Any) -> bool:
    from celeriac.app import Celeriac

    return isinstance(obj, Celeriac)


def _app_in_module(module: ModuleType) -> Any:
    for attr in ("app", "celery"):
        candidate = getattr(module, attr, None)
        if _is_app(candidate):
            return candidate
    for value in vars(module).values():
        if _is_app(value):
            return value
    return None


def find_app(spec: str) -> Any:
    """Load the app from ``module:attr``, ``module.attr`` or a bare module name.

    For a bare name ``proj`` the search is ``proj.app``, ``proj.celery``, any app in ``proj``,
    then the submodule ``proj.celery`` the same way.
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name, _, attr = spec.partition(":")
    try:
        if attr:
            module = importlib.import_module(module_name)
            obj = module
            for part in attr.split("."):
                obj = getattr(obj, part)
            if callable(obj) and not _is_app(obj):
                obj = obj()
            if not _is_app(obj):
                raise ImproperlyConfigured(f"{spec!r} is not a Celeriac app.")
            return obj
        try:
            module = importlib.import_module(spec)
        except ModuleNotFoundError as exc:
            head, _, tail = spec.rpartition(".")
            if not head or exc.name != spec:
                raise
            candidate = getattr(importlib.import_module(head), tail, None)
            if _is_app(candidate):
                return candidate
            raise
        found = _app_in_module(module)
        if found is not None:
            return found
        try:
            submodule = importlib.import_module(f"{spec}.celery")
        except ModuleNotFoundError as exc:
            if exc.name != f"{spec}.celery":
                raise
        else:
            found = _app_in_module(submodule)
            if found is not None:
                return found
    except ModuleNotFoundError as exc:
        raise ImproperlyConfigured(
            f"Cannot load the app {spec!r}: module {exc.name!r} was not found. Run the command "
            "from the directory that contains your project, or give --workdir."
        ) from exc
    raise ImproperlyConfigured(
        f"No Celeriac app found in {spec!r}. Define one (app = Celeriac('proj')) or name it "
        "explicitly with -A module:attribute."
    )
