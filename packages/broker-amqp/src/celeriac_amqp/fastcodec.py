"""Faster AMQP 0-9-1 field tables and basic properties for pika (same values, less Python).

A Celery task message carries ~20 headers in its properties' field table, and pika decodes
(and encodes) it value by value through generic helpers; in a worker draining RabbitMQ that was
the largest share of the consumer thread's time. The functions here produce exactly what pika's
produce (the field types of the AMQP 0-9-1 spec with RabbitMQ's errata: ``t b B s u I i l f d D
S x A T F V``; ``f``/``d`` as floats, see :mod:`celeriac_amqp.fieldtable`) with one dispatch per
value and precompiled ``struct`` formats. :func:`install` puts them into pika (idempotent,
process-wide); ``tests/test_amqp_fastcodec.py`` checks them against pika's own.
"""

from __future__ import annotations

import calendar
import decimal
import struct
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pika.compat
import pika.data
import pika.exceptions
import pika.spec

__all__ = ["decode_properties", "decode_table", "encode_properties", "encode_table", "install"]

_U8 = struct.Struct(">B")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_H = struct.Struct(">H")
_I8 = struct.Struct(">b")
_I16 = struct.Struct(">h")
_U16 = struct.Struct(">H")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")
_F32 = struct.Struct(">f")
_F64 = struct.Struct(">d")
_DEC = struct.Struct(">Bi")
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1


def _text(raw: bytes) -> str | bytes:
    try:
        return raw.decode("utf8")
    except UnicodeDecodeError:
        return raw


def _value(buf: bytes, offset: int) -> tuple[Any, int]:
    kind = buf[offset]
    offset += 1
    if kind == 0x53:  # S long string
        length = _U32.unpack_from(buf, offset)[0]
        offset += 4
        return _text(buf[offset:offset + length]), offset + length
    if kind == 0x49:  # I int32
        return _I32.unpack_from(buf, offset)[0], offset + 4
    if kind == 0x56:  # V void
        return None, offset
    if kind == 0x74:  # t bool
        return bool(buf[offset]), offset + 1
    if kind == 0x41:  # A array
        length = _U32.unpack_from(buf, offset)[0]
        offset += 4
        end = offset + length
        items = []
        while offset < end:
            item, offset = _value(buf, offset)
            items.append(item)
        return items, offset
    if kind == 0x46:  # F table
        return decode_table(buf, offset)
    if kind == 0x64:  # d double
        return _F64.unpack_from(buf, offset)[0], offset + 8
    if kind in (0x6C, 0x4C):  # l / L int64 (signed, RabbitMQ's errata)
        return _I64.unpack_from(buf, offset)[0], offset + 8
    if kind == 0x66:  # f float
        return _F32.unpack_from(buf, offset)[0], offset + 4
    if kind == 0x62:  # b int8
        return _I8.unpack_from(buf, offset)[0], offset + 1
    if kind == 0x42:  # B uint8
        return buf[offset], offset + 1
    if kind in (0x73, 0x55):  # s / U int16
        return _I16.unpack_from(buf, offset)[0], offset + 2
    if kind == 0x75:  # u uint16
        return _U16.unpack_from(buf, offset)[0], offset + 2
    if kind == 0x69:  # i uint32
        return _U32.unpack_from(buf, offset)[0], offset + 4
    if kind == 0x78:  # x byte array
        length = _U32.unpack_from(buf, offset)[0]
        offset += 4
        return buf[offset:offset + length], offset + length
    if kind == 0x54:  # T timestamp
        return datetime.fromtimestamp(_U64.unpack_from(buf, offset)[0], timezone.utc), offset + 8
    if kind == 0x44:  # D decimal
        decimals, raw = _DEC.unpack_from(buf, offset)
        return decimal.Decimal(raw) * (decimal.Decimal(10) ** -decimals), offset + 5
    raise pika.exceptions.InvalidFieldTypeException(bytes([kind]))


def decode_table(buf: bytes, offset: int) -> tuple[dict[str | bytes, Any], int]:
    """The field table at ``offset`` of ``buf`` and the offset after it (pika's result)."""
    size = _U32.unpack_from(buf, offset)[0]
    offset += 4
    end = offset + size
    table: dict[str | bytes, Any] = {}
    while offset < end:
        length = buf[offset]
        offset += 1
        key = _text(buf[offset:offset + length])
        value, offset = _value(buf, offset + length)
        table[key] = value
    return table, offset


def _encode(out: list[bytes], value: Any) -> None:
    if isinstance(value, str):
        raw = value.encode("utf8")
        out.append(b"S" + _U32.pack(len(raw)))
        out.append(raw)
    elif value is None:
        out.append(b"V")
    elif isinstance(value, bool):
        out.append(b"t\x01" if value else b"t\x00")
    elif isinstance(value, int):
        if _INT_MIN <= value <= _INT_MAX and not isinstance(value, pika.compat.long):
            out.append(b"I" + _I32.pack(value))
        else:
            out.append(b"l" + _I64.pack(value))
    elif isinstance(value, float):
        out.append(b"d" + _F64.pack(value))
    elif isinstance(value, dict):
        out.append(b"F")
        _encode_table(out, value)
    elif isinstance(value, list | tuple):
        items: list[bytes] = []
        for item in value:
            _encode(items, item)
        body = b"".join(items)
        out.append(b"A" + _U32.pack(len(body)))
        out.append(body)
    elif isinstance(value, bytes):
        out.append(b"x" + _U32.pack(len(value)))
        out.append(value)
    elif isinstance(value, decimal.Decimal):
        value = value.normalize()
        exponent = value.as_tuple().exponent
        if isinstance(exponent, int) and exponent < 0:
            out.append(b"D" + _DEC.pack(-exponent, int(value * (decimal.Decimal(10) ** -exponent))))
        else:
            out.append(b"D" + _DEC.pack(0, int(value)))
    elif isinstance(value, datetime):
        out.append(b"T" + _U64.pack(calendar.timegm(value.utctimetuple())))
    else:
        raise pika.exceptions.UnsupportedAMQPFieldException(out, value)


#: Encoded field names (length byte + UTF-8), by name: a task message repeats the same ~20.
_KEYS: dict[Any, bytes] = {}
_KEYS_MAX = 4096


def _key(key: Any) -> bytes:
    raw = key.encode("utf8") if isinstance(key, str) else bytes(key)
    if len(raw) > 255:
        raise ValueError(f"AMQP field table keys are at most 255 bytes: {raw[:40]!r}...")
    encoded = _U8.pack(len(raw)) + raw
    if isinstance(key, str) and len(_KEYS) < _KEYS_MAX:
        _KEYS[key] = encoded
    return encoded


def _table_body(table: dict[Any, Any]) -> bytes:
    parts: list[bytes] = []
    append = parts.append
    keys = _KEYS
    pack32 = _U32.pack
    for key, value in table.items():
        append(keys.get(key) or _key(key))
        kind = type(value)
        if kind is str:  # most headers: inline the common cases
            raw = value.encode("utf8")
            append(b"S" + pack32(len(raw)))
            append(raw)
        elif value is None:
            append(b"V")
        else:
            _encode(parts, value)
    return b"".join(parts)


def _encode_table(out: list[bytes], table: dict[Any, Any] | None) -> int:
    body = _table_body(table) if table else b""
    out.append(_U32.pack(len(body)))
    out.append(body)
    return len(body) + 4


def encode_table(pieces: list[bytes], table: dict[Any, Any] | None) -> int:
    """Append the encoding of ``table`` to ``pieces``; return its size in bytes (pika's API)."""
    return _encode_table(pieces, table)


def _short(buf: bytes, offset: int) -> tuple[str | bytes, int]:
    length = buf[offset]
    offset += 1
    return _text(buf[offset:offset + length]), offset + length


_P = pika.spec.BasicProperties


def decode_properties(self: pika.spec.BasicProperties, encoded: bytes, offset: int = 0) -> Any:
    """``BasicProperties.decode``: the property flags, then each present property in order."""
    flags = 0
    flagword_index = 0
    while True:
        partial = _H.unpack_from(encoded, offset)[0]
        offset += 2
        flags |= partial << (flagword_index * 16)
        if not partial & 1:
            break
        flagword_index += 1
    short = _short
    self.content_type, offset = short(encoded, offset) if flags & _P.FLAG_CONTENT_TYPE else (None, offset)
    self.content_encoding, offset = (short(encoded, offset) if flags & _P.FLAG_CONTENT_ENCODING
                                     else (None, offset))
    self.headers, offset = decode_table(encoded, offset) if flags & _P.FLAG_HEADERS else (None, offset)
    if flags & _P.FLAG_DELIVERY_MODE:
        self.delivery_mode = encoded[offset]
        offset += 1
    else:
        self.delivery_mode = None
    if flags & _P.FLAG_PRIORITY:
        self.priority = encoded[offset]
        offset += 1
    else:
        self.priority = None
    self.correlation_id, offset = (short(encoded, offset) if flags & _P.FLAG_CORRELATION_ID
                                   else (None, offset))
    self.reply_to, offset = short(encoded, offset) if flags & _P.FLAG_REPLY_TO else (None, offset)
    self.expiration, offset = short(encoded, offset) if flags & _P.FLAG_EXPIRATION else (None, offset)
    self.message_id, offset = short(encoded, offset) if flags & _P.FLAG_MESSAGE_ID else (None, offset)
    if flags & _P.FLAG_TIMESTAMP:
        self.timestamp = _U64.unpack_from(encoded, offset)[0]
        offset += 8
    else:
        self.timestamp = None
    self.type, offset = short(encoded, offset) if flags & _P.FLAG_TYPE else (None, offset)
    self.user_id, offset = short(encoded, offset) if flags & _P.FLAG_USER_ID else (None, offset)
    self.app_id, offset = short(encoded, offset) if flags & _P.FLAG_APP_ID else (None, offset)
    self.cluster_id, offset = short(encoded, offset) if flags & _P.FLAG_CLUSTER_ID else (None, offset)
    return self


def _short_bytes(name: str, value: Any) -> bytes:
    if not isinstance(value, (str, bytes)):
        raise TypeError(f"The AMQP property {name} must be a str or bytes, not {type(value).__name__}.")
    raw = value.encode("utf8") if isinstance(value, str) else value
    if len(raw) > 255:
        raise pika.exceptions.ShortStringTooLong(raw)
    return _U8.pack(len(raw)) + raw


def encode_properties(self: pika.spec.BasicProperties) -> list[bytes]:
    """``BasicProperties.encode``: the property flags, then each present property in order."""
    pieces: list[bytes] = []
    flags = 0
    if self.content_type is not None:
        flags |= _P.FLAG_CONTENT_TYPE
        pieces.append(_short_bytes("content_type", self.content_type))
    if self.content_encoding is not None:
        flags |= _P.FLAG_CONTENT_ENCODING
        pieces.append(_short_bytes("content_encoding", self.content_encoding))
    if self.headers is not None:
        flags |= _P.FLAG_HEADERS
        _encode_table(pieces, self.headers)
    if self.delivery_mode is not None:
        flags |= _P.FLAG_DELIVERY_MODE
        pieces.append(_U8.pack(self.delivery_mode))
    if self.priority is not None:
        flags |= _P.FLAG_PRIORITY
        pieces.append(_U8.pack(self.priority))
    for name, flag in _SHORT_TAIL_1:
        value = getattr(self, name)
        if value is not None:
            flags |= flag
            pieces.append(_short_bytes(name, value))
    if self.timestamp is not None:
        flags |= _P.FLAG_TIMESTAMP
        pieces.append(_U64.pack(self.timestamp))
    for name, flag in _SHORT_TAIL_2:
        value = getattr(self, name)
        if value is not None:
            flags |= flag
            pieces.append(_short_bytes(name, value))
    flag_pieces: list[bytes] = []
    while True:
        remainder = flags >> 16
        partial = flags & 0xFFFE
        if remainder:
            partial |= 1
        flag_pieces.append(_H.pack(partial))
        flags = remainder
        if not flags:
            break
    return flag_pieces + pieces


_SHORT_TAIL_1 = (("correlation_id", _P.FLAG_CORRELATION_ID), ("reply_to", _P.FLAG_REPLY_TO),
                 ("expiration", _P.FLAG_EXPIRATION), ("message_id", _P.FLAG_MESSAGE_ID))
_SHORT_TAIL_2 = (("type", _P.FLAG_TYPE), ("user_id", _P.FLAG_USER_ID), ("app_id", _P.FLAG_APP_ID),
                 ("cluster_id", _P.FLAG_CLUSTER_ID))


_installed: dict[str, Callable[..., Any]] = {}


def install() -> None:
    """Put the fast codecs into pika (idempotent). pika's originals stay available as
    ``celeriac_amqp.fastcodec._installed`` for the equivalence tests."""
    if _installed:
        return
    _installed.update(decode_table=pika.data.decode_table, encode_table=pika.data.encode_table,
                      decode_properties=pika.spec.BasicProperties.decode,
                      encode_properties=pika.spec.BasicProperties.encode)
    pika.data.decode_table = decode_table
    pika.data.encode_table = encode_table
    pika.spec.BasicProperties.decode = decode_properties  # type: ignore[method-assign]
    pika.spec.BasicProperties.encode = encode_properties  # type: ignore[method-assign]
