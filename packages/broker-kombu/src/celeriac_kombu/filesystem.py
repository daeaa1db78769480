"""kombu's filesystem transport with a reader that never takes a message file half-written.

kombu's publisher (Celery's client and worker use it unchanged) creates a message file in the
data folder, locks it (``flock``, exclusive), writes it and unlocks it. kombu's reader does not
look at the lock: listing the folder between the create and the write, it moves the empty file
away, fails to decode it, and raises out of ``drain_events``. The message is lost, and the
consumer's connection is dropped, which hands its unacked deliveries back to the queue: tasks
already run are delivered again.

:class:`Transport` reads the same files in the same order, but

* skips a file that is empty or that a writer still holds locked (it is taken on a later poll);
* claims a file by renaming it within the data folder (one atomic step: of several readers,
  one gets it), so it never copies a file across filesystems as kombu's move to the temporary
  folder may;
* sets a file whose content is not a kombu message aside as ``<name>.bad`` in the data folder,
  logged with its path, instead of raising: one corrupt file costs no other message.

Everything else (writing, fanout through the control folder, ``store_processed``) is kombu's.
"""

from __future__ import annotations

import logging
import os
import uuid
from queue import Empty
from typing import Any

from kombu.transport import filesystem
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: kombu locks with win32 calls there
    fcntl = None  # type: ignore[assignment]

__all__ = ["Channel", "Transport", "is_complete"]

logger = logging.getLogger("celeriac.kombu")

#: Suffix of a message file that could not be decoded (it no longer matches a queue's pattern).
BAD_SUFFIX = ".bad"


def is_complete(path: str) -> bool:
    """True when the message file at ``path`` has content and no writer holds its lock.

    kombu writes a file with one ``write`` while it holds an exclusive ``flock``: an empty file
    is not written yet, a locked one is being written. False as well when the file is gone.
    """
    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                return False
            if fcntl is None:  # pragma: no cover
                return True
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            return True
    except OSError:
        return False


class Channel(filesystem.Channel):
    """kombu's filesystem channel with the reader described in the module docstring."""

    def _get(self, queue: str) -> Any:
        wanted = f"{queue}.msg"
        folder = self.data_folder_in
        for name in sorted(os.listdir(folder)):
            if name.partition(".")[2] != wanted:
                continue
            path = os.path.join(folder, name)
            if not is_complete(path):
                continue
            claimed = f"{path}.{uuid.uuid4().hex}.claimed"
            try:
                os.rename(path, claimed)
            except OSError:  # another reader took it first
                continue
            with open(claimed, "rb") as handle:
                payload = handle.read()
            try:
                message = loads(bytes_to_str(payload))
            except Exception as exc:
                os.replace(claimed, path + BAD_SUFFIX)
                logger.error("kombu filesystem transport: the message file %s is not a kombu message "
                             "(%s: %s); it was set aside as %s%s.", path, type(exc).__name__, exc, path,
                             BAD_SUFFIX)
                continue
            if self.store_processed:
                os.replace(claimed, os.path.join(self.processed_folder, name))
            else:
                os.remove(claimed)
            return message
        raise Empty()


class Transport(filesystem.Transport):
    """kombu's filesystem transport with :class:`Channel`'s safe reader."""

    Channel = Channel
