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

The bytes on the wire are identical; only how they are handed to the kernel changes. TLS
connections (pika's SSL transport) are left alone. ``tests/test_amqp_fastwrite.py`` checks both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pika.connection
from pika.adapters.utils import io_services_utils

__all__ = ["JOIN_LIMIT", "corked", "install"]

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


def install() -> None:
    """Put the joined frames and the direct write into pika (idempotent, process-wide)."""
    if _installed:
        return
    transport = io_services_utils._AsyncPlaintextTransport
    _installed.update(_output_marshaled_frames=pika.connection.Connection._output_marshaled_frames,
                      write=transport.write)
    pika.connection.Connection._output_marshaled_frames = _output_marshaled_frames  # type: ignore[method-assign]
    transport.write = _write  # type: ignore[method-assign]
