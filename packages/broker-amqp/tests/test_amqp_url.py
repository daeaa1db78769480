"""URL parsing as Celery does it (pure logic)."""

from __future__ import annotations

import pytest
from celeriac.broker.base import mask_url
from celeriac.routing import Queue

from celeriac_amqp.delay import MAX_DELAY_MS, entry_exchange, routing_key
from celeriac_amqp.link import queue_arguments
from celeriac_amqp.url import connection_parameters, parse_url


@pytest.mark.parametrize(("url", "host", "port", "user", "password", "vhost"), [
    ("amqp://guest@localhost:5672//", "localhost", 5672, "guest", "guest", "/"),
    ("amqp://u:p@h:5673/vh", "h", 5673, "u", "p", "vh"),
    ("amqp://", "localhost", 5672, "guest", "guest", "/"),
    ("amqp://h", "h", 5672, "guest", "guest", "/"),
    ("amqp://h/", "h", 5672, "guest", "guest", "/"),
    ("pyamqp://u:p%40ss@h//", "h", 5672, "u", "p@ss", "/"),
    ("amqp://h/%2Fprod", "h", 5672, "guest", "guest", "/prod"),
    ("amqps://u:p@secure.example", "secure.example", 5671, "u", "p", "/"),
])
def test_parse_like_celery(url: str, host: str, port: int, user: str, password: str,
                           vhost: str) -> None:
    (address,) = parse_url(url)
    assert (address.host, address.port, address.user, address.password, address.vhost) == (
        host, port, user, password, vhost)


def test_failover_urls_and_tls() -> None:
    first, second = parse_url("amqp://a//;amqps://b/v")
    assert (first.host, first.tls) == ("a", False)
    assert (second.host, second.tls, second.vhost) == ("b", True, "v")
    params = connection_parameters(second, {"broker_heartbeat": 30})
    assert params.ssl_options is not None
    assert params.heartbeat == 30
    assert params.virtual_host == "v"


def test_not_amqp_is_an_error() -> None:
    with pytest.raises(ValueError, match="Not an AMQP URL"):
        parse_url("redis://localhost")


def test_password_is_masked() -> None:
    assert mask_url("amqp://u:secret@h:5672/vh") == "amqp://u:**@h:5672/vh"


def test_queue_arguments_like_kombu() -> None:
    queue = Queue("q", message_ttl=5, expires=60, max_priority=10, queue_arguments={"x-a": 1})
    assert queue_arguments(queue, {}) == {"x-message-ttl": 5000, "x-expires": 60000,
                                          "x-max-priority": 10, "x-a": 1}
    assert queue_arguments(Queue("celery"), {"task_default_queue_type": "quorum"}) == {
        "x-queue-type": "quorum"}
    assert queue_arguments(Queue("q"), {"task_queue_max_priority": 5}) == {"x-max-priority": 5}


def test_delay_routing_key_is_binary_milliseconds() -> None:
    assert routing_key(5) == ".".join("0" * 29 + "101")
    assert len(routing_key(MAX_DELAY_MS + 10).split(".")) == 32
    assert entry_exchange(5) == "celeriac.delay.2"
    assert entry_exchange(1) == "celeriac.delay.0"
