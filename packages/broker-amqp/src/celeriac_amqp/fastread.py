"""Frame decoding for pika without copying the receive buffer once per frame.

pika's ``Connection._on_data_available`` decodes the frames of what the socket returned one at
a time and, after each, cuts the decoded bytes off the front of its buffer (``buffer =
buffer[n:]``): a read holding k frames copies the rest of the buffer k times, and a consumer
draining small messages (three frames each) reads many frames at once. The replacement here
walks the same buffer with an offset and keeps only the unfinished tail, building the same
frame objects (``pika.frame.Method``, ``Header``, ``Body``, ``Heartbeat``, ``ProtocolHeader``)
with the same errors, and counting ``bytes_received`` per frame as pika does.
``tests/test_amqp_fastread.py`` checks it against pika's own on chopped frame streams.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pika.connection
import pika.exceptions
import pika.frame
import pika.spec

__all__ = ["decode_frame_at", "install"]

_HEAD = struct.Struct(">BHL")
_METHOD_ID = struct.Struct(">I")
_CONTENT_HEADER = struct.Struct(">HHQ")
_FRAME_END = pika.spec.FRAME_END
_HEADER_SIZE = pika.spec.FRAME_HEADER_SIZE  # 7: type, channel, size

_installed: dict[str, Callable[..., Any]] = {}


def decode_frame_at(buf: bytes, offset: int) -> tuple[int, Any]:
    """``pika.frame.decode_frame`` of ``buf[offset:]`` without copying it: (bytes used, frame),
    or (0, None) while the frame is incomplete. Raises ``InvalidFrameError`` as pika does."""
    if buf.startswith(b"AMQP", offset):
        if len(buf) - offset < 8:
            return 0, None
        major, minor, revision = buf[offset + 5], buf[offset + 6], buf[offset + 7]
        return 8, pika.frame.ProtocolHeader(major, minor, revision)
    if len(buf) - offset < _HEADER_SIZE:
        return 0, None
    frame_type, channel, size = _HEAD.unpack_from(buf, offset)
    end = offset + _HEADER_SIZE + size + 1
    if end > len(buf):
        return 0, None
    if buf[end - 1] != _FRAME_END:
        raise pika.exceptions.InvalidFrameError("Invalid FRAME_END marker")
    start = offset + _HEADER_SIZE
    used = end - offset
    if frame_type == pika.spec.FRAME_METHOD:
        data = buf[start:end - 1]
        method = pika.spec.methods[_METHOD_ID.unpack_from(data)[0]]()
        method.decode(data, 4)
        return used, pika.frame.Method(channel, method)
    if frame_type == pika.spec.FRAME_HEADER:
        data = buf[start:end - 1]
        class_id, _weight, body_size = _CONTENT_HEADER.unpack_from(data)
        properties = pika.spec.props[class_id]()
        properties.decode(data, 12)
        return used, pika.frame.Header(channel, body_size, properties)
    if frame_type == pika.spec.FRAME_BODY:
        return used, pika.frame.Body(channel, buf[start:end - 1])
    if frame_type == pika.spec.FRAME_HEARTBEAT:
        return used, pika.frame.Heartbeat()
    raise pika.exceptions.InvalidFrameError(f"Unknown frame type: {frame_type}")


def _on_data_available(self: Any, data_in: bytes) -> None:
    """``Connection._on_data_available``: decode and process every whole frame received."""
    buf = self._frame_buffer + data_in if self._frame_buffer else data_in
    self._frame_buffer = buf
    offset = 0
    size = len(buf)
    while offset < size:
        used, frame_value = decode_frame_at(buf, offset)
        if not frame_value:
            break
        offset += used
        self.bytes_received += used
        self._process_frame(frame_value)
        if self._frame_buffer is not buf:
            return  # processing reset the connection's state (closed): the rest is dropped
    self._frame_buffer = buf[offset:] if offset else buf


def install() -> None:
    """Put the offset-walking frame decoder into pika (idempotent, process-wide)."""
    if _installed:
        return
    _installed["_on_data_available"] = pika.connection.Connection._on_data_available
    pika.connection.Connection._on_data_available = _on_data_available  # type: ignore[method-assign]
