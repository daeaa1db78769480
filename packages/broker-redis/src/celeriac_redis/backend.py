"""The Redis result backend, with Celery's key names, JSON fields, pub/sub push and chord join.

Keys (celery-wire.md section 4): ``celery-task-meta-<id>`` (task meta, TTL ``result_expires``,
written together with a ``PUBLISH`` on the channel of the same name), ``celery-taskset-meta-<gid>``
(saved group), and the chord join keys ``celery-taskset-meta-<gid>.j`` (ZSET of
``[1, task_id, state, result]`` scored by ``group_index``), ``.s`` (size) and ``.t`` (extra
members). The chord join runs in one Lua script, so exactly one of the finishing members (a
Celery worker's or ours) sees the count reach the size.

``wait`` subscribes to the result channels, then reads what is already stored with ``MGET``, then
sleeps on the subscription until every id is ready: no polling loop. Each thread keeps one
pub/sub connection; ``on_task_call`` subscribes it before the task is published.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from celeriac import states
from celeriac.backends.base import (
    CHORDS,
    GROUPS,
    PERSISTENT,
    PUSH,
    ChordEntry,
    ResultBackend,
)
from celeriac.exceptions import (
    BrokerConnectionError,
    ImproperlyConfigured,
    TimeoutError,
)
from celeriac_redis.connection import TRANSIENT_ERRORS, describe_error, is_fatal, make_client, safe_url

__all__ = ["RedisBackend"]

logger = logging.getLogger("celeriac.redis")

TASK_PREFIX = "celery-task-meta-"
GROUP_PREFIX = "celery-taskset-meta-"
CHORD_PREFIX = "chord-unlock-"

_STORE = r"""
-- KEYS[1]=meta key; ARGV[1]=value ARGV[2]=ttl seconds (0 = none) ARGV[3]=check (1/0)
if ARGV[3] == '1' then
  local cur = redis.call('GET', KEYS[1])
  if cur then
    local ok, m = pcall(cjson.decode, cur)
    if ok and type(m) == 'table' and m.status == 'SUCCESS' then return 0 end
  end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SETEX', KEYS[1], ARGV[2], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""

_CHORD = r"""
-- KEYS[1]=.j KEYS[2]=.t KEYS[3]=.s; ARGV[1]=entry ARGV[2]=score ARGV[3]=ttl ARGV[4]='zset'|'list'
local count
if ARGV[4] == 'zset' then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
  count = redis.call('ZCOUNT', KEYS[1], '-inf', '+inf')
else
  redis.call('RPUSH', KEYS[1], ARGV[1])
  count = redis.call('LLEN', KEYS[1])
end
local extra = redis.call('GET', KEYS[2])
local size = redis.call('GET', KEYS[3])
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('EXPIRE', KEYS[3], ttl)
end
if size and count == tonumber(size) + (tonumber(extra) or 0) then
  local all
  if ARGV[4] == 'zset' then all = redis.call('ZRANGE', KEYS[1], 0, -1)
  else all = redis.call('LRANGE', KEYS[1], 0, -1) end
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  return all
end
return false
"""


def _key_prefix(options: Mapping[str, Any]) -> str:
    prefix = str(options.get("global_keyprefix") or "")
    if prefix and prefix[-1] not in ":_-.":
        prefix += "_"
    return prefix


class _Local(threading.local):
    def __init__(self) -> None:
        self.pubsub: Any = None
        self.subscribed: dict[str, None] = {}
        self.seen: dict[str, bytes] = {}
        self.unconfirmed: set[str] = set()
        self.reconnected = False
        self.hooked: Any = None

    def on_connect(self, _connection: Any) -> None:
        """redis-py calls this after (re)connecting the pub/sub connection."""
        self.reconnected = True


class RedisBackend(ResultBackend):
    """``redis://`` (also ``rediss``, ``redis+socket``, ``sentinel``) results. Thread-safe."""

    capabilities = frozenset({PERSISTENT, CHORDS, GROUPS, PUSH})
    description = "Redis (Celery layout, pub/sub push)"

    #: Subscriptions kept per thread for tasks nobody waited on yet.
    max_presubscribed = 10_000

    def __init__(self, url: str, conf: Mapping[str, Any]) -> None:
        super().__init__(url, conf)
        options = dict(conf.get("result_backend_transport_options") or {})
        broker_options = conf.get("broker_transport_options") or {}
        if "master_name" not in options and "master_name" in broker_options:
            options["master_name"] = broker_options["master_name"]  # same Sentinel, usually
        if "result_expires" not in conf:
            self.expires = 86400.0
        prefix = _key_prefix(options)
        self.task_prefix = prefix + TASK_PREFIX
        self.group_prefix = prefix + GROUP_PREFIX
        self.ordered = bool(options.get("result_chord_ordered", True))
        self.retry_timeout = float(options.get("retry_timeout", 20.0))
        ssl_opts = conf.get("redis_backend_use_ssl")  # TLS options, see celeriac_redis.connection
        for name in ("socket_timeout", "socket_connect_timeout", "max_connections"):
            value = conf.get(f"redis_{name}")
            if value is not None:
                options.setdefault(name, value)
        self.options = options
        try:
            self.client = make_client(url, options, ssl_opts if isinstance(ssl_opts, Mapping) else None)
        except ValueError as exc:
            raise ImproperlyConfigured(str(exc)) from None
        self._store = self.client.register_script(_STORE)
        self._chord = self.client.register_script(_CHORD)
        self._local = _Local()
        self._json = self.serializer.name == "json"

    @property
    def safe_url(self) -> str:
        """The URL with its password masked."""
        return safe_url(self.url)

    # -- helpers ------------------------------------------------------------------------------

    def task_key(self, task_id: str) -> str:
        """``celery-task-meta-<task_id>`` (with the global key prefix)."""
        return self.task_prefix + task_id

    def group_key(self, group_id: str, suffix: str = "") -> str:
        """``celery-taskset-meta-<group_id><suffix>``."""
        return self.group_prefix + group_id + suffix

    def _retry(self, fn: Any) -> Any:
        deadline = time.monotonic() + self.retry_timeout
        delay = 0.05
        logged = False
        while True:
            try:
                return fn()
            except TRANSIENT_ERRORS as exc:
                if is_fatal(exc):
                    raise self._fatal(exc) from None
                if time.monotonic() + delay > deadline:
                    raise BrokerConnectionError(describe_error(exc, self.url)) from None
                if not logged:
                    logger.warning("%s; retrying.", describe_error(exc, self.url))
                    logged = True
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _fatal(self, exc: BaseException) -> BrokerConnectionError:
        """The error for a refused certificate or login: retrying cannot help, so no retry."""
        error = BrokerConnectionError(describe_error(exc, self.url))
        error.transient = False
        return error

    @property
    def _ttl(self) -> int:
        return int(self.expires) if self.expires else 0

    # -- required -----------------------------------------------------------------------------

    def store(self, task_id: str, meta: dict[str, Any], *, reply_to: str | None = None,
              correlation_id: str | None = None) -> None:
        """SETEX + PUBLISH the meta atomically; a stored SUCCESS is never overwritten."""
        key = self.task_key(task_id)
        value = self.encode(meta)
        if self._json:
            self._retry(lambda: self._store(keys=[key], args=[value, self._ttl, "1"]))
            return

        def run() -> None:
            current = self.client.get(key)
            if current is not None:
                try:
                    if self.decode(current).get("status") == states.SUCCESS:
                        return
                except Exception:  # unreadable value: overwrite it
                    pass
            self._store(keys=[key], args=[value, self._ttl, "0"])

        self._retry(run)

    def _decode_meta(self, raw: bytes | str | None) -> dict[str, Any] | None:
        if raw is None:
            return None
        try:
            meta = self.decode(raw)
        except Exception as exc:  # logged, never fatal
            logger.warning("Unreadable result value (%s): %.100r", exc, raw)
            return None
        return meta if isinstance(meta, dict) else None

    def get(self, task_id: str) -> dict[str, Any] | None:
        """The stored meta of ``task_id`` or None (PENDING)."""
        return self._decode_meta(self._retry(lambda: self.client.get(self.task_key(task_id))))

    def get_many(self, task_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """``MGET`` the metas of ``task_ids`` (chunks of 1000); ids with nothing stored are left out."""
        ids = list(dict.fromkeys(task_ids))
        found: dict[str, dict[str, Any]] = {}
        for i in range(0, len(ids), 1000):
            chunk = ids[i:i + 1000]
            keys = [self.task_key(t) for t in chunk]
            values = self._retry(lambda keys=keys: self.client.mget(keys))
            for task_id, raw in zip(chunk, values, strict=True):
                meta = self._decode_meta(raw)
                if meta is not None:
                    found[task_id] = meta
        return found

    def forget(self, task_id: str) -> None:
        """Delete ``task_id``'s meta."""
        self._retry(lambda: self.client.delete(self.task_key(task_id)))

    def _set(self, key: str, value: bytes | str) -> None:
        self._retry(lambda: self._store(keys=[key], args=[value, self._ttl, "0"]))

    # -- groups and chords --------------------------------------------------------------------

    def save_group(self, group_id: str, result: Any) -> None:
        """Store ``{"result": <GroupResult tuple>}`` at ``celery-taskset-meta-<gid>``."""
        self._set(self.group_key(group_id), self.encode({"result": result}))

    def restore_group(self, group_id: str) -> Any | None:
        """The saved group tuple, or None."""
        raw = self._retry(lambda: self.client.get(self.group_key(group_id)))
        meta = self._decode_meta(raw)
        return None if meta is None else meta.get("result")

    def forget_group(self, group_id: str) -> None:
        """Delete a saved group."""
        self._retry(lambda: self.client.delete(self.group_key(group_id)))

    def set_chord_size(self, group_id: str, size: int) -> None:
        """Write the chord size at ``celery-taskset-meta-<gid>.s`` (as Celery: SETEX + PUBLISH)."""
        self._set(self.group_key(group_id, ".s"), str(int(size)))

    def add_to_chord(self, group_id: str, count: int = 1) -> None:
        """``INCR`` the ``.t`` key: members added to a running chord (``Task.add_to_chord``)."""
        key = self.group_key(group_id, ".t")
        self._retry(lambda: self.client.incrby(key, count))

    def chord_part_return(self, group_id: str, group_index: int | None, task_id: str,
                          state: str, result: Any) -> list[ChordEntry] | None:
        """Add this member to the join set; the call that completes the chord gets the ordered
        entries (and the keys are deleted), every other call gets None. Atomic (Lua)."""
        entry = self.encode([1, task_id, state, result])
        score = "+inf" if group_index is None else str(int(group_index))
        keys = [self.group_key(group_id, ".j"), self.group_key(group_id, ".t"),
                self.group_key(group_id, ".s")]
        found = self._retry(lambda: self._chord(
            keys=keys, args=[entry, score, self._ttl, "zset" if self.ordered else "list"]))
        if not found:
            return None
        entries: list[ChordEntry] = []
        for raw in found:
            try:
                _, tid, st, res = self.decode(raw)
            except Exception as exc:  # logged, never fatal
                logger.error("Unreadable chord entry of group %s (%s): %.100r", group_id, exc, raw)
                continue
            entries.append((str(tid), str(st), res))
        return entries

    # -- push ---------------------------------------------------------------------------------

    def _pubsub(self) -> Any:
        local = self._local
        if local.pubsub is None:
            local.pubsub = self.client.pubsub()  # type: ignore[no-untyped-call]
            local.subscribed = {}
            local.unconfirmed = set()
            local.reconnected = False
        return local.pubsub

    def _subscribe(self, keys: Sequence[str]) -> None:
        local = self._local
        pubsub = self._pubsub()
        new = [k for k in keys if k not in local.subscribed]
        if not new:
            return
        pubsub.subscribe(*new)
        for key in new:
            local.subscribed[key] = None
        local.unconfirmed.update(new)
        conn = pubsub.connection
        if conn is not None and local.hooked is not conn:
            conn.register_connect_callback(local.on_connect)  # held weakly: bound method
            local.hooked = conn
        if len(local.subscribed) > self.max_presubscribed:
            old = list(local.subscribed)[: len(local.subscribed) - self.max_presubscribed]
            pubsub.unsubscribe(*old)
            for key in old:
                local.subscribed.pop(key, None)
                local.unconfirmed.discard(key)

    def _handle(self, item: Mapping[str, Any] | None, wanted: Mapping[str, str],
                done: dict[str, dict[str, Any]]) -> None:
        if item is None:
            return
        local = self._local
        channel = item.get("channel")
        key = channel.decode() if isinstance(channel, bytes) else str(channel)
        kind = item.get("type")
        if kind == "subscribe":
            local.unconfirmed.discard(key)
        elif kind == "message":
            if key in wanted:
                self._accept(wanted, done, key, item["data"])
            elif key in local.subscribed:
                local.seen[key] = item["data"]
                if len(local.seen) > self.max_presubscribed:
                    local.seen.pop(next(iter(local.seen)))

    def _confirm(self, wanted: Mapping[str, str], done: dict[str, dict[str, Any]]) -> None:
        """Read until the server confirmed every subscription, so a state stored after the
        following MGET is certain to be pushed to us."""
        local = self._local
        limit = time.monotonic() + 10.0
        while local.unconfirmed and time.monotonic() < limit:
            self._handle(local.pubsub.get_message(timeout=1.0), wanted, done)

    def _drop_pubsub(self) -> None:
        local = self._local
        pubsub, local.pubsub = local.pubsub, None
        local.subscribed = {}
        local.unconfirmed = set()
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:  # already broken
                pass

    def on_task_call(self, task_id: str, reply_to: str | None) -> None:
        """Subscribe this thread's pub/sub connection to the task's result channel."""
        try:
            self._subscribe([self.task_key(task_id)])
        except TRANSIENT_ERRORS:
            self._drop_pubsub()  # wait() subscribes again and reads the stored state

    def wait(self, task_ids: Sequence[str], timeout: float | None = None,
             interval: float = 0.5) -> dict[str, dict[str, Any]]:
        """Block until every id is ready and return their metas; pushed through pub/sub.

        Raises :class:`celeriac.exceptions.TimeoutError` after ``timeout`` seconds and
        ``BrokerConnectionError`` when Redis stays unreachable for ``retry_timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        wanted = {self.task_key(t): t for t in dict.fromkeys(task_ids)}
        done: dict[str, dict[str, Any]] = {}
        local = self._local
        down_since: float | None = None
        need_read = True
        try:
            while True:
                try:
                    if need_read:
                        self._subscribe(list(wanted))
                        local.reconnected = False
                        self._confirm(wanted, done)
                        self._absorb(wanted, done, local.seen)
                        pending = [k for k in wanted if wanted[k] not in done]
                        for i in range(0, len(pending), 1000):
                            chunk = pending[i:i + 1000]
                            for key, raw in zip(chunk, self.client.mget(chunk), strict=True):
                                self._accept(wanted, done, key, raw)
                        need_read = False
                    if len(done) == len(wanted):
                        return done
                    wait = 5.0 if deadline is None else deadline - time.monotonic()
                    if wait <= 0:
                        missing = [t for t in wanted.values() if t not in done]
                        raise TimeoutError(
                            f"The operation timed out after {timeout} s waiting for "
                            f"{len(missing)} result(s), first {missing[0]}.")
                    item = local.pubsub.get_message(timeout=min(wait, 5.0))
                    down_since = None
                    if local.reconnected:
                        need_read = True
                    self._handle(item, wanted, done)
                except TRANSIENT_ERRORS as exc:
                    self._drop_pubsub()
                    if is_fatal(exc):
                        raise self._fatal(exc) from None
                    need_read = True
                    if down_since is None:
                        down_since = time.monotonic()
                        logger.warning("%s; retrying.", describe_error(exc, self.url))
                    elif time.monotonic() - down_since > self.retry_timeout:
                        raise BrokerConnectionError(describe_error(exc, self.url)) from None
                    time.sleep(0.2)
        finally:
            finished = [k for k in wanted if wanted[k] in done]
            if finished and local.pubsub is not None:
                try:
                    local.pubsub.unsubscribe(*finished)
                except TRANSIENT_ERRORS:
                    self._drop_pubsub()
                for key in finished:
                    local.subscribed.pop(key, None)

    def _absorb(self, wanted: Mapping[str, str], done: dict[str, dict[str, Any]],
                seen: dict[str, bytes]) -> None:
        for key in wanted:
            raw = seen.pop(key, None)
            if raw is not None:
                self._accept(wanted, done, key, raw)

    def _accept(self, wanted: Mapping[str, str], done: dict[str, dict[str, Any]], key: str,
                raw: bytes | str | None) -> None:
        meta = self._decode_meta(raw)
        if meta is not None and meta.get("status") in states.READY_STATES:
            done[wanted[key]] = meta

    def close(self) -> None:
        """Drop this thread's subscription and disconnect the pool. Idempotent."""
        self._drop_pubsub()
        try:
            self.client.connection_pool.disconnect()
        except Exception:  # closing must not raise
            pass
