"""``memory://``: results kept in this process, shared by every MemoryBackend of the same URL.

For tests and single-process apps. ``wait`` is woken by ``store`` (no polling). Metas are
stored encoded with ``result_serializer``, so what a caller gets back is what another backend
would return (a copy, JSON types).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from celeriac import states
from celeriac.backends.base import CHORDS, GROUPS, PUSH, ChordEntry, ResultBackend
from celeriac.exceptions import TimeoutError

__all__ = ["MemoryBackend"]


@dataclass(slots=True)
class _Chord:
    size: int | None = None
    parts: dict[str, tuple[int | None, int, str, bytes]] = field(default_factory=dict)


class _Store:
    """One ``memory://`` backend's data."""

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.results: dict[str, tuple[str, bytes, float | None]] = {}  # id -> (status, meta, exp)
        self.groups: dict[str, tuple[bytes, float | None]] = {}
        self.chords: dict[str, _Chord] = {}
        self.seq = 0
        self.last_sweep = 0.0


_REGISTRY: dict[str, _Store] = {}
_REGISTRY_LOCK = threading.Lock()


def _store_for(url: str) -> _Store:
    parts = urlsplit(url)
    key = parts.netloc + parts.path
    with _REGISTRY_LOCK:
        store = _REGISTRY.get(key)
        if store is None:
            store = _REGISTRY[key] = _Store()
        return store


class MemoryBackend(ResultBackend):
    """In-process result backend; thread-safe, ``wait`` is pushed by ``store``."""

    capabilities = frozenset({CHORDS, GROUPS, PUSH})
    description = "in-memory (this process only)"

    def __init__(self, url: str, conf: Mapping[str, Any]) -> None:
        super().__init__(url, conf)
        self._data = _store_for(url)

    def _expiry(self) -> float | None:
        return time.time() + self.expires if self.expires else None

    def _sweep(self, now: float) -> None:
        """Drop expired results (caller holds the lock); at most once a second."""
        data = self._data
        if now - data.last_sweep < 1.0:
            return
        data.last_sweep = now
        for key in [k for k, v in data.results.items() if v[2] is not None and v[2] <= now]:
            del data.results[key]
        for key in [k for k, v in data.groups.items() if v[1] is not None and v[1] <= now]:
            del data.groups[key]

    def store(self, task_id: str, meta: dict[str, Any], *, reply_to: str | None = None,
              correlation_id: str | None = None) -> None:
        """Store ``meta``; a stored SUCCESS is kept. Wakes waiters."""
        encoded = self.encode(meta)
        status = str(meta.get("status"))
        data = self._data
        with data.cond:
            now = time.time()
            old = data.results.get(task_id)
            if old is not None and old[0] == states.SUCCESS and (old[2] is None or old[2] > now):
                return
            data.results[task_id] = (status, encoded, self._expiry())
            self._sweep(now)
            data.cond.notify_all()

    def _get_locked(self, task_id: str, now: float) -> dict[str, Any] | None:
        found = self._data.results.get(task_id)
        if found is None or (found[2] is not None and found[2] <= now):
            return None
        meta: dict[str, Any] = self.decode(found[1])
        return meta

    def get(self, task_id: str) -> dict[str, Any] | None:
        """The stored meta of ``task_id`` or None."""
        with self._data.cond:
            return self._get_locked(task_id, time.time())

    def get_many(self, task_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The stored metas of the ids that have one."""
        out: dict[str, dict[str, Any]] = {}
        with self._data.cond:
            now = time.time()
            for task_id in task_ids:
                meta = self._get_locked(task_id, now)
                if meta is not None:
                    out[task_id] = meta
        return out

    def forget(self, task_id: str) -> None:
        """Delete the result of ``task_id``."""
        with self._data.cond:
            self._data.results.pop(task_id, None)

    def wait(self, task_ids: Sequence[str], timeout: float | None = None,
             interval: float = 0.5) -> dict[str, dict[str, Any]]:
        """Block until every id is ready (woken by :meth:`store`); raise TimeoutError after
        ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = list(dict.fromkeys(task_ids))
        done: dict[str, dict[str, Any]] = {}
        data = self._data
        with data.cond:
            while True:
                now = time.time()
                still: list[str] = []
                for task_id in pending:
                    found = data.results.get(task_id)
                    if found is not None and found[0] in states.READY_STATES:
                        meta = self._get_locked(task_id, now)
                        if meta is not None:
                            done[task_id] = meta
                            continue
                    still.append(task_id)
                pending = still
                if not pending:
                    return done
                if deadline is None:
                    data.cond.wait()
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"The operation timed out after {timeout} s waiting for "
                        f"{len(pending)} result(s), first {pending[0]}.")
                data.cond.wait(left)

    def save_group(self, group_id: str, result: Any) -> None:
        """Store a group's result tuple."""
        encoded = self.encode(result)
        with self._data.cond:
            self._data.groups[group_id] = (encoded, self._expiry())

    def restore_group(self, group_id: str) -> Any | None:
        """The saved group result or None."""
        with self._data.cond:
            found = self._data.groups.get(group_id)
            if found is None or (found[1] is not None and found[1] <= time.time()):
                return None
            return self.decode(found[0])

    def forget_group(self, group_id: str) -> None:
        """Delete a saved group."""
        with self._data.cond:
            self._data.groups.pop(group_id, None)

    def set_chord_size(self, group_id: str, size: int) -> None:
        """Record the number of header members of chord ``group_id``."""
        with self._data.cond:
            self._data.chords.setdefault(group_id, _Chord()).size = size

    def add_to_chord(self, group_id: str, count: int = 1) -> None:
        """Raise the size of the running chord ``group_id`` by ``count`` members."""
        with self._data.cond:
            chord = self._data.chords.setdefault(group_id, _Chord())
            chord.size = (chord.size or 0) + int(count)

    def chord_part_return(self, group_id: str, group_index: int | None, task_id: str,
                          state: str, result: Any) -> list[ChordEntry] | None:
        """Record one finished member; the call that completes the chord gets the entries.

        A member reported twice (a redelivered task) counts once.
        """
        encoded = self.encode(result)
        data = self._data
        with data.cond:
            chord = data.chords.setdefault(group_id, _Chord())
            if task_id in chord.parts:
                return None
            data.seq += 1
            chord.parts[task_id] = (group_index, data.seq, state, encoded)
            if chord.size is None or len(chord.parts) < chord.size:
                return None
            del data.chords[group_id]
        ordered = sorted(chord.parts.items(),
                         key=lambda kv: (kv[1][0] is None, kv[1][0] or 0, kv[1][1]))
        return [(tid, part[2], self.decode(part[3])) for tid, part in ordered]
