"""Compressed task bodies (Celery's ``compression`` header), without a broker."""

from __future__ import annotations

import zlib

import pytest

from celeriac.compression import compress, content_type_for, decompress
from celeriac.exceptions import ContentDisallowed, DecodeError, ImproperlyConfigured
from celeriac.protocol import decode_task, encode_task
from celeriac.serialization import AcceptPolicy


@pytest.mark.parametrize(("name", "content_type"), [("gzip", "application/x-gzip"), ("zlib", "application/x-gzip"),
                                                    ("bzip2", "application/x-bz2"), ("xz", "application/x-lzma")])
def test_a_compressed_task_message_decodes_to_the_same_task(name: str, content_type: str) -> None:
    message = encode_task("t.add", "id-1", [2, "x" * 1000], {"k": 1}, compression=name)
    assert message.headers["compression"] == content_type
    assert len(message.body) < 1000  # compressed
    task = decode_task(message, AcceptPolicy(["json"]))
    assert (task.args, task.kwargs) == ([2, "x" * 1000], {"k": 1})


def test_gzip_is_a_zlib_stream_as_celery_sends_it() -> None:
    content_type, body = compress(b'[[1], {}, {}]', "gzip")
    assert content_type == "application/x-gzip" and zlib.decompress(body) == b'[[1], {}, {}]'


def test_bad_compression_is_a_decode_error_the_worker_rejects() -> None:
    message = encode_task("t.add", "id-2", [1], {}, compression="gzip")
    message.body = b"not zlib"
    with pytest.raises(DecodeError, match="decompress"):
        decode_task(message, AcceptPolicy(["json"]))
    message.headers["compression"] = "application/x-snappy"
    with pytest.raises(DecodeError, match="Unknown compression"):
        decode_task(message, AcceptPolicy(["json"]))


def test_a_forbidden_content_type_is_refused_before_decompressing() -> None:
    message = encode_task("t.add", "id-3", [1], {}, compression="gzip")
    message.content_type = "application/x-python-serialize"
    with pytest.raises(ContentDisallowed):
        decode_task(message, AcceptPolicy(["json"]))


def test_unknown_compression_names_are_configuration_errors() -> None:
    with pytest.raises(ImproperlyConfigured, match="Unknown compression 'snappy'"):
        content_type_for("snappy")
    assert decompress(compress(b"abc", "lzma")[1], "application/x-lzma") == b"abc"
