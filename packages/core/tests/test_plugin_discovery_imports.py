"""Discovering the installed plugins imports none of their client libraries (start-up time)."""

from __future__ import annotations

import subprocess
import sys

_PROBE = """
import sys
from celeriac.plugins.manager import available_pools, plugin_infos
plugin_infos(); available_pools()
heavy = ("pika", "redis", "proton", "kombu", "celeriac_amqp.broker", "celeriac_redis.backend",
         "celeriac_redis.broker", "celeriac_qpid.broker", "celeriac_rpc.backend")
print(",".join(sorted(name for name in heavy if name in sys.modules)))
"""


def test_discovery_does_not_import_client_libraries() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_the_plugin_packages_still_export_their_classes() -> None:
    import importlib

    for package, name in (("celeriac_amqp", "AMQPBroker"), ("celeriac_redis", "RedisBroker"),
                          ("celeriac_redis", "RedisBackend"), ("celeriac_rpc", "RPCBackend"),
                          ("celeriac_prefork", "PreforkPool")):
        try:
            module = importlib.import_module(package)
        except ImportError:
            continue  # that plugin is not installed in this environment
        assert getattr(module, name).__name__ == name
