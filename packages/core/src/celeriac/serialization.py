"""Serializers and the ``accept_content`` whitelist.

JSON is the default and follows kombu's wire encoding: values JSON cannot hold travel as
``{"__type__": T, "__value__": V}`` (datetime, date, time, decimal, uuid, bytes), and objects with
``__json__()`` serialize as what it returns. Pickle exists but is refused unless ``accept_content``
names it. ``auth`` (signed messages, content type ``application/data``) is registered by
:func:`celeriac.security.setup_security`.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import pickle
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from celeriac.exceptions import ContentDisallowed, DecodeError

__all__ = [
    "AcceptPolicy",
    "Serializer",
    "dumps",
    "get_serializer",
    "json_dumps",
    "json_loads",
    "loads",
    "register",
    "serializer_for_content_type",
]


@dataclass(frozen=True, slots=True)
class Serializer:
    """A named codec: ``dumps(obj) -> bytes`` and ``loads(bytes) -> obj``."""

    name: str
    content_type: str
    content_encoding: str
    dumps: Callable[[Any], bytes]
    loads: Callable[[bytes], Any]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, dt.datetime):
        return {"__type__": "datetime", "__value__": obj.isoformat()}
    if isinstance(obj, dt.date):
        return {"__type__": "date", "__value__": obj.isoformat()}
    if isinstance(obj, dt.time):
        return {"__type__": "time", "__value__": obj.isoformat()}
    if isinstance(obj, decimal.Decimal):
        return {"__type__": "decimal", "__value__": str(obj)}
    if isinstance(obj, uuid.UUID):
        return {"__type__": "uuid", "__value__": {"hex": obj.hex}}
    if isinstance(obj, bytes):
        try:
            return {"__type__": "bytes", "__value__": obj.decode("utf-8")}
        except UnicodeDecodeError:
            return {"__type__": "base64", "__value__": base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    json_method = getattr(obj, "__json__", None)
    if json_method is not None:
        return json_method()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


_DECODERS: dict[str, Callable[[Any], Any]] = {
    "datetime": dt.datetime.fromisoformat,
    "date": dt.date.fromisoformat,
    "time": dt.time.fromisoformat,
    "decimal": decimal.Decimal,
    "uuid": lambda v: uuid.UUID(hex=v["hex"] if isinstance(v, dict) else v),
    "bytes": lambda v: v.encode("utf-8"),
    "base64": lambda v: base64.b64decode(v),
}


def _json_object_hook(obj: dict[str, Any]) -> Any:
    type_name = obj.get("__type__")
    if type_name is not None and "__value__" in obj and len(obj) == 2:
        decoder = _DECODERS.get(type_name)
        if decoder is not None:
            return decoder(obj["__value__"])
    return obj


_encoder = json.JSONEncoder(default=_json_default, ensure_ascii=False, separators=(", ", ": "))
_decoder = json.JSONDecoder(object_hook=_json_object_hook)


def json_dumps(obj: Any) -> bytes:
    """Encode ``obj`` as UTF-8 JSON bytes with kombu's type wrappers."""
    return _encoder.encode(obj).encode("utf-8")


def json_loads(data: bytes | str) -> Any:
    """Decode JSON bytes or text, restoring kombu's type wrappers."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data).decode("utf-8")
    return _decoder.decode(data)


def _pickle_dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=4)


_REGISTRY: dict[str, Serializer] = {}
_BY_CONTENT_TYPE: dict[str, Serializer] = {}


def register(serializer: Serializer) -> None:
    """Register a serializer by name and content type (later registrations win)."""
    _REGISTRY[serializer.name] = serializer
    _BY_CONTENT_TYPE[serializer.content_type] = serializer


register(Serializer("json", "application/json", "utf-8", json_dumps, json_loads))
register(Serializer("pickle", "application/x-python-serialize", "binary", _pickle_dumps, pickle.loads))


def get_serializer(name: str) -> Serializer:
    """Return the serializer called ``name`` or raise a ``ValueError`` that lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(
            f"Unknown serializer {name!r}. Known serializers: {known}. "
            "Install a plugin that provides it or pick one of these."
        ) from None


def serializer_for_content_type(content_type: str) -> Serializer | None:
    """Return the serializer registered for ``content_type``, or None."""
    return _BY_CONTENT_TYPE.get(content_type)


class AcceptPolicy:
    """The set of content types a consumer accepts, built from ``accept_content``.

    Entries may be serializer names (``json``) or content types (``application/json``).
    """

    __slots__ = ("content_types",)

    def __init__(self, accept: Iterable[str]) -> None:
        types: set[str] = set()
        for entry in accept:
            if "/" in entry:
                types.add(entry)
            else:
                types.add(get_serializer(entry).content_type)
        self.content_types = frozenset(types)

    def check(self, content_type: str) -> None:
        """Raise ``ContentDisallowed`` when ``content_type`` is not accepted."""
        if content_type not in self.content_types:
            raise ContentDisallowed(
                f"Refusing to deserialize content of type {content_type!r}: it is not in "
                f"accept_content ({', '.join(sorted(self.content_types))}). Add it to "
                "accept_content if you trust every producer on this broker."
            )


def dumps(obj: Any, serializer: str = "json") -> tuple[str, str, bytes]:
    """Serialize ``obj``; return ``(content_type, content_encoding, body)``."""
    codec = get_serializer(serializer)
    return codec.content_type, codec.content_encoding, codec.dumps(obj)


def loads(body: bytes, content_type: str, accept: AcceptPolicy | None = None) -> Any:
    """Deserialize ``body`` of ``content_type`` after checking it against ``accept``."""
    if accept is not None:
        accept.check(content_type)
    codec = _BY_CONTENT_TYPE.get(content_type)
    if codec is None:
        raise ContentDisallowed(f"No serializer is registered for content type {content_type!r}.")
    try:
        return codec.loads(body)
    except DecodeError:  # a codec's own reason (the auth serializer's) is clear as it is
        raise
    except Exception as exc:
        raise DecodeError(f"Could not decode a {content_type} body: {exc}") from exc
