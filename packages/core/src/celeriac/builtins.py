"""Tasks every app has, under Celery's names, so canvases sent by Celery clients run here too."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celeriac.app import Celeriac

__all__ = ["register_builtins"]


def register_builtins(app: Celeriac) -> None:
    """Register ``celery.map``, ``celery.starmap``, ``celery.chunks``, ``celery.accumulate``
    and ``celery.backend_cleanup`` on ``app``."""
    from celeriac.canvas import maybe_signature

    @app.task(name="celery.map", typing=False)
    def xmap(task: Any, it: Any) -> list[Any]:
        sig = maybe_signature(task, app)
        return [sig.type(item) for item in it]

    @app.task(name="celery.starmap", typing=False)
    def xstarmap(task: Any, it: Any) -> list[Any]:
        sig = maybe_signature(task, app)
        return [sig.type(*item) for item in it]

    @app.task(name="celery.chunks", typing=False)
    def chunks(task: Any, it: Any, n: int) -> Any:
        from celeriac.canvas import chunks as chunks_sig

        return chunks_sig(maybe_signature(task, app), it, n, app=app).apply_async().id

    @app.task(name="celery.accumulate", typing=False)
    def accumulate(*args: Any, **kwargs: Any) -> Any:
        index = kwargs.get("index")
        return args[index] if index is not None else args

    @app.task(name="celery.backend_cleanup", typing=False)
    def backend_cleanup() -> None:
        """Results expire in the backends we ship, so there is nothing to clean."""
