"""Correct AMQP field-table handling of floating point values in pika.

pika 1.x refuses to encode a ``float`` in message headers and decodes the AMQP ``d`` (double)
and ``f`` (float) field types by truncating them to integers. Celery (through py-amqp) writes
floats as doubles, e.g. ``timelimit: [10.5, null]``, so a compatible broker must round-trip them.
:func:`install` wraps pika's ``encode_value`` / ``decode_value`` so that floats are written as
``d`` and both float types are read back as ``float``; tuples are written as arrays. Every
other type is left to pika. Installing is idempotent and affects pika process-wide (it only
changes cases pika gets wrong or rejects).
"""

from __future__ import annotations

import struct
from typing import Any

import pika.data

__all__ = ["install"]

_installed = False


def install() -> None:
    """Install the float-aware codecs into :mod:`pika.data` (idempotent)."""
    global _installed
    if _installed:
        return
    original_encode = pika.data.encode_value
    original_decode = pika.data.decode_value

    def encode_value(pieces: list[bytes], value: Any) -> int:
        if isinstance(value, float):
            pieces.append(struct.pack(">cd", b"d", value))
            return 9
        if isinstance(value, tuple):
            value = list(value)
        return original_encode(pieces, value)  # type: ignore[no-any-return]

    def decode_value(encoded: bytes, offset: int) -> tuple[Any, int]:
        kind = encoded[offset:offset + 1]
        if kind == b"d":
            return struct.unpack_from(">d", encoded, offset + 1)[0], offset + 9
        if kind == b"f":
            return struct.unpack_from(">f", encoded, offset + 1)[0], offset + 5
        return original_decode(encoded, offset)  # type: ignore[no-any-return]

    pika.data.encode_value = encode_value
    pika.data.decode_value = decode_value
    _installed = True
