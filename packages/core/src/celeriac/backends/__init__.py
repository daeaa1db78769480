"""Result backends: the SPI in :mod:`celeriac.backends.base`, built-ins ``memory``, ``sqlite``."""
