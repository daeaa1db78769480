"""The worker: consumer, pool SPI, request execution. ``Worker(app).start()`` runs one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celeriac.worker.worker import Worker

__all__ = ["Worker"]


def __getattr__(name: str) -> Any:
    if name == "Worker":
        from celeriac.worker.worker import Worker

        return Worker
    raise AttributeError(name)
