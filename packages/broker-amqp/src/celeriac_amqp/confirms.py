"""Publisher confirms with a window: publishing does not wait for each confirm.

RabbitMQ's confirm mode (https://www.rabbitmq.com/docs/confirms) numbers the messages published
on a channel 1, 2, 3, ... and later sends ``basic.ack`` (or, on an internal error, ``basic.nack``)
for one tag or, with ``multiple``, for every tag up to it. pika's blocking channel only offers a
confirm mode that waits for every message, one round trip each; :class:`ConfirmWindow` instead
keeps what was published and not yet confirmed, reads the confirms as they arrive, and waits
only when ``window`` messages are outstanding or when asked (:meth:`ConfirmWindow.wait`).

A message whose confirm never came (the connection or channel was lost) is still known, so the
caller can publish it again on the next connection: at least once, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions as pex
from pika.adapters.blocking_connection import BlockingChannel

from celeriac_amqp import fastwrite

__all__ = ["ConfirmTimeout", "ConfirmWindow", "Unconfirmed"]


class ConfirmTimeout(pex.AMQPConnectionError):
    """RabbitMQ did not confirm the outstanding messages in time (treated as a lost connection)."""


@dataclass
class Unconfirmed:
    """One published message RabbitMQ has not confirmed yet, kept to publish it again.

    ``attempts`` counts the channels it was published on (a message the broker keeps refusing
    is given up after a few)."""

    exchange: str
    routing_key: str
    body: bytes
    properties: pika.BasicProperties
    attempts: int = 1


class ConfirmWindow:
    """Confirm mode on ``channel`` with at most ``window`` unconfirmed messages (>= 1).

    Not thread-safe: the owner of the channel's connection calls every method. Enabling confirm
    mode waits for RabbitMQ's ``confirm.select-ok``; pika's errors propagate.
    """

    def __init__(self, connection: pika.BlockingConnection, channel: BlockingChannel,
                 window: int) -> None:
        self.connection = connection
        self.channel = channel
        self.window = max(1, int(window))
        #: Delivery tag -> message, in publishing order (tags only grow).
        self.pending: dict[int, Unconfirmed] = {}
        #: Messages RabbitMQ answered with ``basic.nack``, for the owner to report.
        self.nacked: list[Unconfirmed] = []
        self._tag = 0
        selected: list[bool] = []
        # pika's BlockingChannel.confirm_delivery() would make every publish wait; the
        # underlying channel reports confirms to a callback instead.
        impl: Any = channel._impl
        impl.confirm_delivery(ack_nack_callback=self._on_confirm,
                              callback=lambda _frame: selected.append(True))
        self._pump(lambda: bool(selected), timeout=30.0)

    def publish(self, item: Unconfirmed, *, wait: bool = False, timeout: float = 30.0) -> None:
        """Publish ``item``; with ``wait`` return once RabbitMQ confirmed everything sent so far,
        else once fewer than ``window`` messages are outstanding. Raises pika's errors and
        :class:`ConfirmTimeout` (with ``wait``, ``item`` is then forgotten: the caller knows)."""
        if wait and self.pending:
            # Settle the others first: if this one closes the channel (a missing exchange),
            # nothing else is left unconfirmed to publish again (no duplicates).
            self.wait(0, timeout)
        # Recorded first: pika reads incoming frames while it writes, so the confirm can
        # arrive before basic_publish returns.
        self._tag += 1
        tag = self._tag
        self.pending[tag] = item
        try:
            fastwrite.basic_publish(self.channel, item.exchange, item.routing_key, item.body,
                                    item.properties)
            self.wait(0 if wait else self.window - 1, timeout)
        except BaseException:
            if wait:  # the caller learns this message's fate from the error: not published again
                self.pending.pop(tag, None)
            raise

    def wait(self, outstanding: int = 0, timeout: float = 30.0) -> None:
        """Read confirms until at most ``outstanding`` messages are unconfirmed. Raises
        :class:`ConfirmTimeout` after ``timeout`` seconds, and pika's errors."""
        if len(self.pending) > outstanding:
            self._pump(lambda: len(self.pending) <= outstanding, timeout)

    def take_unconfirmed(self) -> list[Unconfirmed]:
        """Forget and return every unconfirmed message (the channel is gone), oldest first."""
        items = list(self.pending.values())
        self.pending.clear()
        return items

    def _pump(self, done: Callable[[], bool], timeout: float) -> None:
        # pika's process_data_events(time_limit) runs for the whole time limit even when the
        # confirm arrives at once, so wait the way pika's own BlockingChannel does: its
        # connection's _flush_output(waiter), woken up by an I/O-loop timer for the timeout.
        connection: Any = self.connection
        expired: list[bool] = []
        timer = connection._impl.ioloop.call_later(timeout, lambda: expired.append(True))
        try:
            connection._flush_output(lambda: done() or bool(expired) or not self.channel.is_open)
        finally:
            connection._impl.ioloop.remove_timeout(timer)
        if not done():
            self._raise_if_closed()
            raise ConfirmTimeout(f"RabbitMQ confirmed no message for {timeout:g} s")

    def _raise_if_closed(self) -> None:
        if self.channel.is_open:
            return
        reason = getattr(self.channel, "_closing_reason", None)  # RabbitMQ's channel.close
        if isinstance(reason, pex.ChannelClosed):
            raise reason
        raise pex.ChannelWrongStateError("The publishing channel was closed.")

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag = int(method.delivery_tag)
        refused = isinstance(method, pika.spec.Basic.Nack)
        if method.multiple:
            done = []
            for pending_tag in self.pending:
                if pending_tag > tag:
                    break
                done.append(pending_tag)
        else:
            done = [tag]
        for pending_tag in done:
            item = self.pending.pop(pending_tag, None)
            if refused and item is not None:
                self.nacked.append(item)
