"""Where the service keeps each user's events, so callers send new events instead of whole histories.

One interface, :class:`HistoryStore`, opened from the ``--history-store`` URL by
:func:`open_history_store`, with two backends:

- ``sqlite:///histories.db`` (relative to the working folder; ``sqlite:////var/lib/sasrec/h.db`` is
  absolute, as in SQLAlchemy): one local file, nothing else to run. WAL journal with
  ``synchronous=FULL``: :meth:`HistoryStore.append` returns after the commit is fsynced, so an
  append that returned survives a process crash and a power loss. Safe from many threads and from
  several processes on one host (their writers take turns on an ``flock`` of ``PATH.lock`` beside the
  file, waiting up to ``timeout_s``).
- ``redis://HOST:PORT/DB`` (``rediss://`` for TLS): several replicas or ``--processes N``. Each
  append is one Lua script, so events, trim and idempotency record change together. Durability is
  the server's: with ``appendonly yes`` and ``appendfsync everysec`` (Redis's default AOF policy) a
  power loss can lose up to about one second of appends that were already acknowledged;
  ``appendfsync always`` fsyncs before every reply and closes that gap at a throughput cost. Without
  AOF, a restart loses everything since the last snapshot.

Events are external item ids (strings) with optional integer timestamps; :meth:`HistoryStore.history`
returns them oldest first, with ``None`` as the timestamp of an event appended without one. Each stored
event has a sequence number, consecutive per user; a user's first event (again after an erasure) gets a
random one, so a reader holding a :class:`Cursor` from before an erasure (in this process or another)
does not mistake the new history for the old one's continuation. :meth:`HistoryStore.tail` and an
append's read-back return only the events after such a cursor while the history still begins where the
cursor says (no events dropped since), else the whole history. Each user
keeps the newest ``max_events_per_user`` events; older ones are dropped at append time and counted.
An append with an ``idempotency_key`` already seen for that user within ``idempotency_window_s``
appends nothing and reports a duplicate (the same key with different events is an input error).
:meth:`HistoryStore.delete` erases a user's events and idempotency records, so a retry that arrives
after the erasure appends again.

Bad input raises :class:`pipelines.errors.InputError` naming the field; a store that cannot be
reached or written raises :class:`HistoryStoreUnavailable` (gRPC ``UNAVAILABLE``). Neither backend
retries on its own: a call that timed out may have been applied, and only the caller's idempotency
key makes its retry safe.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import secrets
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence
from urllib.parse import urlsplit

from pipelines.errors import InputError
from serving.combining import Combiner, Entry

INT64 = (-(2**63), 2**63 - 1)  # timestamps are stored as SQLite INTEGER: signed 64-bit
REDIS_PREFIX = "sasrec:history:"  # every key this service writes in a Redis database starts with it
FIRST_SEQUENCE_BITS = 50  # a new history's random first number: exact in Redis's Lua doubles (2**53)


class HistoryStoreUnavailable(Exception):
    """The store cannot be reached or written (the server answers ``UNAVAILABLE``); one-line message."""


@dataclass(frozen=True)
class HistoryOptions:
    """Limits and timeouts of a history store (keywords of :func:`open_history_store`)."""

    # A few times the largest shipped maxlen (200), so a model exported with a longer maxlen still
    # finds full histories, while one user's storage stays bounded.
    max_events_per_user: int = 1000
    max_id_length: int = 256  # characters in a user id, an item id or an idempotency key
    idempotency_window_s: float = 86400.0  # how long a retry with the same key is recognised
    timeout_s: float = 5.0  # SQLite: waiting for another writer's lock; Redis: connecting and each reply

    def __post_init__(self):
        for name in ("max_events_per_user", "max_id_length"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("idempotency_window_s", "timeout_s"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be positive, not {getattr(self, name)}")


class History(NamedTuple):
    item_ids: list[str]  # oldest first
    timestamps: list[int | None]  # one per event; None where the event was appended without one


class Cursor(NamedTuple):
    """Where a user's stored history stands: the sequence numbers of its oldest event and one past its
    newest (``(0, 0)`` for a user with no events)."""

    first: int
    end: int


class Tail(NamedTuple):
    """Stored events of one user from sequence number ``start`` on, and the whole history's cursor."""

    events: History
    start: int
    cursor: Cursor

    @property
    def whole(self) -> bool:
        return self.start == self.cursor.first

    def offset(self, since: Cursor) -> int | None:
        """Where the events after ``since`` begin in :attr:`events`, or None when they are not all there (the
        history no longer begins at ``since``'s first event, or ``since`` is not within this read)."""
        return since.end - self.start if _covers(self.cursor, self.start, since) else None


def _covers(cursor: Cursor, start: int, since: Cursor | None) -> bool:
    """Whether the stored history at ``cursor``, read from sequence number ``start`` on, holds exactly what
    came after ``since``: it still begins at ``since``'s first event and ``since`` ends within the read."""
    return since is not None and since.first == cursor.first and start <= since.end <= cursor.end


@dataclass(frozen=True)
class AppendResult:
    appended: int  # events this call added (0 for a duplicate retry)
    duplicate: bool  # the idempotency key was seen: the first call's events are stored, nothing added
    dropped: int  # the user's oldest events removed by the per-user cap in this call
    tail: Tail | None = None  # with read_back: the user's history right after this append (see since)


class HistoryStore(ABC):
    """Validation and counting shared by the backends; a backend implements the three storage steps."""

    name: str  # the store as logs and errors show it, without credentials

    def __init__(self, options: HistoryOptions):
        self.options = options
        self._dropped_total = 0
        self._count_lock = threading.Lock()
        self._closed = False

    @property
    def dropped_total(self) -> int:
        """Events dropped by the per-user cap in this store object's appends (a metric to export)."""
        return self._dropped_total

    def append(
        self,
        user_id: str,
        item_ids: Sequence[str],
        timestamps: Sequence[int] | None = None,
        idempotency_key: str | None = None,
        read_back: bool = False,
        since: Cursor | None = None,
    ) -> AppendResult:
        """Append events to the end of ``user_id``'s history; returns once they are stored durably.
        ``read_back``: the result also holds the history as this append left it, as :meth:`tail` with
        ``since`` reads it (in the same transaction, so no other append comes between; one round trip
        instead of two)."""
        self._check_id("user_id", user_id)
        if isinstance(item_ids, str) or not item_ids:
            raise InputError("item_ids: give at least one item id")
        item_ids = list(item_ids)
        for i, item in enumerate(item_ids):
            self._check_id(f"item_ids[{i}]", item)
        if timestamps is None:
            times = [None] * len(item_ids)
        else:
            times = list(timestamps)
            if len(times) != len(item_ids):
                raise InputError(f"timestamps: {len(times)} given for {len(item_ids)} item ids")
            for i, t in enumerate(times):
                if isinstance(t, bool) or not isinstance(t, int) or not INT64[0] <= t <= INT64[1]:
                    raise InputError(f"timestamps[{i}]: {t!r} is not a 64-bit integer")
        if idempotency_key is not None:
            self._check_id("idempotency_key", idempotency_key)
        digest = None if idempotency_key is None else hashlib.sha256(json.dumps([item_ids, times]).encode()).hexdigest()
        result = self._call(self._append, user_id, item_ids, times, idempotency_key, digest, read_back, since)
        if result is None:
            raise InputError("idempotency_key: already used for different events of this user")
        if result.dropped:
            with self._count_lock:
                self._dropped_total += result.dropped
        return result

    def history(self, user_id: str) -> History:
        """The user's stored events, oldest first (empty for an unknown or erased user)."""
        return self.tail(user_id).events

    def tail(self, user_id: str, since: Cursor | None = None) -> Tail:
        """The user's stored events after ``since`` (a cursor of an earlier read) while the history still
        begins at its first event; else, or without ``since``, the whole history."""
        self._check_id("user_id", user_id)
        return self._call(self._tail, user_id, since)

    def delete(self, user_id: str) -> bool:
        """Erase the user's events and idempotency records; False when there was nothing stored."""
        self._check_id("user_id", user_id)
        return self._call(self._delete, user_id)

    def close(self) -> None:
        self._closed = True
        self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_id(self, field: str, value) -> None:
        if not isinstance(value, str) or not value:
            raise InputError(f"{field}: must be a non-empty string")
        if len(value) > self.options.max_id_length:
            raise InputError(f"{field}: longer than {self.options.max_id_length} characters")

    def _call(self, step, *args):
        if self._closed:
            raise HistoryStoreUnavailable(f"history store {self.name} is closed")
        return step(*args)

    @abstractmethod
    def _append(self, user_id, item_ids, times, key, digest, read_back, since) -> AppendResult | None:
        """Append atomically (and with ``read_back`` read the tail after ``since`` in the same transaction);
        None when ``key`` is recorded for this user with another digest."""

    @abstractmethod
    def _tail(self, user_id, since) -> Tail: ...

    @abstractmethod
    def _delete(self, user_id) -> bool: ...

    @abstractmethod
    def _close(self) -> None: ...


SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    user_id TEXT NOT NULL, seq INTEGER NOT NULL, item_id TEXT NOT NULL, timestamp INTEGER,
    PRIMARY KEY (user_id, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idempotency (
    user_id TEXT NOT NULL, key TEXT NOT NULL, digest TEXT NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (user_id, key)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_expiry ON idempotency (expires_at);
"""


class SQLiteHistoryStore(HistoryStore):
    """One SQLite file; a connection per thread, so reads go on while another thread commits."""

    def __init__(self, path: str | Path, options: HistoryOptions = HistoryOptions()):
        super().__init__(options)
        self.path = Path(path)
        self.name = str(self.path)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        # This process's writers queue here, in order, and share commits (see _write); other processes' on
        # the lock file (see _writer_lock), not in SQLite's busy handler, whose sleeps (up to 100 ms each)
        # gave p99s of hundreds of ms.
        with _unavailable(OSError, f"history store {self.name}"):
            self._lock_file = open(self.path.with_name(self.path.name + ".lock"), "ab")
        self._writes = Combiner(self._commit, timeout_s=options.timeout_s, on_timeout=lambda: HistoryStoreUnavailable(
            f"history store {self.name}: no write turn within {options.timeout_s:g} s"))
        with self._errors():
            conn = self._connection()
            # Stored in the file: every later connection uses it. A file system without shared
            # memory (some network mounts) silently keeps the old mode, and the guarantees above go.
            (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            if mode.lower() != "wal":
                raise HistoryStoreUnavailable(f"history store {self.name}: WAL journal unavailable (got {mode})")
            conn.executescript(SQLITE_SCHEMA)

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: transactions are the explicit BEGIN IMMEDIATE below.
            conn = sqlite3.connect(self.path, timeout=self.options.timeout_s, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA synchronous=FULL")  # fsync the WAL at every commit: survives power loss
            with self._connections_lock:
                self._connections.append(conn)
            self._local.conn = conn
        return conn

    def _errors(self):
        return _unavailable(sqlite3.DatabaseError, f"history store {self.name}")

    def _write(self, step):
        """``step(conn)``'s result, once committed (and fsynced) in a transaction shared with the writes
        other threads queued meanwhile: one fsync acknowledges them all (group commit), each in queue
        order. A step that fails is rolled back alone; a commit that fails fails the whole group."""
        return self._writes.run(step)

    @contextmanager
    def _writer_lock(self):
        """The file's write turn among processes: an exclusive ``flock`` on ``PATH.lock``, retried every
        0.1-2 ms (released by a process's exit too), or HistoryStoreUnavailable after ``timeout_s``."""
        deadline = time.monotonic() + self.options.timeout_s
        delay = 1e-4
        while True:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise HistoryStoreUnavailable(
                        f"history store {self.name}: another process held the write lock for "
                        f"{self.options.timeout_s:g} s") from None
                time.sleep(delay)
                delay = min(2 * delay, 2e-3)
        try:
            yield
        finally:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    def _commit(self, group: list[Entry]) -> None:
        """The group's steps in one transaction, each in a savepoint (a failing step rolls back alone);
        an error here (BEGIN, COMMIT) fails the whole group (:class:`~serving.combining.Combiner`)."""
        with self._writer_lock(), self._errors():
            conn = self._connection()
            # IMMEDIATE takes the write lock first: a deferred transaction upgrading later can fail
            # at once with "database is locked" instead of waiting out the busy timeout.
            conn.execute("BEGIN IMMEDIATE")
            try:
                for entry in group:
                    conn.execute("SAVEPOINT write")
                    try:
                        with self._errors():
                            entry.result = entry.payload(conn)
                    except Exception as exc:
                        conn.execute("ROLLBACK TO write")
                        entry.error = exc
                    conn.execute("RELEASE write")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _append(self, user_id, item_ids, times, key, digest, read_back, since):
        return self._write(lambda conn: self._append_step(conn, user_id, item_ids, times, key, digest, read_back,
                                                          since))

    def _append_step(self, conn, user_id, item_ids, times, key, digest, read_back, since):
        cursor = self._cursor(conn, user_id)
        if key is not None:
            now = time.time()
            conn.execute("DELETE FROM idempotency WHERE expires_at <= ?", (now,))
            row = conn.execute("SELECT digest FROM idempotency WHERE user_id = ? AND key = ?",
                               (user_id, key)).fetchone()
            if row is not None:
                if row[0] != digest:
                    return None
                return AppendResult(0, True, 0, self._read(conn, user_id, cursor, since) if read_back else None)
            conn.execute("INSERT INTO idempotency VALUES (?, ?, ?, ?)",
                         (user_id, key, digest, now + self.options.idempotency_window_s))
        empty = cursor.first == cursor.end
        start = secrets.randbits(FIRST_SEQUENCE_BITS) if empty else cursor.end
        conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?)",
                         [(user_id, start + i, item, t) for i, (item, t) in enumerate(zip(item_ids, times))])
        keep_from = start + len(item_ids) - self.options.max_events_per_user
        dropped = conn.execute("DELETE FROM events WHERE user_id = ? AND seq < ?", (user_id, keep_from)).rowcount
        # Numbers are consecutive: the cursor after the append follows from the one before, without a query.
        cursor = Cursor(max(start if empty else cursor.first, keep_from), start + len(item_ids))
        return AppendResult(len(item_ids), False, dropped,
                            self._read(conn, user_id, cursor, since) if read_back else None)

    @staticmethod
    def _cursor(conn, user_id) -> Cursor:
        # Two subqueries: SQLite answers a lone MIN or MAX from the index, not both in one.
        first, last = conn.execute("SELECT (SELECT MIN(seq) FROM events WHERE user_id = ?), "
                                   "(SELECT MAX(seq) FROM events WHERE user_id = ?)", (user_id, user_id)).fetchone()
        return Cursor(0, 0) if first is None else Cursor(first, last + 1)

    @staticmethod
    def _read(conn, user_id, cursor: Cursor, since: Cursor | None) -> Tail:
        """The tail of the history at ``cursor`` after ``since`` (the whole history when it does not cover it)."""
        start = since.end if _covers(cursor, cursor.first, since) else cursor.first
        rows = [] if cursor.first == cursor.end else conn.execute(
            "SELECT item_id, timestamp FROM events WHERE user_id = ? AND seq >= ? ORDER BY seq",
            (user_id, start)).fetchall()
        return Tail(History([r[0] for r in rows], [r[1] for r in rows]), start, cursor)

    def _tail(self, user_id, since):
        with self._errors():
            conn = self._connection()
            # One read transaction: the cursor and the rows of the same snapshot, whatever commits between.
            conn.execute("BEGIN")
            try:
                return self._read(conn, user_id, self._cursor(conn, user_id), since)
            finally:
                conn.execute("COMMIT")

    def _delete(self, user_id):
        def step(conn):
            found = conn.execute("DELETE FROM events WHERE user_id = ?", (user_id,)).rowcount
            return found + conn.execute("DELETE FROM idempotency WHERE user_id = ?", (user_id,)).rowcount > 0

        return self._write(step)

    def _close(self):
        with self._connections_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._lock_file.close()


# Lua shared by both scripts. KEYS[1]: events list, KEYS[4]: the sequence number of its first event (absent:
# 0, as for a list written before the numbers were kept). ARGV[SINCE], ARGV[SINCE + 1]: the caller's cursor
# ('' for none). Returns {first (a string: exact beyond Lua's %.14g numbers), length, offset of the reply's
# first event, the events from there}.
REDIS_TAIL = """
local function tail(since)
  local first = redis.call('GET', KEYS[4]) or '0'
  local length = redis.call('LLEN', KEYS[1])
  if length == 0 then return {'0', 0, 0, {}} end
  local from = 0
  if ARGV[since] == first then
    local offset = tonumber(ARGV[since + 1]) - tonumber(first)
    if offset >= 0 and offset <= length then from = offset end
  end
  return {first, length, from, redis.call('LRANGE', KEYS[1], from, -1)}
end
"""

# KEYS: events list, idempotency hash (key -> digest), idempotency expiry zset (key -> expiry time), first number.
# ARGV: cap, window seconds, key ("" for none), digest, read back ("1" or "0"), the cursor's first and end
# ("" for none), a new history's random first number, then the encoded events.
# Returns {appended, status (0 appended, 1 duplicate, -1 key reused), dropped[, the tail if read back]}.
REDIS_APPEND = REDIS_TAIL + """
local function in_chunks(cmd, key, list, first)
  for i = first, #list, 1000 do  -- unpack's stack limit is about 8000 values
    redis.call(cmd, key, unpack(list, i, math.min(i + 999, #list)))
  end
end
local cap, window, key, digest = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local function reply(appended, status, dropped)
  if ARGV[5] == '1' then return {appended, status, dropped, tail(6)} end
  return {appended, status, dropped}
end
if key ~= '' then
  local time = redis.call('TIME')
  local now = tonumber(time[1]) + tonumber(time[2]) / 1e6
  local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
  if #expired > 0 then
    in_chunks('HDEL', KEYS[2], expired, 1)
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  end
  local seen = redis.call('HGET', KEYS[2], key)
  if seen then
    if seen == digest then return reply(0, 1, 0) end
    return {0, -1, 0}
  end
  redis.call('HSET', KEYS[2], key, digest)
  redis.call('ZADD', KEYS[3], now + window, key)
  redis.call('EXPIRE', KEYS[2], window)  -- an idle user's records vanish whole after the window
  redis.call('EXPIRE', KEYS[3], window)
end
if redis.call('LLEN', KEYS[1]) == 0 then redis.call('SET', KEYS[4], ARGV[8]) end
in_chunks('RPUSH', KEYS[1], ARGV, 9)
local length = redis.call('LLEN', KEYS[1])
local dropped = 0
if length > cap then
  dropped = length - cap
  redis.call('LTRIM', KEYS[1], -cap, -1)
  redis.call('INCRBY', KEYS[4], dropped)
end
return reply(#ARGV - 8, 0, dropped)
"""

# KEYS: events list, -, -, first number. ARGV: the cursor's first and end ("" for none).
REDIS_READ = REDIS_TAIL + "return tail(1)"


class RedisHistoryStore(HistoryStore):
    """A Redis database via the ``redis`` package; connects lazily, so the server starts without it."""

    def __init__(self, url: str, options: HistoryOptions = HistoryOptions()):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        super().__init__(options)
        self.name = _redacted(url)
        self._redis_error = redis.RedisError
        self._client = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=options.timeout_s,
            socket_connect_timeout=options.timeout_s,
            # No silent retries: a script whose reply timed out may have run (see the module docstring).
            retry=Retry(NoBackoff(), 0))
        self._append_script = self._client.register_script(REDIS_APPEND)
        self._read_script = self._client.register_script(REDIS_READ)

    def _keys(self, user_id):
        return [f"{REDIS_PREFIX}events:{user_id}", f"{REDIS_PREFIX}idempotency:{user_id}",
                f"{REDIS_PREFIX}idempotency-expiry:{user_id}", f"{REDIS_PREFIX}first:{user_id}"]

    def _append(self, user_id, item_ids, times, key, digest, read_back, since):
        # "TIME:ITEM": a timestamp never holds ':', so the first ':' splits even ids that contain one.
        events = [f"{'' if t is None else t}:{item}" for item, t in zip(item_ids, times)]
        window = math.ceil(self.options.idempotency_window_s)  # EXPIRE takes whole seconds; 0 would delete
        args = [self.options.max_events_per_user, window, key or "", digest or "", int(read_back),
                *_cursor_args(since), secrets.randbits(FIRST_SEQUENCE_BITS), *events]
        with _unavailable(self._redis_error, f"history store {self.name}"):
            appended, status, dropped, *read = self._append_script(keys=self._keys(user_id), args=args)
        if status < 0:
            return None
        return AppendResult(appended, status == 1, dropped, _decoded(read[0]) if read else None)

    def _tail(self, user_id, since):
        with _unavailable(self._redis_error, f"history store {self.name}"):
            return _decoded(self._read_script(keys=self._keys(user_id), args=_cursor_args(since)))

    def _delete(self, user_id):
        with _unavailable(self._redis_error, f"history store {self.name}"):
            return self._client.delete(*self._keys(user_id)) > 0

    def _close(self):
        self._client.close()


def _cursor_args(since: Cursor | None) -> list:
    return ["", ""] if since is None else [since.first, since.end]


def _decoded(read: list) -> Tail:
    """The Redis scripts' tail reply, its "TIME:ITEM" events as a History."""
    first, length, offset, events = read
    pairs = [event.split(":", 1) for event in events]
    first = int(first)
    return Tail(History([item for _, item in pairs], [int(t) if t else None for t, _ in pairs]),
                first + offset, Cursor(first, first + length))


@contextmanager
def _unavailable(errors, where: str):
    """Turn a backend's errors into one-line :class:`HistoryStoreUnavailable`."""
    try:
        yield
    except errors as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise HistoryStoreUnavailable(f"{where}: {reason}") from exc


def _redacted(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()
    except ValueError:
        return "<unparsable URL>"


def open_history_store(url: str, **options) -> HistoryStore:
    """The store ``url`` names (the ``--history-store`` flag), with the :class:`HistoryOptions` given as keywords."""
    opts = HistoryOptions(**options)
    usage = f"--history-store must be sqlite:///PATH or redis://HOST:PORT/DB, not {_redacted(url)!r}"
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme == "sqlite":
        if not url.startswith("sqlite:///") or not url[len("sqlite:///"):]:
            raise InputError(usage)
        path = Path(url[len("sqlite:///"):])
        if not path.parent.is_dir():
            raise InputError(f"--history-store: folder {path.parent.absolute()} does not exist")
        if path.is_dir():
            raise InputError(f"--history-store: {path.absolute()} is a folder, give a file")
        return SQLiteHistoryStore(path, opts)
    if scheme in ("redis", "rediss"):
        try:
            parts = urlsplit(url)
            host, _ = parts.hostname, parts.port  # .port raises ValueError unless a number in range
        except ValueError as exc:
            raise InputError(f"{usage} ({exc})") from None
        if not host or not (parts.path in ("", "/") or parts.path[1:].isdigit()):
            raise InputError(usage)
        return RedisHistoryStore(url, opts)
    raise InputError(usage)
