"""The AMQP 1.0 type system and message sections in plain Python: the codec's fast path.

proton's ``Message`` builds every field through its C ``pn_data`` tree, one wrapped call per
value; encoding and decoding a Celeriac message that way costs more than the rest of a publish.
A Celeriac message has a fixed shape (header, properties, application properties, one ``data``
section), so it is encoded here with a few ``struct`` calls, and received messages are parsed
by :func:`parse_message` (the whole type system except ``decimal`` types; anything it does not
know raises :class:`WireError`, and :mod:`celeriac_qpid.codec` falls back to proton then).

Reference: the AMQP 1.0 specification, part 1 (types) and part 3 (message format).
"""

from __future__ import annotations

import struct
import uuid
from typing import Any

__all__ = ["Parsed", "WireError", "encode_message", "parse_message"]


class WireError(ValueError):
    """Bytes that are not an AMQP 1.0 message this module can read: broken (truncated,
    malformed), or ``unsupported`` (valid AMQP this module does not decode; proton may)."""

    def __init__(self, text: str, unsupported: bool = False) -> None:
        super().__init__(text)
        self.unsupported = unsupported


_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_F64 = struct.Struct(">d")
_LIST8 = struct.Struct(">BBB")  # constructor, size, count
_LIST32 = struct.Struct(">BII")

# section descriptors (smallulong)
_HEADER, _DELIVERY_ANN, _MESSAGE_ANN, _PROPERTIES, _APP_PROPS, _DATA, _SEQUENCE, _VALUE, _FOOTER = range(0x70, 0x79)


def _str(text: str, small: int = 0xA1, big: int = 0xB1) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) < 256:
        return bytes((small, len(raw))) + raw
    return bytes((big,)) + _U32.pack(len(raw)) + raw


_SYMBOLS: dict[str, bytes] = {}
_KEYS: dict[str, bytes] = {}  # application property names: a handful, cached


def _sym(text: str) -> bytes:
    """A symbol (content types and encodings: a handful of values, cached)."""
    out = _SYMBOLS.get(text)
    if out is None:
        out = _str(text, 0xA3, 0xB3)
        if len(_SYMBOLS) < 64:
            _SYMBOLS[text] = out
    return out


def _bin(raw: bytes) -> bytes:
    if len(raw) < 256:
        return bytes((0xA0, len(raw))) + raw
    return b"\xb0" + _U32.pack(len(raw)) + raw


def _value(value: Any) -> bytes:
    """A simple value (application property): null, bool, str, bytes, int (long), float (double)."""
    if isinstance(value, str):
        return _str(value)
    if value is None:
        return b"\x40"
    if value is True:
        return b"\x41"
    if value is False:
        return b"\x42"
    if isinstance(value, bytes):
        return _bin(value)
    if isinstance(value, int):
        if -128 <= value < 128:
            return b"\x55" + value.to_bytes(1, "big", signed=True)
        return b"\x81" + _I64.pack(value)
    if isinstance(value, float):
        return b"\x82" + _F64.pack(value)
    raise TypeError(f"no AMQP 1.0 encoding here for {type(value).__name__}")


def _compound(payload: bytes, count: int, small: int, big: int) -> bytes:
    if len(payload) < 255 and count < 256:
        return _LIST8.pack(small, len(payload) + 1, count) + payload
    return _LIST32.pack(big, len(payload) + 4, count) + payload


_NULL = b"\x40"


def encode_message(durable: bool, priority: int | None, ttl_ms: int | None, message_id: str | None,
                   subject: str | None, reply_to: str | None, correlation_id: str | None,
                   content_type: str | None, content_encoding: str | None, creation_ms: int | None,
                   app: dict[str, Any] | None, body: bytes) -> bytes:
    """One AMQP 1.0 message: header (``durable``, ``priority``, ``ttl_ms``), properties,
    application properties (``app``), one ``data`` section (``body``). None leaves a field out.

    Raises ``TypeError`` for an application property value that is not a simple type.
    """
    parts: list[bytes] = []
    if ttl_ms is not None:
        fields = [b"\x41" if durable else _NULL, _NULL if priority is None else bytes((0x50, priority)),
                  b"\x70" + _U32.pack(ttl_ms)]
    elif priority is not None:
        fields = [b"\x41" if durable else _NULL, bytes((0x50, priority))]
    elif durable:
        fields = [b"\x41"]
    else:
        fields = []
    if fields:
        parts.append(b"\x00\x53\x70" + _compound(b"".join(fields), len(fields), 0xC0, 0xD0))
    fields = [
        _NULL if message_id is None else _str(message_id),
        _NULL,  # user-id
        _NULL,  # to
        _NULL if subject is None else _str(subject),
        _NULL if reply_to is None else _str(reply_to),
        _NULL if correlation_id is None else _str(correlation_id),
        _NULL if content_type is None else _sym(content_type),
        _NULL if content_encoding is None else _sym(content_encoding),
        _NULL,  # absolute-expiry-time
        _NULL if creation_ms is None else b"\x83" + _I64.pack(creation_ms),
    ]
    while fields and fields[-1] is _NULL:  # trailing nulls are the defaults
        fields.pop()
    if fields:
        parts.append(b"\x00\x53\x73" + _compound(b"".join(fields), len(fields), 0xC0, 0xD0))
    if app:
        items: list[bytes] = []
        for key, value in app.items():
            encoded = _KEYS.get(key)
            if encoded is None:
                encoded = _str(key)
                if len(_KEYS) < 64:
                    _KEYS[key] = encoded
            items.append(encoded)
            items.append(_str(value) if type(value) is str else _value(value))
        parts.append(b"\x00\x53\x74" + _compound(b"".join(items), len(items), 0xC1, 0xD1))
    parts.append(b"\x00\x53\x75" + _bin(body))
    return b"".join(parts)


# -- parsing ----------------------------------------------------------------------------------


class Parsed:
    """A received message, with the attribute names (and units) of ``proton.Message`` that
    :func:`celeriac_qpid.codec.decode` reads: ``ttl`` and ``creation_time`` in seconds."""

    __slots__ = ("body", "content_encoding", "content_type", "correlation_id", "creation_time",
                 "delivery_count", "durable", "first_acquirer", "id", "priority", "properties",
                 "reply_to", "subject", "ttl")

    def __init__(self) -> None:
        self.body: Any = None
        self.durable = False
        self.priority = 4
        self.ttl = 0.0
        self.first_acquirer = False
        self.delivery_count = 0
        self.id: Any = None
        self.subject: Any = None
        self.reply_to: Any = None
        self.correlation_id: Any = None
        self.content_type: Any = None
        self.content_encoding: Any = None
        self.creation_time = 0.0
        self.properties: Any = None


class Described:
    """A described value other than a message section (kept as descriptor and value)."""

    __slots__ = ("descriptor", "value")

    def __init__(self, descriptor: Any, value: Any) -> None:
        self.descriptor = descriptor
        self.value = value

    def __repr__(self) -> str:
        return f"Described({self.descriptor!r}, {self.value!r})"


_FIXED: dict[int, tuple[int, Any]] = {
    0x50: (1, lambda b: b[0]),
    0x51: (1, lambda b: int.from_bytes(b, "big", signed=True)),
    0x52: (1, lambda b: b[0]),
    0x53: (1, lambda b: b[0]),
    0x54: (1, lambda b: int.from_bytes(b, "big", signed=True)),
    0x55: (1, lambda b: int.from_bytes(b, "big", signed=True)),
    0x56: (1, lambda b: b[0] != 0),
    0x60: (2, lambda b: int.from_bytes(b, "big")),
    0x61: (2, lambda b: int.from_bytes(b, "big", signed=True)),
    0x70: (4, lambda b: int.from_bytes(b, "big")),
    0x71: (4, lambda b: int.from_bytes(b, "big", signed=True)),
    0x72: (4, lambda b: struct.unpack(">f", b)[0]),
    0x73: (4, lambda b: chr(int.from_bytes(b, "big"))),
    0x80: (8, lambda b: int.from_bytes(b, "big")),
    0x81: (8, lambda b: int.from_bytes(b, "big", signed=True)),
    0x82: (8, lambda b: _F64.unpack(b)[0]),
    0x83: (8, lambda b: int.from_bytes(b, "big", signed=True)),  # timestamp, ms
    0x98: (16, lambda b: uuid.UUID(bytes=bytes(b))),
}
_EMPTY: dict[int, Any] = {0x40: None, 0x41: True, 0x42: False, 0x43: 0, 0x44: 0, 0x45: []}


def _read(data: bytes, pos: int) -> tuple[Any, int]:
    """Decode one value at ``pos``; return it and the position after it."""
    code = data[pos]
    if code == 0x00:
        descriptor, pos = _read(data, pos + 1)
        value, pos = _read(data, pos)
        return Described(descriptor, value), pos
    return _read_as(code, data, pos + 1)


def _read_as(code: int, data: bytes, pos: int) -> tuple[Any, int]:
    """Decode the value at ``pos`` whose constructor ``code`` was already read."""
    if code == 0xA1 or code == 0xA3 or code == 0xA0:  # str8, sym8, vbin8: the common cases first
        end = pos + 1 + data[pos]
        if end > len(data):
            raise WireError("truncated variable-width value")
        raw = data[pos + 1:end]
        return (raw if code == 0xA0 else raw.decode("utf-8")), end
    if code == 0x40:
        return None, pos
    if code in _EMPTY:
        value = _EMPTY[code]
        return ([] if value == [] else value), pos
    if 0xA0 <= code <= 0xB3:
        size = _U32.unpack_from(data, pos)[0]
        pos += 4
        end = pos + size
        if end > len(data):
            raise WireError("truncated variable-width value")
        kind = code & 0x0F
        if code >= 0xB0 and kind == 0x00:
            return bytes(data[pos:end]), end
        if code >= 0xB0 and kind in (0x01, 0x03):  # str32, sym32
            return bytes(data[pos:end]).decode("utf-8"), end
        raise WireError(f"unknown constructor 0x{code:02x}", unsupported=True)
    if code in (0xC0, 0xC1, 0xD0, 0xD1):
        if code < 0xD0:
            count = data[pos + 1]
            pos += 2
        else:
            count = _U32.unpack_from(data, pos + 4)[0]
            pos += 8
        items: list[Any] = []
        append = items.append
        for _ in range(count):  # the common element types inline: most of a message's values
            element = data[pos]
            if element == 0xA1 or element == 0xA3:
                end = pos + 2 + data[pos + 1]
                append(data[pos + 2:end].decode("utf-8"))
                pos = end
            elif element == 0x40:
                append(None)
                pos += 1
            else:
                item, pos = _read(data, pos)
                append(item)
        if code in (0xC1, 0xD1):
            try:
                return dict(zip(items[::2], items[1::2], strict=True)), pos
            except (TypeError, ValueError) as exc:
                raise WireError(f"a map cannot be read: {exc}") from None
        return items, pos
    if code in (0xE0, 0xF0):
        if code == 0xE0:
            count = data[pos + 1]
            pos += 2
        else:
            count = _U32.unpack_from(data, pos + 4)[0]
            pos += 8
        element = data[pos]
        if element == 0x00:
            raise WireError("arrays of described values are not read here", unsupported=True)
        pos += 1
        out = []
        for _ in range(count):
            item, pos = _read_as(element, data, pos)
            out.append(item)
        return out, pos
    fixed = _FIXED.get(code)
    if fixed is None:
        raise WireError(f"unknown constructor 0x{code:02x}", unsupported=True)
    width, convert = fixed
    end = pos + width
    if end > len(data):
        raise WireError("truncated fixed-width value")
    return convert(data[pos:end]), end


def _field(items: list[Any], index: int) -> Any:
    return items[index] if index < len(items) else None


def parse_message(data: bytes) -> Parsed:
    """Read the sections of one AMQP 1.0 message. Raises :class:`WireError` for what this
    module cannot read (arrays of arrays, decimals, malformed bytes)."""
    out = Parsed()
    pos = 0
    end = len(data)
    body: list[bytes] = []
    try:
        while pos < end:
            if data[pos] != 0x00:
                raise WireError("a message section is not a described value")
            if data[pos + 1] == 0x53:  # smallulong descriptor, as every client sends them
                descriptor = data[pos + 2]
                pos += 3
            else:
                descriptor, pos = _read(data, pos + 1)
            value, pos = _read(data, pos)
            if descriptor == _HEADER or descriptor == "amqp:header:list":
                out.durable = bool(_field(value, 0))
                priority = _field(value, 1)
                out.priority = 4 if priority is None else priority
                ttl = _field(value, 2)
                out.ttl = 0.0 if ttl is None else ttl / 1000.0
                out.first_acquirer = bool(_field(value, 3))
                out.delivery_count = _field(value, 4) or 0
            elif descriptor == _PROPERTIES or descriptor == "amqp:properties:list":
                out.id = _field(value, 0)
                out.subject = _field(value, 3)
                out.reply_to = _field(value, 4)
                out.correlation_id = _field(value, 5)
                out.content_type = _field(value, 6)
                out.content_encoding = _field(value, 7)
                created = _field(value, 9)
                out.creation_time = 0.0 if created is None else created / 1000.0
            elif descriptor == _APP_PROPS or descriptor == "amqp:application-properties:map":
                out.properties = value
            elif descriptor == _DATA or descriptor == "amqp:data:binary":
                body.append(value)
            elif descriptor in (_SEQUENCE, _VALUE, "amqp:amqp-sequence:list", "amqp:amqp-value:*"):
                out.body = value
            elif descriptor not in (_DELIVERY_ANN, _MESSAGE_ANN, _FOOTER, "amqp:delivery-annotations:map",
                                    "amqp:message-annotations:map", "amqp:footer:map"):
                raise WireError(f"unknown message section {descriptor!r}", unsupported=True)
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise WireError(f"truncated message: {exc}") from None
    if pos != end:
        raise WireError("truncated message")
    if body:
        out.body = body[0] if len(body) == 1 else b"".join(body)
    return out
