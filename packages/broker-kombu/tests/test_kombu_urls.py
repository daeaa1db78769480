"""URLs and bad input: which transport a URL names, the one-line errors, capabilities from kombu."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from celeriac.broker.base import BROADCAST, QUEUE_SIZE, REPLY_QUEUES
from celeriac.exceptions import ImproperlyConfigured, PluginNotFound
from celeriac.plugins import create_broker
from celeriac_kombu import KombuBroker, MissingClientLibrary, UnknownTransport, capabilities_of
from celeriac_kombu.broker import topic_matches
from celeriac_kombu.transports import kombu_url, resolve, transport_alias


def test_kombu_url_strips_the_prefix() -> None:
    assert kombu_url("kombu+sqs://key:secret@") == "sqs://key:secret@"
    assert kombu_url("KOMBU+filesystem://") == "filesystem://"
    assert kombu_url("sqla+postgresql://u@h/db") == "sqla+postgresql://u@h/db"
    assert transport_alias("sqla+postgresql+psycopg://u@h/db") == "sqla"


@pytest.mark.parametrize("url", ["kombu+://", "kombu+"])
def test_a_prefix_without_transport_is_one_clear_error(url: str) -> None:
    with pytest.raises(UnknownTransport, match="names no kombu transport"):
        KombuBroker(url, {})


def test_unknown_transport_lists_kombus_transports() -> None:
    with pytest.raises(UnknownTransport) as info:
        create_broker("kombu+nosuch://host/", {})
    message = str(info.value)
    assert "\n" not in message
    assert "'nosuch'" in message and "filesystem" in message and "sqs" in message


def test_missing_client_library_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name.split(".")[0] in ("boto3", "kazoo") else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(MissingClientLibrary) as info:
        create_broker("kombu+sqs://", {})
    assert "boto3" in str(info.value) and 'pip install "celeriac-kombu[sqs]"' in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(ImproperlyConfigured, match=r"kazoo.*celeriac-kombu\[zookeeper\]"):
        create_broker("zookeeper://localhost:2181/", {})


def test_schemes_reach_the_bridge_through_the_plugin_manager(tmp_path: Path) -> None:
    for url in ("kombu+sqla+postgresql+psycopg://u@127.0.0.1/db", "sqla+mysql://u@h/db",
                f"kombu+filesystem://{tmp_path}", f"filesystem://{tmp_path}", "kombu+memory://"):
        broker = create_broker(url, {})
        assert isinstance(broker, KombuBroker), url
        broker.close()


def test_a_scheme_nobody_claims_names_celeriac_kombu_for_kombu_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERIAC_DISABLED_PLUGINS", "kombu")
    from celeriac.plugins import manager

    manager.reset()
    try:
        with pytest.raises(PluginNotFound, match="pip install celeriac-kombu"):
            create_broker("kombu+sqs://", {})
    finally:
        monkeypatch.delenv("CELERIAC_DISABLED_PLUGINS")
        manager.reset()


def test_filesystem_url_path_fills_the_folders(tmp_path: Path) -> None:
    broker = KombuBroker(f"kombu+filesystem://{tmp_path}/spool", {})
    assert broker.transport_options["data_folder_in"] == str(tmp_path / "spool" / "data")
    assert (tmp_path / "spool" / "control").is_dir()
    options = {"data_folder_in": str(tmp_path / "in"), "data_folder_out": str(tmp_path / "in"),
               "control_folder": str(tmp_path / "ctl")}
    broker = KombuBroker("kombu+filesystem://", {"broker_transport_options": options})
    assert broker.transport_options == options
    assert (tmp_path / "in").is_dir()


def test_capabilities_come_from_kombu() -> None:
    assert capabilities_of(resolve("filesystem://")) == {BROADCAST, QUEUE_SIZE, REPLY_QUEUES}
    assert capabilities_of(resolve("memory://")) == {BROADCAST, QUEUE_SIZE, REPLY_QUEUES}
    assert capabilities_of(resolve("amqp://")) == {BROADCAST, QUEUE_SIZE, REPLY_QUEUES}
    from kombu.transport import resolve_transport

    assert BROADCAST not in capabilities_of(resolve_transport("etcd"))  # direct exchanges only


def test_transport_options_reach_kombu(tmp_path: Path) -> None:
    broker = KombuBroker("kombu+memory://", {"broker_transport_options": {"polling_interval": 0.5,
                                                                         "visibility_timeout": 7}})
    connection, staging = broker.new_connection()
    assert staging is None
    assert connection.transport_options == {"polling_interval": 0.5, "visibility_timeout": 7}
    assert connection.transport.polling_interval == 0.5
    connection.release()


def test_polling_interval_is_not_handed_to_create_engine() -> None:
    pytest.importorskip("sqlalchemy")
    broker = KombuBroker("kombu+sqla+sqlite://", {"broker_transport_options": {"polling_interval": 0.3,
                                                                              "echo": False}})
    connection, _ = broker.new_connection()
    assert connection.transport_options == {"echo": False}
    assert connection.transport.polling_interval == 0.3
    connection.release()


@pytest.mark.parametrize(("pattern", "key", "hit"), [
    ("#", "worker.heartbeat", True), ("worker.*", "worker.heartbeat", True),
    ("worker.*", "task.sent", False), ("task.#", "task", True), ("*", "", False),
    ("a.#.z", "a.b.c.z", True), ("", "", True),
])
def test_topic_matches(pattern: str, key: str, hit: bool) -> None:
    assert topic_matches(pattern, key) is hit
