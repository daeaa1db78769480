"""Celery message protocol v2: encode task messages, decode v1, v2 and the hybrid form.

A :class:`Message` is what a broker moves: headers, properties and body bytes. Brokers never look
inside the body; the worker decodes it with :func:`decode_task`.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any

from celeriac.compression import compress, decompress
from celeriac.exceptions import InvalidMessage
from celeriac.serialization import AcceptPolicy, get_serializer, loads

__all__ = [
    "EMPTY_EMBED", "STANDARD_HEADERS", "Message", "TaskMessage", "decode_task", "default_origin",
    "encode_task", "parse_iso8601", "to_timestamp",
]

ARGSREPR_MAXSIZE = 1024
#: Header keys protocol v2 defines; anything else in a message's headers is a user header.
STANDARD_HEADERS = frozenset({
    "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries",
    "timelimit", "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin", "ignore_result",
    "replaced_task_nesting", "stamped_headers", "stamps", "redelivered", "x-death", "compression",
})
EMPTY_EMBED: dict[str, Any] = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}

# ISO 8601 as task senders write it: date, then optionally 'T' or ' ' and a time with any number
# of fractional digits, then optionally 'Z' or an offset (+HH:MM, +HHMM, +HH).
_ISO8601 = re.compile(
    r"(?P<y>\d{4})-(?P<mo>\d{2})-(?P<d>\d{2})"
    r"(?:[T ](?P<h>\d{2}):(?P<mi>\d{2})(?::(?P<s>\d{2})(?:[.,](?P<f>\d+))?)?)?"
    r"\s*(?P<tz>[Zz]|[+-]\d{2}(?::?\d{2})?)?"
)


def parse_iso8601(value: str | dt.datetime, naive: dt.tzinfo = dt.timezone.utc) -> dt.datetime:
    """An ISO 8601 time (an ``eta``/``expires`` header, a user's string) as an aware datetime.

    The one parser every Celeriac component uses for header times, on every Python version
    (``datetime.fromisoformat`` only accepts ``Z`` from 3.11). Accepts a trailing ``Z``, offsets
    ``+HH:MM``/``+HHMM``/``+HH``, any number of fractional digits and ``T`` or a space between
    date and time. Naive values are in ``naive`` (UTC, as with Celery's ``enable_utc``).
    Raises ``ValueError`` for anything else.
    """
    if isinstance(value, dt.datetime):
        when = value
    else:
        text = str(value).strip()
        match = _ISO8601.fullmatch(text)
        if match is None:
            raise ValueError(f"Invalid ISO 8601 time: {text!r}.")
        fraction = (match["f"] or "0")[:6].ljust(6, "0")
        tzinfo: dt.tzinfo | None = None
        offset = match["tz"]
        if offset:
            if offset in ("Z", "z"):
                tzinfo = dt.timezone.utc
            else:
                digits = offset[1:].replace(":", "")
                minutes = int(digits[:2]) * 60 + int(digits[2:4] or 0)
                sign = -1 if offset[0] == "-" else 1
                tzinfo = dt.timezone(sign * dt.timedelta(minutes=minutes))
        when = dt.datetime(int(match["y"]), int(match["mo"]), int(match["d"]), int(match["h"] or 0),
                           int(match["mi"] or 0), int(match["s"] or 0), int(fraction), tzinfo)
    if when.tzinfo is None:
        when = when.replace(tzinfo=naive)
    return when


def to_timestamp(value: Any) -> float | None:
    """A header time (ISO 8601 string, datetime, or a Unix timestamp number) as Unix seconds.

    None or empty gives None. Raises ``ValueError`` for a string that is not ISO 8601.
    """
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return parse_iso8601(value).timestamp()


def _shortened(obj: Any, depth: int = 0) -> Any:
    """``obj`` with every str/bytes longer than the repr limit cut just past it (inside tuples,
    lists and dicts, 3 levels deep), so that a large argument is not copied into a repr that
    is cut to 1,024 characters anyway. The cut repr is the same, except that a string's quote
    character is chosen from its first 1,025 characters."""
    if isinstance(obj, (str, bytes, bytearray)):
        return obj[:ARGSREPR_MAXSIZE + 1] if len(obj) > ARGSREPR_MAXSIZE else obj
    if depth >= 3:
        return obj
    if type(obj) is tuple:
        return tuple(_shortened(item, depth + 1) for item in obj)
    if type(obj) is list:
        return [_shortened(item, depth + 1) for item in obj]
    if type(obj) is dict:
        return {key: _shortened(value, depth + 1) for key, value in obj.items()}
    return obj


def _saferepr(obj: Any) -> str:
    """``repr`` cut to Celery's 1024 characters; never raises."""
    try:
        text = repr(_shortened(obj))
    except Exception:  # a user object whose __repr__ fails must not stop the send
        text = f"<unrepresentable {type(obj).__name__}>"
    return text[:ARGSREPR_MAXSIZE]


_ORIGIN: str | None = None


def default_origin() -> str:
    """The sender name Celery writes in ``origin``: ``gen<pid>@<hostname>``."""
    global _ORIGIN
    if _ORIGIN is None or not _ORIGIN.startswith(f"gen{os.getpid()}@"):
        _ORIGIN = f"gen{os.getpid()}@{socket.gethostname()}"
    return _ORIGIN


@dataclass(slots=True)
class Message:
    """One broker message.

    ``headers`` is the AMQP application-headers table (all of Celery's task metadata),
    ``properties`` the AMQP basic properties (``correlation_id``, ``reply_to``, ``delivery_mode``,
    ``priority``, ``expiration``), ``body`` the serialized payload.
    """

    headers: dict[str, Any]
    properties: dict[str, Any]
    body: bytes
    content_type: str = "application/json"
    content_encoding: str = "utf-8"


@dataclass(slots=True)
class TaskMessage:
    """A decoded task message in v2 shape, whatever version it arrived in."""

    headers: dict[str, Any]
    properties: dict[str, Any]
    args: list[Any]
    kwargs: dict[str, Any]
    embed: dict[str, Any] = field(default_factory=lambda: dict(EMPTY_EMBED))

    @property
    def id(self) -> str:
        """The task id."""
        return str(self.headers["id"])

    @property
    def name(self) -> str:
        """The registered task name."""
        return str(self.headers["task"])


def encode_task(
    name: str,
    task_id: str,
    args: list[Any] | tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    serializer: str = "json",
    eta: str | None = None,
    expires: str | None = None,
    expiration_ms: int | None = None,
    group: str | None = None,
    group_index: int | None = None,
    retries: int = 0,
    timelimit: tuple[float | None, float | None] = (None, None),
    root_id: str | None = None,
    parent_id: str | None = None,
    shadow: str | None = None,
    origin: str | None = None,
    ignore_result: bool = False,
    callbacks: list[dict[str, Any]] | None = None,
    errbacks: list[dict[str, Any]] | None = None,
    chain: list[dict[str, Any]] | None = None,
    chord: dict[str, Any] | None = None,
    reply_to: str | None = None,
    priority: int | None = None,
    delivery_mode: int = 2,
    extra_headers: dict[str, Any] | None = None,
    argsrepr: str | None = None,
    kwargsrepr: str | None = None,
    replaced_task_nesting: int = 0,
    stamped_headers: list[str] | None = None,
    stamps: dict[str, Any] | None = None,
    compression: str | None = None,
) -> Message:
    """Build a protocol v2 task message exactly as Celery 5.x lays it out.

    ``compression`` (``"gzip"``, ``"bzip2"``, ... see :mod:`celeriac.compression`) compresses the
    body and names the compressor in the ``compression`` header, as Celery does."""
    if not isinstance(args, (list, tuple)):
        raise TypeError("Task positional arguments must be a list or a tuple.")
    if not isinstance(kwargs, dict):
        raise TypeError("Task keyword arguments must be a dict.")
    headers: dict[str, Any] = {
        "lang": "py",
        "task": name,
        "id": task_id,
        "shadow": shadow,
        "eta": eta,
        "expires": expires,
        "group": group,
        "group_index": group_index,
        "retries": retries,
        "timelimit": [timelimit[0], timelimit[1]],
        "root_id": root_id or task_id,
        "parent_id": parent_id,
        "argsrepr": argsrepr if argsrepr is not None else _saferepr(tuple(args)),
        "kwargsrepr": kwargsrepr if kwargsrepr is not None else _saferepr(kwargs),
        "origin": origin or default_origin(),
        "ignore_result": ignore_result,
        "replaced_task_nesting": replaced_task_nesting,
        "stamped_headers": stamped_headers,
        "stamps": stamps or {},
    }
    if extra_headers:
        headers.update(extra_headers)
    embed = {"callbacks": callbacks, "errbacks": errbacks, "chain": chain, "chord": chord}
    codec = get_serializer(serializer)
    body = codec.dumps([list(args), kwargs, embed])
    if compression:
        headers["compression"], body = compress(body, compression)
    properties: dict[str, Any] = {
        "correlation_id": task_id,
        "reply_to": reply_to,
        "delivery_mode": delivery_mode,
        "priority": priority if priority is not None else 0,
    }
    if expiration_ms is not None:
        properties["expiration"] = str(max(0, expiration_ms))
    return Message(headers, properties, body, codec.content_type, codec.content_encoding)


def _v1_to_v2(payload: dict[str, Any], headers: dict[str, Any], properties: dict[str, Any]) -> TaskMessage:
    try:
        task_id = payload["id"]
        name = payload["task"]
    except KeyError as exc:
        raise InvalidMessage(f"Protocol v1 message lacks the {exc.args[0]!r} field.") from None
    args = payload.get("args") or []
    kwargs = payload.get("kwargs") or {}
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
        raise InvalidMessage(f"Task {task_id}: args must be a list and kwargs an object.")
    timelimit = payload.get("timelimit") or (None, None)
    v2_headers: dict[str, Any] = {
        "lang": "py",
        "task": name,
        "id": task_id,
        "shadow": None,
        "eta": payload.get("eta"),
        "expires": payload.get("expires"),
        "group": payload.get("group") or payload.get("taskset"),
        "group_index": payload.get("group_index"),
        "retries": payload.get("retries", 0),
        "timelimit": list(timelimit),
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": _saferepr(args),
        "kwargsrepr": _saferepr(kwargs),
        "origin": None,
        "ignore_result": False,
    }
    v2_headers.update({k: v for k, v in headers.items() if k not in ("task", "id") or v})
    embed = dict(EMPTY_EMBED)
    embed["callbacks"] = payload.get("callbacks")
    embed["errbacks"] = payload.get("errbacks")
    embed["chord"] = payload.get("chord")
    return TaskMessage(v2_headers, properties, list(args), kwargs, embed)


def decode_task(message: Message, accept: AcceptPolicy | None) -> TaskMessage:
    """Decode a task message of protocol v2, v1 or hybrid form.

    Raises ``ContentDisallowed`` for a content type outside ``accept``, ``DecodeError`` for a
    body that cannot be parsed and ``InvalidMessage`` when the parts are not a task.
    """
    headers = message.headers if isinstance(message.headers, dict) else {}
    body = message.body
    if headers.get("compression"):
        if accept is not None:  # refuse a forbidden content type before decompressing anything
            accept.check(message.content_type)
        body = decompress(body, str(headers["compression"]))
    payload = loads(body, message.content_type, accept)
    if headers.get("task") and headers.get("id"):
        if not isinstance(payload, (list, tuple)) or len(payload) != 3:
            if isinstance(payload, dict) and "args" in payload:
                return _v1_to_v2({**payload, "task": headers["task"], "id": headers["id"]},
                                 headers, message.properties)
            raise InvalidMessage(
                f"Task {headers.get('id')}: a v2 body must be [args, kwargs, embed], "
                f"got {type(payload).__name__}."
            )
        args, kwargs, embed = payload
        if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
            raise InvalidMessage(f"Task {headers['id']}: args must be a list and kwargs an object.")
        if not isinstance(embed, dict):
            embed = dict(EMPTY_EMBED)
        return TaskMessage(headers, message.properties, list(args), kwargs, embed)
    if isinstance(payload, dict) and "task" in payload:
        return _v1_to_v2(payload, headers, message.properties)
    raise InvalidMessage(
        f"Message {headers.get('id') or message.properties.get('correlation_id')} is not a task "
        "message: it has no 'task' header (protocol v2) and no 'task' field in its body (v1)."
    )
