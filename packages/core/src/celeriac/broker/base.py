"""The broker SPI: what every broker plugin implements.

Required (abstract): :meth:`Broker.declare`, :meth:`Broker.publish`, :meth:`Broker.consumer`,
:meth:`Broker.purge`, :meth:`Broker.close`, and on the consumer :meth:`Consumer.fetch`,
:meth:`Consumer.ack`, :meth:`Consumer.reject`, :meth:`Consumer.close`.

Everything else is a *capability* a broker declares in :attr:`Broker.capabilities`; the core
falls back when it is missing and the conformance kit (``celeriac.testing``) only tests what is
declared:

``delay``        ``publish(not_before=...)`` is honoured by the broker (no delivery before it);
                 without it the worker holds the message until its ETA.
``priority``     messages of higher priority are delivered first.
``queue_size``   :meth:`Broker.queue_size` returns a number.
``broadcast``    :meth:`Broker.broadcast` / :meth:`Broker.subscribe` (remote control, events).
``reply_queues`` transient queues can be declared, published to through exchange ``''`` and
                 consumed with ``no_ack=True`` (the ``rpc://`` result backend needs it).
``batch``        :meth:`Consumer.fetch` returns many deliveries per call and acks are batched.

A broker is created by a factory registered under a URL scheme through the
``celeriac_brokers`` hook: ``factory(url, conf) -> Broker``, where ``conf`` is the app's settings
mapping (``broker_transport_options``, ``broker_connection_retry``, ``broker_heartbeat`` ...).
Connection loss is retried inside the plugin with backoff; errors that are not transient surface
as :class:`celeriac.exceptions.BrokerConnectionError` with the URL's password masked.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from celeriac.exceptions import BrokerConnectionError
from celeriac.protocol import Message
from celeriac.routing import Queue

__all__ = [
    "BATCH",
    "BROADCAST",
    "DELAY",
    "PRIORITY",
    "QUEUE_SIZE",
    "REPLY_QUEUES",
    "Broker",
    "BrokerConnectionError",
    "Consumer",
    "Delivery",
    "Subscription",
    "mask_url",
]

DELAY = "delay"
PRIORITY = "priority"
QUEUE_SIZE = "queue_size"
BROADCAST = "broadcast"
REPLY_QUEUES = "reply_queues"
BATCH = "batch"


def mask_url(url: str) -> str:
    """Return ``url`` with every password replaced by ``**``, for logs and banners (failover
    lists and Sentinel lists included; see :func:`celeriac.security.mask_url`). Never raises."""
    from celeriac.security import mask_url as mask  # security imports serialization: lazily

    return mask(url)


@dataclass(slots=True)
class Delivery:
    """One message handed to a consumer and not yet acknowledged.

    ``tag`` is the broker's own handle (delivery tag, row id ...); only the consumer that
    produced the delivery may ack or reject it.
    """

    message: Message
    queue: str
    tag: Any
    exchange: str = ""
    routing_key: str = ""
    redelivered: bool = False


class Consumer(abc.ABC):
    """A stream of deliveries from one or more queues, bound to one broker connection.

    :meth:`fetch` is called from a single thread (the worker's consumer thread) and is where a
    plugin performs I/O; :meth:`ack` and :meth:`reject` may be called from any thread and a plugin
    whose client is not thread-safe queues them and applies them on the fetching thread.
    """

    @abc.abstractmethod
    def fetch(self, max_count: int, timeout: float) -> list[Delivery]:
        """Return up to ``max_count`` deliveries, waiting at most ``timeout`` seconds for the first.

        Returns an empty list on timeout. Never returns more than ``max_count``. Pending acks
        and rejects from other threads are flushed here at the latest. Raises
        ``BrokerConnectionError`` only when the connection is lost for good (after the plugin's
        own retries).
        """

    @abc.abstractmethod
    def ack(self, delivery: Delivery) -> None:
        """Acknowledge ``delivery``: the broker forgets the message. Thread-safe."""

    @abc.abstractmethod
    def reject(self, delivery: Delivery, requeue: bool = False) -> None:
        """Reject ``delivery``. With ``requeue`` it goes back to its queue, otherwise it is
        dropped or dead-lettered where the broker can. Thread-safe."""

    def flush(self) -> None:
        """Send acks/rejects queued so far. Called by the worker before it waits for long."""

    def on_idle(self) -> None:
        """The worker has nothing in flight any more (called by whichever thread finished the
        last task): a consumer holding acks back to send them in batches may send them now.
        Thread-safe; the default does nothing."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop consuming; deliveries not acked yet go back to the broker (requeued)."""


class Subscription(abc.ABC):
    """A broadcast subscription (remote control, events); no acks, fire-and-forget."""

    @abc.abstractmethod
    def fetch(self, timeout: float) -> list[Message]:
        """Return the messages received so far, waiting up to ``timeout`` for the first."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop receiving."""


class Broker(abc.ABC):
    """A connection to one message broker, created from a URL and the app's settings.

    ``publish`` is safe to call from any thread. Subclasses set :attr:`scheme_names` (for
    messages) and :attr:`capabilities`.
    """

    capabilities: ClassVar[frozenset[str]] = frozenset()
    #: Short human description shown in the banner, e.g. "embedded SQLite".
    description: ClassVar[str] = ""

    def __init__(self, url: str, conf: Mapping[str, Any]) -> None:
        self.url = url
        self.conf = conf

    @property
    def safe_url(self) -> str:
        """The URL with its password masked."""
        return mask_url(self.url)

    def has(self, capability: str) -> bool:
        """True when this broker declares ``capability``."""
        return capability in self.capabilities

    def connect(self) -> None:
        """Open the connection now instead of at first use.

        Raises ``BrokerConnectionError`` with a one-line reason when the broker cannot be reached.
        """

    @abc.abstractmethod
    def declare(self, queue: Queue) -> None:
        """Declare ``queue``, its exchange and binding; idempotent, cached per connection."""

    @abc.abstractmethod
    def publish(self, message: Message, exchange: str, routing_key: str, *,
                queue: Queue | None = None, not_before: float | None = None) -> None:
        """Publish one message.

        ``exchange=''`` means the default exchange: ``routing_key`` is the queue name.
        ``queue`` is the destination's declaration, to declare on first use. ``not_before`` is a
        Unix timestamp before which the message must not be delivered; brokers that declare
        ``delay`` honour it, others ignore it (the worker holds the message). Thread-safe.
        Raises ``BrokerConnectionError`` when the message could not be handed to the broker.
        """

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the broker has taken responsibility for every message the calling thread
        published (a broker that confirms publishes with a window, like RabbitMQ's, may return
        from :meth:`publish` before that). Default: nothing to wait for.

        The worker calls it after each task and before acknowledging an ``acks_late`` task, so
        what a task sent is safe before its own message goes. Raises ``BrokerConnectionError``
        when the broker refused a message or could not be reached within ``timeout`` seconds.
        """

    def publish_reply(self, message: Message, queue: str) -> None:
        """Publish a result reply (``rpc://``) to the reply queue named ``queue`` through the
        default exchange, and return once the broker has it as far as this broker promises for
        replies. Default: :meth:`publish`, then :meth:`flush`.

        A broker may send a transient reply (``delivery_mode`` 1, the ``rpc://`` default) with
        less ceremony, as RabbitMQ's does without a publisher confirm (Celery's replies have
        none either). Replies of one thread keep their order. Thread-safe. Raises
        ``BrokerConnectionError`` when the reply could not be handed to the broker.
        """
        self.publish(message, "", queue)
        self.flush()

    @abc.abstractmethod
    def consumer(self, queues: Sequence[Queue], prefetch: int, *, no_ack: bool = False) -> Consumer:
        """Start consuming ``queues`` with at most ``prefetch`` unacked deliveries (0 = no limit).

        With ``no_ack`` deliveries need no acknowledgement (used for reply queues).
        """

    @abc.abstractmethod
    def purge(self, queue: str) -> int:
        """Delete every ready message of ``queue``; return how many were deleted."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection(s). Idempotent."""

    # -- optional capabilities ----------------------------------------------------------------

    def queue_size(self, queue: str) -> int | None:
        """Number of ready messages in ``queue``, or None when unknown (capability ``queue_size``)."""
        return None

    def delete_queue(self, queue: str) -> None:
        """Delete ``queue`` and its messages (reply queues, tests). Default: purge it."""
        self.purge(queue)

    def scheduled(self, queues: Sequence[str], limit: int = 1000) -> list[tuple[float, Message]]:
        """Messages of ``queues`` parked in the broker until a later time (capability ``delay``).

        Returns up to ``limit`` ``(unix time due, message)`` pairs, soonest first, for
        ``inspect scheduled``; ``purge`` removes them too. Default: an empty list (a broker that
        cannot list what it parks, like RabbitMQ's delay queues, says nothing). Thread-safe."""
        return []

    def broadcast(self, exchange: str, message: Message, routing_key: str = "") -> None:
        """Publish ``message`` to every subscriber of ``exchange`` (capability ``broadcast``)."""
        raise NotImplementedError(
            f"The {type(self).__name__} broker does not support broadcast messages, so remote "
            "control and events are not available on it."
        )

    def subscribe(self, exchange: str, pattern: str = "#") -> Subscription:
        """Subscribe to broadcasts on ``exchange`` whose routing key matches ``pattern``
        (``#`` = all, ``*`` = one word) (capability ``broadcast``)."""
        raise NotImplementedError(
            f"The {type(self).__name__} broker does not support broadcast messages, so remote "
            "control and events are not available on it."
        )

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
