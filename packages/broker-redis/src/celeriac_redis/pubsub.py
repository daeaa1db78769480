"""Broadcast subscriptions over Redis pub/sub (``PSUBSCRIBE /<db>.<exchange>...``), as kombu."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from celeriac.broker.base import Subscription
from celeriac.protocol import Message
from celeriac_redis.connection import TRANSIENT_ERRORS
from celeriac_redis.layout import CorruptEnvelope, decode_envelope

if TYPE_CHECKING:
    from redis.client import PubSub

    from celeriac_redis.broker import RedisBroker

__all__ = ["RedisSubscription", "channel_patterns"]

logger = logging.getLogger("celeriac.redis")


def channel_patterns(broker: RedisBroker, exchange: str, pattern: str) -> list[str]:
    """The PSUBSCRIBE patterns for ``exchange`` and a binding ``pattern`` (``#`` = all)."""
    base = broker.layout.fanout_channel(exchange)
    if not broker.layout.fanout_patterns:
        return [base]
    if pattern in ("", None):
        return [base]
    if pattern == "#":
        return [base, base + "/*"]
    return [base + "/" + pattern.replace("#", "*")]


class RedisSubscription(Subscription):
    """One pub/sub connection; ``fetch`` is called from one thread. Reconnects and
    re-subscribes by itself after a connection loss (messages sent meanwhile are lost, as
    broadcasts are fire-and-forget)."""

    def __init__(self, broker: RedisBroker, exchange: str, pattern: str = "#") -> None:
        self.broker = broker
        self.patterns = channel_patterns(broker, exchange, pattern)
        self._pubsub: PubSub | None = None
        self._early: list[dict[str, Any]] = []
        self._open()

    def _open(self) -> None:
        pubsub = self.broker.client.pubsub()  # type: ignore[no-untyped-call]
        pubsub.psubscribe(*self.patterns)
        self._pubsub = pubsub
        # Wait for the server's confirmations: broadcasts sent after this returns are received.
        waiting = set(self.patterns)
        limit = time.monotonic() + 10.0
        while waiting and time.monotonic() < limit:
            item = pubsub.get_message(timeout=1.0)
            if item is None:
                continue
            if item.get("type") == "psubscribe":
                pattern = item.get("channel")
                waiting.discard(pattern.decode() if isinstance(pattern, bytes) else str(pattern))
            elif item.get("type") == "pmessage":
                self._early.append(item)

    def fetch(self, timeout: float) -> list[Message]:
        """Messages received so far, waiting up to ``timeout`` s for the first."""
        deadline = time.monotonic() + max(0.0, timeout)
        out: list[Message] = []
        while True:
            try:
                if self._pubsub is None:
                    self._open()
                assert self._pubsub is not None
                wait = 0.0 if out else max(0.0, deadline - time.monotonic())
                if self._early:
                    item = self._early.pop(0)
                else:
                    item = self._pubsub.get_message(timeout=wait)
            except TRANSIENT_ERRORS as exc:
                self.broker.connection_lost(exc)
                self._drop()
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
                return out
            if item is None:
                if out or time.monotonic() >= deadline:
                    return out
                continue
            if item.get("type") not in ("pmessage", "message"):
                continue
            try:
                message = decode_envelope(item["data"])[0]
            except CorruptEnvelope as exc:
                logger.warning("Ignored a broadcast that is not a kombu envelope: %s", exc)
                continue
            out.append(message)
            if len(out) >= 1000:
                return out

    def _drop(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:  # already broken
                pass

    def close(self) -> None:
        """Unsubscribe and release the connection."""
        self._drop()
