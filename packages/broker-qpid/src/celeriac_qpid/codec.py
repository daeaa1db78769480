"""Celeriac messages to AMQP 1.0 messages and back.

The body travels as one ``data`` section (bytes, untouched). Message properties map to their
AMQP 1.0 fields: ``correlation_id``, ``reply_to``, ``message_id`` (``id``), content type and
encoding, ``delivery_mode`` 2 -> ``durable``, ``priority``, ``expiration`` (ms) -> ``ttl``,
``timestamp`` -> ``creation_time``. Headers and the properties without an AMQP 1.0 field travel JSON-encoded in the one application
property ``x-celeriac-json`` (application properties may not hold lists or maps, and one string
costs proton far less than twenty properties); ``task`` and ``id`` are also application
properties of their own, for other clients and selectors. Headers JSON cannot carry (bytes) fall
back to one application property each.

A message from another AMQP 1.0 client is read too: an ``amqp-value`` string body is taken as
UTF-8 text. What cannot be read (a map or list body, non-string property keys, broken
``x-celeriac-json``) raises :class:`celeriac.exceptions.DecodeError`.
"""

from __future__ import annotations

import json
from typing import Any

from celeriac.exceptions import DecodeError
from celeriac.protocol import Message
from proton import Message as AMQPMessage
from proton import symbol

from celeriac_qpid import wire

__all__ = ["JSON_PROPERTY", "decode", "encode", "message_id", "parse"]

JSON_PROPERTY = "x-celeriac-json"
#: Headers also sent as application properties of their own, for other clients, selectors
#: and management tools (the JSON property is what Celeriac reads).
VISIBLE = ("task", "id")
_LONG = 1 << 63


def _simple(value: Any) -> bool:
    if value is None or isinstance(value, str | bytes | float | bool):
        return True
    return isinstance(value, int) and -_LONG <= value < _LONG


_JSON = json.JSONEncoder(separators=(",", ":"))


def encode(message: Message, subject: str | None = None, ttl: float | None = None) -> bytes:
    """The AMQP 1.0 encoding of ``message`` (bare message with header and properties);
    ``ttl`` (seconds) is the time to live of a message that has no ``expiration`` of its own.

    Raises ``TypeError``/``ValueError`` for headers JSON cannot encode.
    """
    headers = message.headers or {}
    durable = False
    priority = ttl_ms = creation_ms = None
    message_id = reply_to = correlation_id = None
    rest: dict[str, Any] = {}
    for key, value in (message.properties or {}).items():
        if value is None:
            continue
        if key == "correlation_id":
            correlation_id = str(value)
        elif key == "reply_to":
            reply_to = str(value)
        elif key == "delivery_mode" and value == 2:
            durable = True
        elif key == "message_id":
            message_id = str(value)
        else:
            rest[key] = value
            if key == "priority":
                priority = max(0, min(255, int(value)))
            elif key == "expiration":
                ttl_ms = max(0, int(float(value)))
            elif key == "timestamp":
                creation_ms = int(float(value) * 1000)
    if ttl is not None and "expiration" not in rest:
        ttl_ms = int(ttl * 1000)
    app: dict[str, Any] = {}
    for key in VISIBLE:
        value = headers.get(key)
        if value is not None and _simple(value):
            app[key] = value
    try:
        # every header in one JSON property: one string to encode and decode instead of one
        # AMQP value per header
        app[JSON_PROPERTY] = _JSON.encode({"h": headers, "p": rest})
    except (TypeError, ValueError):  # a header JSON cannot carry: one property per header
        extra: dict[str, Any] = {}
        for key, value in headers.items():
            if _simple(value):
                app[str(key)] = value
            else:
                extra[str(key)] = value
        app[JSON_PROPERTY] = _JSON.encode({"h": extra, "p": rest})
    body = message.body
    return wire.encode_message(
        durable, priority, ttl_ms, message_id, subject, reply_to, correlation_id,
        message.content_type or None, message.content_encoding or None, creation_ms, app,
        body if isinstance(body, bytes) else bytes(body))


def parse(data: bytes) -> Any:
    """Read the bytes of one received message into an object with ``proton.Message``'s
    attributes (:class:`celeriac_qpid.wire.Parsed`, or a ``proton.Message`` for what the fast
    parser does not read). Raises ``DecodeError`` when neither can read it."""
    try:
        return wire.parse_message(data)
    except wire.WireError as exc:
        if not exc.unsupported:
            raise DecodeError(f"not an AMQP 1.0 message: {exc}") from None
        raw = AMQPMessage()
        try:
            raw.decode(data)
        except Exception as exc:  # noqa: BLE001 - proton raises MessageException, DataException ...
            raise DecodeError(f"not an AMQP 1.0 message: {exc}") from None
        return raw


def _text(value: Any) -> str:
    return str(value) if not isinstance(value, bytes) else value.decode("utf-8", "replace")


def message_id(raw: AMQPMessage) -> str:
    """The best id of a received message for logs: the ``id`` header, else the message id."""
    app: dict[str, Any] = raw.properties if isinstance(raw.properties, dict) else {}
    return str(app.get("id") or raw.id or raw.correlation_id or "<no id>")


def decode(raw: AMQPMessage) -> Message:
    """Turn a received AMQP 1.0 message into a :class:`Message`.

    Raises ``DecodeError`` for a body or properties Celeriac cannot use.
    """
    body = raw.body
    if body is None:
        data = b""
    elif isinstance(body, bytes):
        data = body
    elif isinstance(body, memoryview | bytearray):
        data = bytes(body)
    elif isinstance(body, str):
        data = body.encode("utf-8")
    else:
        raise DecodeError(f"the body is an AMQP value of type {type(body).__name__}, not data or text")
    headers: dict[str, Any] = {}
    blob: Any = None
    received: dict[Any, Any] = raw.properties or {}
    for key, value in received.items():
        if not isinstance(key, str):
            raise DecodeError(f"application property key {key!r} is not a string")
        if key == JSON_PROPERTY:
            blob = value
        else:
            headers[key] = str(value) if isinstance(value, symbol) else value
    props: dict[str, Any] = {}
    if raw.correlation_id is not None:
        props["correlation_id"] = _text(raw.correlation_id)
    if raw.reply_to is not None:
        props["reply_to"] = _text(raw.reply_to)
    if raw.id is not None:
        props["message_id"] = _text(raw.id)
    props["delivery_mode"] = 2 if raw.durable else 1
    if blob is None:
        if raw.priority is not None and raw.priority != 4:
            props["priority"] = raw.priority
        if raw.ttl:
            props["expiration"] = str(int(raw.ttl * 1000))
        if raw.creation_time:
            props["timestamp"] = int(raw.creation_time)
    else:
        try:
            extra = json.loads(blob)
            headers.update(extra["h"])
            props.update(extra["p"])
        except (TypeError, ValueError, KeyError) as exc:
            raise DecodeError(f"the {JSON_PROPERTY} property cannot be read: {exc!r}") from None
    content_type = str(raw.content_type) if raw.content_type else "application/data"
    encoding = str(raw.content_encoding) if raw.content_encoding else (
        "utf-8" if isinstance(body, str) else "binary")
    return Message(headers, props, data, content_type, encoding)
