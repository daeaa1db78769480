"""The current app: the one implicit app, for the few APIs that need one.

Pass the app explicitly wherever an API allows it. Where Celery's API has no place for it
(``@shared_task``, ``signature("name")``, ``AsyncResult(id)`` built without an app) this module
says which app is meant: the *current* app, which is the last :class:`~celeriac.app.Celeriac`
created (unless created with ``set_as_current=False``) or the one made current explicitly with
:func:`set_current_app` / ``app.set_current()``.

Apps are held by weak reference only: this module never keeps an app (and its connections)
alive. When the current app is garbage collected, the most recently created app still alive
becomes current again.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING

from celeriac.exceptions import ImproperlyConfigured

if TYPE_CHECKING:
    from celeriac.app import Celeriac

__all__ = ["all_apps", "current_app", "get_current_app", "set_current_app"]

_lock = threading.Lock()
_current: weakref.ref[Celeriac] | None = None
#: Every app alive, oldest first (a weak set keeps no app alive; a counter keeps the order).
_alive: weakref.WeakKeyDictionary[Celeriac, int] = weakref.WeakKeyDictionary()
_counter = 0


def register_app(app: Celeriac, make_current: bool = True) -> None:
    """Note a newly created ``app`` (called by ``Celeriac.__init__``); make it current unless
    ``make_current`` is False."""
    global _counter
    with _lock:
        _counter += 1
        _alive[app] = _counter
    if make_current:
        set_current_app(app)


def set_current_app(app: Celeriac) -> None:
    """Make ``app`` the current app (held by weak reference). Thread-safe."""
    global _current
    with _lock:
        _current = weakref.ref(app)


def get_current_app() -> Celeriac | None:
    """The current app, or None when no app is alive."""
    with _lock:
        app = _current() if _current is not None else None
        if app is None and _alive:
            newest = max(_alive.items(), key=lambda item: item[1], default=None)
            app = newest[0] if newest is not None else None
        return app


def current_app() -> Celeriac:
    """The current app; raises ``ImproperlyConfigured`` with a hint when no app exists."""
    app = get_current_app()
    if app is None:
        raise ImproperlyConfigured(
            "No Celeriac app exists yet: create one (app = Celeriac('proj', broker=...)) before "
            "sending shared tasks or using signatures and results built by name."
        )
    return app


def all_apps() -> list[Celeriac]:
    """Every app alive, oldest first (a snapshot; the list holds them only while you do)."""
    with _lock:
        return [app for app, _ in sorted(_alive.items(), key=lambda item: item[1])]
