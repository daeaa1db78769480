"""The backend conformance kit for rpc:// over the live RabbitMQ."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from celeriac.testing.backend_kit import BackendConformance

from celeriac_rpc import RPCBackend
from celeriac_rpc.chord import PREFIX


class TestRPCConformance(BackendConformance):
    """rpc:// declares push and chords (not persistent, no groups)."""

    @pytest.fixture
    def backend(self, amqp_url: str) -> Iterator[RPCBackend]:
        b = _TrackingRPCBackend("rpc://", {"broker_url": amqp_url})
        yield b
        for group_id in b.chords_started:  # the kit's chords leave their token queues
            b.broker.delete_queue(PREFIX + group_id + ".token")
            b.broker.delete_queue(PREFIX + group_id)
        b.close()


class _TrackingRPCBackend(RPCBackend):
    """Remembers the chords it started, so the test can delete their queues."""

    def __init__(self, url: str, conf: dict[str, object]) -> None:
        super().__init__(url, conf)
        self.chords_started: list[str] = []

    def set_chord_size(self, group_id: str, size: int) -> None:
        self.chords_started.append(group_id)
        super().set_chord_size(group_id, size)
