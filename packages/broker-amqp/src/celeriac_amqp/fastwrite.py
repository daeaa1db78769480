"""Fewer system calls per published message for pika's plain-TCP transport.

pika hands each frame of a message (method, header, body) to its transport separately, and the
transport only buffers it: the bytes leave on the I/O loop's next turn, after registering for
writability, one ``send()`` per frame, then unregistering. A ``basic_publish`` therefore cost a
poll and three sends, and a round trip paid that on both sides. With :func:`install`:

- the frames of one message are joined into one buffer (up to :data:`JOIN_LIMIT` bytes; a
  larger body keeps pika's own frame-by-frame path, to avoid copying it again);
- a write to an idle transport (nothing buffered) is sent at once with a non-blocking
  ``send()``; what the kernel does not take, and any error, goes the original way (buffered,
  writability watched), so ordering, partial sends and connection errors behave as before.

Inside :func:`corked`, what a connection writes is collected and written once at the end (the
consumer's acks of one loop turn: one ``send()`` instead of one per ack).

:func:`basic_publish`, :func:`basic_ack` and :func:`basic_reject` build their frames with
``struct`` (AMQP 0-9-1 section 4.2.3 frame layout: type octet, channel short, size long,
payload, ``0xCE``; method payloads are class id, method id, then the arguments) instead of
pika's frame and method objects, and hand them to pika's connection as pika would. They fall back
to pika's own methods when :func:`install` was not called.

The bytes on the wire are identical; only how they are handed to the kernel changes. TLS
connections (pika's SSL transport) are left alone. ``tests/test_amqp_fastwrite.py`` checks both.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pika.connection
import pika.exceptions
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.utils import io_services_utils

__all__ = ["JOIN_LIMIT", "basic_ack", "basic_publish", "basic_reject", "corked", "install",
           "publish_frames"]

_FRAME_HEAD = struct.Struct(">BHI")  # frame type, channel, payload size
_FRAME_END = b"\xce"
_PUBLISH_HEAD = struct.Struct(">HHH")  # Basic (60) . Publish (40), reserved ticket
_CONTENT_HEAD = struct.Struct(">HHQ")  # class Basic (60), weight 0, body size
# method frame: Basic (60) . Ack (80) or Reject (90), delivery tag, multiple or requeue bit
_SETTLE = struct.Struct(">BHIHHQB")

#: Messages whose frames add up to at most this many bytes are sent as one buffer.
JOIN_LIMIT = 256 * 1024

_installed: dict[str, Callable[..., Any]] = {}


def _output_marshaled_frames(self: Any, marshaled_frames: Sequence[bytes]) -> None:
    """``Connection._output_marshaled_frames``: the frames as one write when small."""
    if len(marshaled_frames) > 1:
        size = sum(len(frame) for frame in marshaled_frames)
        if size <= JOIN_LIMIT:
            self.bytes_sent += size
            self.frames_sent += len(marshaled_frames)
            self._adapter_emit_data(b"".join(marshaled_frames))
            return
    _installed["_output_marshaled_frames"](self, marshaled_frames)


def _write(self: Any, data: bytes) -> None:
    """``_AsyncPlaintextTransport.write``: send at once when nothing is waiting to be sent."""
    held = self.__dict__.get("_celeriac_held")
    if held is not None:
        held.append(data)
        return
    if self._state == self._STATE_ACTIVE and data and not self._tx_buffers:
        try:
            sent = self._sock.send(data)
        except OSError:
            # Would block, interrupted, or broken: buffered below, and the I/O loop meets (and
            # handles) a real error on its next turn as it always did.
            sent = 0
        if sent >= len(data):
            return
        data = data[sent:]
    _installed["write"](self, data)


@contextlib.contextmanager
def corked(connection: Any) -> Iterator[None]:
    """Collect what pika's ``BlockingConnection`` ``connection`` writes in the block, and write
    it as one buffer when the block ends (also when it raises). Call it only from the thread
    that owns the connection. Without :func:`install`, or on TLS, it changes nothing."""
    transport = getattr(getattr(connection, "_impl", None), "_transport", None)
    if not _installed or not isinstance(transport, io_services_utils._AsyncPlaintextTransport):
        yield
        return
    held: list[bytes] = []
    transport.__dict__["_celeriac_held"] = held
    try:
        yield
    finally:
        del transport.__dict__["_celeriac_held"]
        if held:
            transport.write(b"".join(held))


def _short(value: str) -> bytes:
    raw = value.encode("utf8")
    if len(raw) > 255:
        raise pika.exceptions.ShortStringTooLong(raw)
    return bytes((len(raw),)) + raw


def publish_frames(channel_number: int, exchange: str, routing_key: str, body: bytes,
                   properties: pika.spec.BasicProperties, body_max: int,
                   mandatory: bool = False) -> list[bytes]:
    """The marshaled frames of ``basic.publish`` (method, content header, body frames of at most
    ``body_max`` bytes), byte for byte what pika's ``Connection._send_message`` produces."""
    method = (_PUBLISH_HEAD.pack(60, 40, 0) + _short(exchange) + _short(routing_key)
              + (b"\x01" if mandatory else b"\x00"))
    header = _CONTENT_HEAD.pack(60, 0, len(body)) + b"".join(properties.encode())
    frames = [_FRAME_HEAD.pack(1, channel_number, len(method)) + method + _FRAME_END,
              _FRAME_HEAD.pack(2, channel_number, len(header)) + header + _FRAME_END]
    for start in range(0, len(body), body_max):
        chunk = body[start:start + body_max]
        frames.append(_FRAME_HEAD.pack(3, channel_number, len(chunk)) + chunk + _FRAME_END)
    return frames


def _sendable(channel: BlockingChannel) -> Any:
    """pika's connection of ``channel`` when frames can be written to it directly, else None.
    Raises pika's errors for a closed channel or connection, as its own methods do."""
    if not _installed:
        return None
    impl: Any = channel._impl
    impl._raise_if_not_open()
    connection = impl.connection
    if connection.is_closed:
        raise pika.exceptions.ConnectionWrongStateError(
            "Attempted to send a frame on closed connection.")
    return connection


def basic_publish(channel: BlockingChannel, exchange: str, routing_key: str, body: bytes,
                  properties: pika.spec.BasicProperties) -> None:
    """``BlockingChannel.basic_publish`` without a confirm wait of pika's own (the caller's
    :class:`~celeriac_amqp.confirms.ConfirmWindow` counts confirms). Raises pika's errors."""
    connection = _sendable(channel)
    if connection is None:
        channel.basic_publish(exchange, routing_key, body, properties)
        return
    connection._output_marshaled_frames(publish_frames(
        channel.channel_number, exchange, routing_key, body, properties,
        connection._body_max_length))
    channel._flush_output()


def _settle(channel: BlockingChannel, method_id: int, delivery_tag: int, flag: bool) -> None:
    """Queue ``basic.ack`` (80, ``flag`` = multiple) or ``basic.reject`` (90, ``flag`` =
    requeue) on ``channel``: written at the next flush, or at once when the socket is idle."""
    connection = _sendable(channel)
    if connection is None:
        if method_id == 80:
            channel._impl.basic_ack(delivery_tag, multiple=flag)
        else:
            channel._impl.basic_reject(delivery_tag, requeue=flag)
        return
    connection._output_marshaled_frames([_SETTLE.pack(1, channel.channel_number, 13, 60, method_id,
                                                      delivery_tag, 1 if flag else 0) + _FRAME_END])


def basic_ack(channel: BlockingChannel, delivery_tag: int, multiple: bool = False) -> None:
    """Queue ``basic.ack`` on ``channel`` (written at the next flush, or at once when idle)."""
    _settle(channel, 80, delivery_tag, multiple)


def basic_reject(channel: BlockingChannel, delivery_tag: int, requeue: bool) -> None:
    """Queue ``basic.reject`` on ``channel`` (written at the next flush, or at once when idle)."""
    _settle(channel, 90, delivery_tag, requeue)


def install() -> None:
    """Put the joined frames and the direct write into pika (idempotent, process-wide)."""
    if _installed:
        return
    transport = io_services_utils._AsyncPlaintextTransport
    _installed.update(_output_marshaled_frames=pika.connection.Connection._output_marshaled_frames,
                      write=transport.write)
    pika.connection.Connection._output_marshaled_frames = _output_marshaled_frames  # type: ignore[method-assign]
    transport.write = _write  # type: ignore[method-assign]
