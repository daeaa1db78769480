"""Testing helpers: the pytest plugin (fixtures ``celeriac_app``, ``celeriac_worker``) and the
broker/backend conformance kits (:mod:`celeriac.testing.broker_kit`,
:mod:`celeriac.testing.backend_kit`) that every broker and backend package runs.
"""
