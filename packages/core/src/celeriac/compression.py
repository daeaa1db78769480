"""Compressed task bodies, as Celery sends them with ``task_compression`` or ``compression=``.

A compressed task message carries the compressor's content type in its ``compression`` header
and the compressed serialized body (``celery-wire.md``, message headers). The names and content
types are Celery's (kombu's registry): ``gzip``/``zlib`` -> ``application/x-gzip`` (a zlib
stream, not a gzip file), ``bzip2``/``bzip`` -> ``application/x-bz2``, ``lzma``/``xz`` ->
``application/x-lzma``, ``brotli`` -> ``application/x-brotli``, ``zstd``/``zstandard`` ->
``application/zstd``. The first three come with Python; brotli and zstd need the ``brotli`` and
``zstandard`` packages, imported only when such a body is met.
"""

from __future__ import annotations

import bz2
import importlib
import lzma
import zlib
from collections.abc import Callable

from celeriac.exceptions import DecodeError, ImproperlyConfigured

__all__ = ["compress", "content_type_for", "decompress"]

_Codec = tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]

_ALIASES = {
    "gzip": "application/x-gzip", "zlib": "application/x-gzip",
    "bzip2": "application/x-bz2", "bzip": "application/x-bz2",
    "lzma": "application/x-lzma", "xz": "application/x-lzma",
    "brotli": "application/x-brotli",
    "zstd": "application/zstd", "zstandard": "application/zstd",
}
#: content type -> the package that provides it, for the optional ones.
_OPTIONAL = {"application/x-brotli": "brotli", "application/zstd": "zstandard"}


def _codec(content_type: str) -> _Codec:
    if content_type == "application/x-gzip":
        return zlib.compress, zlib.decompress
    if content_type == "application/x-bz2":
        return bz2.compress, bz2.decompress
    if content_type == "application/x-lzma":
        return lzma.compress, lzma.decompress
    package = _OPTIONAL.get(content_type)
    if package is None:
        raise KeyError(content_type)
    module = importlib.import_module(package)  # ImportError when not installed
    if package == "brotli":
        return module.compress, module.decompress
    return module.ZstdCompressor().compress, module.ZstdDecompressor().decompressobj().decompress


def content_type_for(name: str) -> str:
    """The content type of compression ``name`` (``"gzip"``, or a content type itself).

    Raises ``ImproperlyConfigured`` for an unknown name, saying which are known."""
    content_type = _ALIASES.get(name, name)
    if content_type not in set(_ALIASES.values()):
        raise ImproperlyConfigured(f"Unknown compression {name!r}: use one of {', '.join(sorted(_ALIASES))}.")
    return content_type


def compress(body: bytes, name: str) -> tuple[str, bytes]:
    """Compress ``body`` with ``name`` (``"gzip"``, ``"bzip2"``, ... or a content type); return
    ``(content type for the compression header, compressed bytes)``.

    Raises ``ImproperlyConfigured`` for an unknown name, or a known one whose package is missing."""
    content_type = content_type_for(name)
    try:
        encoder, _ = _codec(content_type)
    except ImportError as exc:
        raise ImproperlyConfigured(f"Compression {name!r} needs the {_OPTIONAL[content_type]!r} package: "
                                   f"pip install {_OPTIONAL[content_type]}.") from exc
    return content_type, encoder(body)


def decompress(body: bytes, content_type: str) -> bytes:
    """Decompress a body whose ``compression`` header is ``content_type`` (or an alias).

    Raises ``DecodeError`` for an unknown compression, a missing optional package or a body that
    does not decompress: the worker rejects such a message and logs why."""
    resolved = _ALIASES.get(content_type, content_type)
    try:
        _, decoder = _codec(resolved)
    except KeyError:
        raise DecodeError(f"Unknown compression {content_type!r} in the message headers.") from None
    except ImportError as exc:
        raise DecodeError(f"The message is compressed with {content_type!r}: pip install "
                          f"{_OPTIONAL[resolved]} to read it.") from exc
    try:
        return decoder(body)
    except Exception as exc:
        raise DecodeError(f"Could not decompress a {content_type} body: {exc}") from exc
