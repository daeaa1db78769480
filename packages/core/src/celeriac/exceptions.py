"""Exceptions raised by Celeriac, named as Celery names them so user code can catch either."""

from __future__ import annotations

from typing import Any

__all__ = [
    "BrokerConnectionError",
    "CeleriacError",
    "ChordError",
    "ContentDisallowed",
    "DecodeError",
    "Ignore",
    "ImproperlyConfigured",
    "InvalidMessage",
    "MaxRetriesExceededError",
    "NotRegistered",
    "PluginNotFound",
    "QueueNotFound",
    "Reject",
    "RemoteTaskError",
    "ResultsDisabled",
    "Retry",
    "SoftTimeLimitExceeded",
    "TaskRevokedError",
    "Terminated",
    "TimeLimitExceeded",
    "TimeoutError",
    "WorkerLostError",
]


class CeleriacError(Exception):
    """Base class of every Celeriac error."""


class ImproperlyConfigured(CeleriacError):
    """A setting has a value that cannot work; the message names the setting."""


class PluginNotFound(ImproperlyConfigured):
    """No installed plugin provides the requested URL scheme or pool name."""


class QueueNotFound(ImproperlyConfigured, KeyError):
    """A task is routed to a queue missing from ``task_queues`` while
    ``task_create_missing_queues`` is off (Celery's name)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "queue not found"


class NotRegistered(CeleriacError, KeyError):
    """The task name is not registered in this app."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "task not registered"


class DecodeError(CeleriacError):
    """A message body or header could not be decoded."""


class ContentDisallowed(DecodeError):
    """The content type is not in ``accept_content``."""


class InvalidMessage(DecodeError):
    """A message does not follow protocol v1 or v2."""


class TimeoutError(CeleriacError):  # noqa: A001 - Celery's public name
    """Waiting for a result took longer than the timeout."""


class ResultsDisabled(CeleriacError):
    """Results were asked for but no result backend is configured."""


class Retry(CeleriacError):
    """Raised by ``Task.retry`` to end the current run; the task was re-sent."""

    def __init__(self, message: str | None = None, exc: BaseException | None = None,
                 when: Any = None) -> None:
        self.message = message
        self.exc = exc
        self.when = when
        #: ``Task.retry`` in a worker: the call that re-sends the task, made by the worker once
        #: it has stored RETRY (None once sent, or when ``retry`` sent it itself).
        self.send: Any = None
        super().__init__(message or f"Retry in {when}", exc)

    def __str__(self) -> str:
        if self.exc is not None:
            return f"Retry in {self.when}: {self.exc!r}"
        return f"Retry in {self.when}"


class MaxRetriesExceededError(CeleriacError):
    """The task was retried ``max_retries`` times already."""


class Reject(CeleriacError):
    """Raise inside a task to reject its message (``requeue=True`` puts it back)."""

    def __init__(self, reason: Any = None, requeue: bool = False) -> None:
        self.reason = reason
        self.requeue = requeue
        super().__init__(reason, requeue)


class Ignore(CeleriacError):
    """Raise inside a task to end it without storing any state."""


class TaskRevokedError(CeleriacError):
    """The task was revoked or expired before it ran."""


class Terminated(BaseException):
    """Raised inside a running task by ``revoke(task_id, terminate=True)`` on a green pool
    (gevent, eventlet); Celery's name. A ``BaseException``, as gevent's ``GreenletExit`` that
    Celery raises there: ``except Exception`` does not stop it. When it leaves the task, the
    worker stores REVOKED (``TaskRevokedError('terminated')``) and acks, as when a process pool
    kills the process (a task that catches it and returns keeps its result). ``signum`` (int or
    None) is the signal asked for, which a green pool cannot send to a green thread."""

    def __init__(self, signum: int | None = None) -> None:
        self.signum = signum
        super().__init__(f"The task was terminated (revoke with terminate=True, signal {signum}).")


class SoftTimeLimitExceeded(CeleriacError):
    """Raised inside a task when its soft time limit passes."""


class TimeLimitExceeded(CeleriacError):
    """The task ran past its hard time limit."""


class ChordError(CeleriacError):
    """A chord's header had a failed member, so its body cannot run."""


class WorkerLostError(CeleriacError):
    """The process running the task died."""


class BrokerConnectionError(CeleriacError):
    """The broker cannot be reached; the message names the URL (password masked).

    ``transient`` is False for errors retrying cannot fix (wrong password, unknown vhost): the
    worker then stops instead of retrying. Plugins set it on their subclasses or instances.
    """

    transient: bool = True


class RemoteTaskError(CeleriacError):
    """A task failed with an exception type that cannot be imported here.

    ``exc_type`` and ``exc_module`` name the original type.
    """

    def __init__(self, exc_type: str, exc_module: str | None, message: Any) -> None:
        self.exc_type = exc_type
        self.exc_module = exc_module
        self.exc_message = message
        super().__init__(f"{exc_module + '.' if exc_module else ''}{exc_type}: {message}")
