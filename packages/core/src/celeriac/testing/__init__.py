"""Testing helpers: the pytest plugin (fixtures ``celeriac_app``, ``celeriac_worker``), the
broker/backend conformance kits (:mod:`celeriac.testing.broker_kit`,
:mod:`celeriac.testing.backend_kit`) that every broker and backend package runs, the green-pool
kit (:mod:`celeriac.testing.green_kit`, with :mod:`celeriac.testing.green_tutorial`) the gevent
and eventlet pools run, and certificates for TLS tests (:mod:`celeriac.testing.tls`).
"""
