"""Protocol v2 messages compared with the real Celery's, and decoding of Celery's messages."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from typing import Any

import pytest

from celeriac.exceptions import ContentDisallowed, DecodeError, InvalidMessage
from celeriac.protocol import Message, decode_task, encode_task
from celeriac.serialization import AcceptPolicy, json_dumps, json_loads

celery = pytest.importorskip("celery", reason="the real celery package is a test-only dependency")


@pytest.fixture(scope="module")
def celery_app() -> Any:
    app = celery.Celery("proj", broker="memory://", set_as_current=False)

    @app.task(name="proj.add")
    def add(x: int, y: int) -> int:
        return x + y

    return app


def _celery_sent(celery_app: Any, **options: Any) -> Any:
    """Publish with Celery through kombu's in-memory transport and read the raw message back."""
    with celery_app.connection() as conn:
        queue = conn.SimpleQueue("celery")
        queue.clear()
        celery_app.tasks["proj.add"].apply_async((2, 2), connection=conn, **options)
        message = queue.get(timeout=5)
        message.ack()
        queue.close()
    return message


def _celeriac_message(**kwargs: Any) -> Message:
    from celeriac import Celeriac

    app = Celeriac("proj", broker="memory://protocol-test")

    @app.task(name="proj.add")
    def add(x: int, y: int) -> int:
        return x + y

    sent: list[Message] = []
    broker = app.broker
    broker.publish = lambda message, *args, **kw: sent.append(message)  # type: ignore[method-assign]
    add.apply_async((2, 2), **kwargs)
    app.close()
    return sent[0]


@pytest.mark.parametrize("options", [{}, {"countdown": 10, "expires": 60}, {"priority": 5}])
def test_same_headers_properties_and_body_as_celery(celery_app: Any, options: dict[str, Any]) -> None:
    theirs = _celery_sent(celery_app, **options)
    ours = _celeriac_message(**options)
    assert set(ours.headers) == set(theirs.headers)
    for key in ("lang", "task", "shadow", "group", "group_index", "retries", "timelimit",
                "parent_id", "argsrepr", "kwargsrepr", "ignore_result", "replaced_task_nesting",
                "stamped_headers", "stamps"):
        assert ours.headers[key] == theirs.headers[key], key
    for key in ("eta", "expires"):
        assert (ours.headers[key] is None) == (theirs.headers[key] is None)
        if ours.headers[key]:
            assert ours.headers[key].endswith("+00:00")
    assert ours.headers["root_id"] == ours.headers["id"]
    assert ours.properties["correlation_id"] == ours.headers["id"]
    transport_only = ("delivery_info", "delivery_tag", "body_encoding")
    theirs_props = {k: v for k, v in theirs.properties.items() if k not in transport_only}
    assert set(theirs_props) <= set(ours.properties) | {"content_type", "content_encoding"}
    assert ours.properties["delivery_mode"] == theirs_props["delivery_mode"]
    assert ours.properties["priority"] == theirs_props["priority"]
    assert ours.properties["reply_to"]
    assert ours.content_type == theirs.content_type == "application/json"
    assert json_loads(ours.body) == theirs.decode()
    assert json_loads(ours.body) == [[2, 2], {}, {"callbacks": None, "errbacks": None,
                                                  "chain": None, "chord": None}]


def test_decodes_celery_messages(celery_app: Any) -> None:
    from kombu.serialization import dumps

    signature = celery_app.tasks["proj.add"].s(10)
    task_message = celery_app.amqp.as_task_v2(
        str(uuid.uuid4()), "proj.add", args=(2, 2), kwargs={"z": 1}, countdown=5,
        callbacks=[signature], chain=[celery_app.tasks["proj.add"].s(1)])
    content_type, encoding, body = dumps(task_message.body, serializer="json")
    decoded = decode_task(Message(task_message.headers, task_message.properties, body,
                                  content_type, encoding), AcceptPolicy(["json"]))
    assert decoded.name == "proj.add" and decoded.args == [2, 2] and decoded.kwargs == {"z": 1}
    assert decoded.embed["callbacks"][0]["task"] == "proj.add"
    assert decoded.embed["chain"][0]["args"] == [1]
    assert decoded.headers["eta"] == task_message.headers["eta"]


def test_decodes_protocol_v1(celery_app: Any) -> None:
    from kombu.serialization import dumps

    v1 = celery_app.amqp.as_task_v1("tid-1", "proj.add", args=(1, 2), kwargs={}, countdown=3)
    content_type, encoding, body = dumps(v1.body, serializer="json")
    decoded = decode_task(Message(v1.headers, v1.properties, body, content_type, encoding), None)
    assert (decoded.id, decoded.name, decoded.args) == ("tid-1", "proj.add", [1, 2])
    assert decoded.headers["eta"]


def test_signature_dicts_match_celery(celery_app: Any) -> None:
    from celeriac import Celeriac, chain, chord

    app = Celeriac("proj", broker="memory://sig-test")

    @app.task(name="proj.add")
    def add(x: int, y: int = 0) -> int:
        return x + y

    theirs = celery_app.tasks["proj.add"]
    assert json_loads(json_dumps(add.s(2, 2))) == json_loads(json_dumps(dict(theirs.s(2, 2))))
    assert set(chain(add.s(1), add.s(2))) == set(dict(celery.chain(theirs.s(1), theirs.s(2))))
    ours_chord = json_loads(json_dumps(chord([add.s(1, 1)], add.s())))
    assert ours_chord["task"] == "celery.chord" and set(ours_chord["kwargs"]) == {"kwargs", "header", "body"}
    # Celery's signature dicts are read back as the right canvas types
    from celeriac.canvas import Signature, _chain

    restored = Signature.from_dict(json_loads(json_dumps(dict(celery.chain(theirs.s(1), theirs.s(2))))), app)
    assert isinstance(restored, _chain) and [t.name for t in restored.tasks] == ["proj.add", "proj.add"]


def test_kombu_json_types_round_trip() -> None:
    from kombu.utils.json import dumps as kombu_dumps
    from kombu.utils.json import loads as kombu_loads

    value = {"when": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc), "id": uuid.uuid4(),
             "amount": decimal.Decimal("1.25"), "raw": b"bytes", "day": dt.date(2026, 1, 2)}
    assert json_loads(json_dumps(value)) == value
    assert kombu_loads(json_dumps(value).decode()) == value
    assert json_loads(kombu_dumps(value)) == value


def test_decode_refuses_what_it_must() -> None:
    good = encode_task("t", "id1", [1], {})
    with pytest.raises(ContentDisallowed, match="accept_content"):
        decode_task(encode_task("t", "id2", [1], {}, serializer="pickle"), AcceptPolicy(["json"]))
    with pytest.raises(DecodeError):
        decode_task(Message({"task": "t", "id": "x"}, {}, b"{oops"), AcceptPolicy(["json"]))
    with pytest.raises(InvalidMessage):
        decode_task(Message({}, {}, b"[1, 2, 3]"), AcceptPolicy(["json"]))
    assert decode_task(good, AcceptPolicy(["application/json"])).args == [1]


def test_argsrepr_of_large_arguments_is_the_cut_repr() -> None:
    from celeriac.protocol import ARGSREPR_MAXSIZE, encode_task

    big = "x" * 1_000_000
    cases = [
        ((big,), {}),
        ((1, [big, b"y" * 5000], {"k": big}), {"data": big, "n": 1}),
        (({"a": ("z" * 3000, 2)},), {"deep": [[["q" * 2000]]]}),
        ((1, 2), {}),
    ]
    for args, kwargs in cases:
        headers = encode_task("t", "id", args, kwargs).headers
        assert headers["argsrepr"] == repr(tuple(args))[:ARGSREPR_MAXSIZE]
        assert headers["kwargsrepr"] == repr(kwargs)[:ARGSREPR_MAXSIZE]
