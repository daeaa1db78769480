"""Brokers: the SPI in :mod:`celeriac.broker.base`, built-ins ``memory://`` and ``sqlite://``."""
