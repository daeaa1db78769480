"""A task request: one decoded message the worker has accepted, with its delivery."""

from __future__ import annotations

from typing import Any

from celeriac.broker.base import Delivery
from celeriac.protocol import TaskMessage, to_timestamp
from celeriac.task import Context, Task

__all__ = ["Request", "parse_time"]


def parse_time(value: Any) -> float | None:
    """An ISO-8601 header value as a Unix timestamp (naive values are UTC), or None.

    The protocol module's parser (:func:`celeriac.protocol.to_timestamp`), the one every
    component uses."""
    return to_timestamp(value) if value else None


class Request:
    """Everything the worker needs to run one task message."""

    __slots__ = (
        "acked",
        "delivery",
        "eta",
        "expires",
        "handle",
        "hostname",
        "limit_timers",
        "message",
        "outcome",
        "soft_time_limit",
        "started_at",
        "task",
        "time_limit",
        "time_start",
    )

    def __init__(self, task: Task[Any, Any], message: TaskMessage, delivery: Delivery,
                 hostname: str) -> None:
        self.task = task
        self.message = message
        self.delivery = delivery
        headers = message.headers
        self.eta = parse_time(headers.get("eta"))
        self.expires = parse_time(headers.get("expires"))
        hard, soft = (list(headers.get("timelimit") or ()) + [None, None])[:2]
        self.time_limit = hard if hard is not None else task.time_limit
        self.soft_time_limit = soft if soft is not None else task.soft_time_limit
        self.acked = False
        self.started_at = 0.0
        #: Unix time (seconds) when a pool slot started running it; None while reserved.
        self.time_start: float | None = None
        #: The timer entries of its soft and hard time limits, cancelled when it ends.
        self.limit_timers: list[Any] = []
        self.handle: Any = None
        self.hostname = hostname
        #: In a pool process: the ack decision to send back (ack, reject, requeue).
        self.outcome: str | None = None

    @property
    def id(self) -> str:
        """The task id."""
        return self.message.id

    @property
    def name(self) -> str:
        """The name used in logs (the shadow name when one was given)."""
        return str(self.message.headers.get("shadow") or self.message.name)

    @property
    def acks_late(self) -> bool:
        """True when this request is acked after it ran."""
        return self.task.acks_late

    def context(self) -> Context:
        """The ``self.request`` seen by the task body."""
        headers = self.message.headers
        embed = self.message.embed
        props = self.message.properties
        delivery = self.delivery
        return Context(
            id=headers["id"], task=headers["task"], args=self.message.args,
            kwargs=self.message.kwargs, retries=headers.get("retries") or 0, is_eager=False,
            eta=headers.get("eta"), expires=headers.get("expires"), group=headers.get("group"),
            group_index=headers.get("group_index"), root_id=headers.get("root_id") or headers["id"],
            parent_id=headers.get("parent_id"), chord=embed.get("chord"), chain=embed.get("chain"),
            callbacks=embed.get("callbacks"), errbacks=embed.get("errbacks"), headers=headers,
            delivery_info={"exchange": delivery.exchange, "routing_key": delivery.routing_key,
                           "priority": props.get("priority"), "redelivered": delivery.redelivered},
            reply_to=props.get("reply_to"), correlation_id=props.get("correlation_id") or headers["id"],
            hostname=self.hostname, origin=headers.get("origin"),
            timelimit=(self.time_limit, self.soft_time_limit),
            ignore_result=bool(headers.get("ignore_result")), shadow=headers.get("shadow"),
            replaced_task_nesting=headers.get("replaced_task_nesting") or 0,
        )

    def to_payload(self) -> dict[str, Any]:
        """Plain, picklable data for a pool process (:func:`Request.from_payload`)."""
        message, delivery = self.message, self.delivery
        return {
            "headers": message.headers, "properties": message.properties, "args": message.args,
            "kwargs": message.kwargs, "embed": message.embed, "queue": delivery.queue,
            "exchange": delivery.exchange, "routing_key": delivery.routing_key,
            "redelivered": delivery.redelivered, "hostname": self.hostname,
            "time_limit": self.time_limit, "soft_time_limit": self.soft_time_limit,
            "acked": self.acked,
        }

    @classmethod
    def from_payload(cls, app: Any, payload: dict[str, Any]) -> Request:
        """Rebuild a request in a pool process from :meth:`to_payload` output."""
        from celeriac.protocol import Message

        message = TaskMessage(payload["headers"], payload["properties"], payload["args"],
                              payload["kwargs"], payload["embed"])
        delivery = Delivery(Message(payload["headers"], payload["properties"], b""), payload["queue"],
                            None, payload["exchange"], payload["routing_key"], payload["redelivered"])
        request = cls(app.tasks[message.name], message, delivery, payload["hostname"])
        request.time_limit = payload["time_limit"]
        request.soft_time_limit = payload["soft_time_limit"]
        request.acked = payload["acked"]
        return request
