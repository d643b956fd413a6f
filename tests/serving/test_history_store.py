"""serving.history_store on both backends: order, cap, idempotency, erasure, concurrency, durability, faults.

The Redis backend runs against a real ``redis-server`` started on a free port (``redis_url`` and
``start_redis`` in conftest.py; skipped, with the reason, only when the binary is absent:
``apt-get install redis-server``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipelines.errors import InputError
from serving.history_store import Cursor, HistoryStoreUnavailable, open_history_store
from tests.serving.conftest import free_port, needs_redis, start_redis, stop

ROOT = Path(__file__).resolve().parents[2]
@pytest.fixture(params=["sqlite", "redis"])
def store_url(request, tmp_path):
    """A store URL per backend; tests use their own user ids, so the shared Redis needs no cleaning."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'histories.db'}"
    return request.getfixturevalue("redis_url")


@pytest.fixture
def user(request) -> str:
    return f"user-{request.node.name}"


@pytest.fixture
def store(store_url):
    with open_history_store(store_url) as s:
        yield s


def test_appends_come_back_oldest_first_with_their_timestamps(store, user):
    assert store.history(user) == ([], [])
    first = store.append(user, ["a", "b:c"], timestamps=[10, 11])
    assert (first.appended, first.duplicate, first.dropped) == (2, False, 0)
    store.append(user, ["é", "a"])
    assert store.history(user) == (["a", "b:c", "é", "a"], [10, 11, None, None])
    assert store.history(user + "-other") == ([], [])


def test_the_cap_keeps_the_newest_events_and_counts_the_dropped(store_url, user):
    with open_history_store(store_url, max_events_per_user=5) as store:
        assert store.append(user, list("abc")).dropped == 0
        assert store.append(user, list("defg")).dropped == 2
        assert store.history(user).item_ids == list("cdefg")
        result = store.append(user, [str(i) for i in range(12)], timestamps=list(range(12)))
        assert (result.appended, result.dropped) == (12, 12)
        assert store.history(user) == (["7", "8", "9", "10", "11"], [7, 8, 9, 10, 11])
        assert store.dropped_total == 14


def test_read_back_returns_the_history_as_this_append_left_it(store_url, user):
    with open_history_store(store_url, max_events_per_user=4) as store:
        assert store.append(user, ["a"]).tail is None  # only when asked
        first = store.append(user, ["b", "c:d"], timestamps=[5, 6], read_back=True)
        assert first.tail.events == (["a", "b", "c:d"], [None, 5, 6]) and first.tail.whole
        origin = first.tail.cursor.first
        assert first.tail.cursor == (origin, origin + 3)
        capped = store.append(user, ["e", "f"], idempotency_key="k", read_back=True)
        assert (capped.appended, capped.dropped) == (2, 1)
        assert capped.tail.events == (["b", "c:d", "e", "f"], [5, 6, None, None])
        assert capped.tail.cursor == (origin + 1, origin + 5)
        store.append(user, ["g"])
        retry = store.append(user, ["e", "f"], idempotency_key="k", read_back=True)  # nothing added, all read
        assert retry.duplicate and retry.tail.events.item_ids == ["c:d", "e", "f", "g"]
        assert store.history(user).item_ids == ["c:d", "e", "f", "g"]


def test_a_cursor_reads_only_the_events_after_it_while_the_history_still_begins_there(store_url, user):
    with open_history_store(store_url, max_events_per_user=6) as store:
        assert store.tail(user) == (([], []), 0, (0, 0))
        cursor = store.append(user, ["a", "b"], timestamps=[1, 2], read_back=True).tail.cursor
        later = store.append(user, ["c"], read_back=True, since=cursor).tail
        assert later.events == (["c"], [None]) and later.start == cursor.end and not later.whole
        assert later.cursor == (cursor.first, cursor.end + 1)
        assert store.tail(user, later.cursor) == (([], []), later.cursor.end, later.cursor)  # nothing new
        assert store.tail(user, cursor).events.item_ids == ["c"]
        assert store.tail(user, Cursor(cursor.first, cursor.end + 5)).whole  # beyond the end: all
        assert store.tail(user, Cursor(cursor.first + 1, cursor.end)).whole  # another beginning: all
        # Events dropped by the cap: the history no longer begins where the cursor says, so all of it.
        capped = store.append(user, list("defg"), read_back=True, since=later.cursor)
        assert capped.dropped == 1 and capped.tail.whole and capped.tail.events.item_ids == list("bcdefg")
        assert capped.tail.cursor == (cursor.first + 1, cursor.first + 7)


def test_a_history_begun_again_after_an_erasure_is_not_the_old_ones_continuation(store_url, user):
    """A new history's first event gets a random sequence number: a cursor held from before an erasure (by
    this process or another) reads the whole new history, never a tail of it."""
    with open_history_store(store_url) as store:
        firsts = set()
        for _ in range(5):
            old = store.append(user, ["a", "b"], read_back=True).tail.cursor
            store.delete(user)
            new = store.append(user, ["a", "b", "c"], read_back=True, since=old).tail
            assert new.whole and new.events.item_ids == ["a", "b", "c"]
            firsts |= {old.first, new.cursor.first}
            store.delete(user)
        assert len(firsts) == 10


def test_read_back_sees_no_other_append_between(store_url, user):
    """8 threads appending to one user: each read-back history ends with that thread's own event and is a
    prefix of the final history (the append and the read are one transaction)."""
    with open_history_store(store_url) as store:
        seen = []

        def writer(t):
            for i in range(15):
                seen.append((f"{t}-{i}", store.append(user, [f"{t}-{i}"], read_back=True).tail.events.item_ids))

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        final = store.history(user).item_ids
        assert len(final) == 120
        for event, history in seen:
            assert history[-1] == event and final[:len(history)] == history


def test_a_retry_with_the_same_key_appends_nothing_twice(store_url, user):
    with open_history_store(store_url) as store:
        assert not store.append(user, ["a", "b"], idempotency_key="k1").duplicate
        retry = store.append(user, ["a", "b"], idempotency_key="k1")
        assert (retry.appended, retry.duplicate, retry.dropped) == (0, True, 0)
        assert store.append(user + "-2", ["a", "b"], idempotency_key="k1").appended == 2  # keys are per user
        with pytest.raises(InputError, match="^idempotency_key: already used for different events"):
            store.append(user, ["z"], idempotency_key="k1")
    with open_history_store(store_url) as reopened:
        assert reopened.append(user, ["a", "b"], idempotency_key="k1").duplicate
        assert reopened.append(user, ["c"], idempotency_key="k2").appended == 1
        assert reopened.history(user).item_ids == ["a", "b", "c"]


def test_idempotency_keys_expire_after_the_window(store_url, user):
    with open_history_store(store_url, idempotency_window_s=1) as store:
        store.append(user, ["a"], idempotency_key="k")
        time.sleep(1.1)
        assert store.append(user, ["a"], idempotency_key="k").appended == 1
        assert store.history(user).item_ids == ["a", "a"]


def test_delete_erases_events_and_idempotency_records(store, user):
    store.append(user, ["a", "b"], idempotency_key="k")
    store.append(user + "-kept", ["x"])
    assert store.delete(user) is True
    assert store.history(user) == ([], [])
    assert store.delete(user) is False
    assert store.append(user, ["a", "b"], idempotency_key="k").appended == 2  # the record went too
    assert store.history(user).item_ids == ["a", "b"]
    assert store.history(user + "-kept").item_ids == ["x"]


def test_concurrent_appends_lose_nothing_and_keep_each_calls_order(store, user):
    threads, calls = 6, 15

    def work(t):
        for c in range(calls):
            store.append(user, [f"{t}.{c}.{j}" for j in range(3)], timestamps=[t, c, 2])

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    items, times = store.history(user)
    assert len(items) == threads * calls * 3
    for start in range(0, len(items), 3):  # each call's events stayed together and in order
        t, c, _ = items[start].split(".")
        assert items[start:start + 3] == [f"{t}.{c}.{j}" for j in range(3)]
        assert times[start:start + 3] == [int(t), int(c), 2]
    for t in range(threads):  # and each thread's calls in the order it made them
        mine = [int(i.split(".")[1]) for i in items[::3] if i.startswith(f"{t}.")]
        assert mine == list(range(calls))


APPEND_THEN_WAIT = """
import sys, time
from serving.history_store import open_history_store
store = open_history_store(sys.argv[1])
for i in range(int(sys.argv[3])):
    store.append(sys.argv[2], [f"{sys.argv[2]}-{i}"], idempotency_key=str(i))
print("appended", flush=True)
time.sleep(60)
"""


def _appender(url, user, n):
    return subprocess.Popen([sys.executable, "-c", APPEND_THEN_WAIT, url, user, str(n)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)


def test_sqlite_keeps_what_append_returned_when_the_process_is_killed(tmp_path):
    url = f"sqlite:///{tmp_path / 'h.db'}"
    proc = _appender(url, "u", 3)
    assert proc.stdout.readline().strip() == "appended"
    stop(proc, signal.SIGKILL)  # no close, no clean shutdown
    with open_history_store(url) as store:
        assert store.history("u").item_ids == ["u-0", "u-1", "u-2"]
        assert store.append("u", ["u-2"], idempotency_key="2").duplicate


def test_sqlite_is_shared_by_processes_on_one_host(tmp_path):
    url = f"sqlite:///{tmp_path / 'h.db'}"
    procs = [_appender(url, user, 40) for user in ("p", "q")]
    with open_history_store(url) as store:
        for i in range(40):
            store.append("p", [f"main-{i}"])
        for proc in procs:
            assert proc.stdout.readline().strip() == "appended"
            stop(proc, signal.SIGKILL)
        assert store.history("q").item_ids == [f"q-{i}" for i in range(40)]
        assert sorted(store.history("p").item_ids) == sorted([f"p-{i}" for i in range(40)] + [f"main-{i}" for i in range(40)])


def test_sqlite_locked_beyond_the_timeout_is_unavailable(tmp_path):
    import sqlite3

    path = tmp_path / "h.db"
    with open_history_store(f"sqlite:///{path}", timeout_s=0.2) as store:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        with pytest.raises(HistoryStoreUnavailable, match=r"^history store .*h\.db: database is locked$"):
            store.append("u", ["a"])
        assert time.monotonic() - started < 2
        other.execute("ROLLBACK")
        assert store.append("u", ["a"]).appended == 1
        other.close()


def test_sqlite_writers_of_other_processes_wait_on_the_lock_file_up_to_the_timeout(tmp_path):
    """Processes sharing the file take turns on an flock of PATH.lock (woken within ms of its release, not
    after SQLite's busy sleeps of up to 100 ms); one holding it beyond the timeout makes appends unavailable."""
    import fcntl

    path = tmp_path / "h.db"
    with open_history_store(f"sqlite:///{path}", timeout_s=0.3) as store:
        with open(tmp_path / "h.db.lock", "ab") as other:
            fcntl.flock(other, fcntl.LOCK_EX)
            started = time.monotonic()
            with pytest.raises(HistoryStoreUnavailable, match=r"^history store .*h\.db: another process held the "
                                                              r"write lock for 0.3 s$"):
                store.append("u", ["a"])
            assert 0.3 <= time.monotonic() - started < 2
            threading.Timer(0.2, fcntl.flock, (other, fcntl.LOCK_UN)).start()
            started = time.monotonic()
            assert store.append("u", ["b"]).appended == 1  # waited, and went ahead once the other released it
            assert time.monotonic() - started >= 0.2
        assert store.history("u").item_ids == ["b"]


def test_a_redis_history_written_before_sequence_numbers_counts_from_zero(redis_url, user):
    """An events list without its first-number key (written by an earlier version) reads as numbered from 0,
    continues from its cursor, and a trim starts keeping the number."""
    import redis

    from serving.history_store import REDIS_PREFIX

    redis.Redis.from_url(redis_url).rpush(f"{REDIS_PREFIX}events:{user}", ":a", "5:b")
    with open_history_store(redis_url, max_events_per_user=3) as store:
        assert store.tail(user) == ((["a", "b"], [None, 5]), 0, (0, 2))
        later = store.append(user, ["c"], read_back=True, since=Cursor(0, 2)).tail
        assert later == ((["c"], [None]), 2, (0, 3))
        trimmed = store.append(user, ["d"], read_back=True, since=later.cursor).tail
        assert trimmed.whole and trimmed.events.item_ids == ["b", "c", "d"] and trimmed.cursor == (1, 4)


@needs_redis
def test_redis_aof_keeps_appends_older_than_a_second_when_the_server_is_killed(tmp_path):
    proc, url = start_redis(tmp_path)
    try:
        with open_history_store(url) as store:
            store.append("u", ["a", "b"], idempotency_key="k")
            time.sleep(1.5)  # appendfsync everysec: what was acknowledged over a second ago is on disk
        stop(proc, signal.SIGKILL)
        proc, url = start_redis(tmp_path)  # a new port, the same folder and AOF
        with open_history_store(url) as store:
            assert store.history("u").item_ids == ["a", "b"]
            assert store.append("u", ["a", "b"], idempotency_key="k").duplicate
    finally:
        stop(proc)


def test_redis_unreachable_is_unavailable_quickly():
    with open_history_store(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5) as store:
        started = time.monotonic()
        for call in (lambda: store.append("u", ["a"]), lambda: store.history("u"), lambda: store.delete("u")):
            with pytest.raises(HistoryStoreUnavailable, match=r"^history store redis://127\.0\.0\.1:\d+/0: ") as err:
                call()
            assert "\n" not in str(err.value)
        assert time.monotonic() - started < 2


def test_redis_that_never_answers_is_unavailable_after_the_timeout():
    with socket.socket() as silent:  # accepts connections (kernel backlog) and never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        with open_history_store(f"redis://:secret@127.0.0.1:{port}/0", timeout_s=0.3) as store:
            started = time.monotonic()
            with pytest.raises(HistoryStoreUnavailable) as err:
                store.append("u", ["a"])
            assert time.monotonic() - started < 2
            assert "secret" not in str(err.value) and ":***@" in str(err.value)


def test_a_closed_store_is_unavailable(store):
    store.close()
    with pytest.raises(HistoryStoreUnavailable, match="is closed"):
        store.history("u")


@pytest.mark.parametrize("url", [
    "histories.db", "mysql://db/x", "sqlite://", "sqlite:///", "sqlite://relative.db", "redis://",
    "redis://localhost:port/0", "redis://localhost:99999/0", "redis://localhost:6379/zero",
    "redis://:hunter2@localhost:6379/db",
])
def test_bad_urls_are_one_line_errors_naming_the_flag(url):
    with pytest.raises(InputError, match="^--history-store must be sqlite:///PATH or redis://HOST:PORT/DB") as err:
        open_history_store(url)
    assert "\n" not in str(err.value) and "hunter2" not in str(err.value)


def test_sqlite_paths_must_be_a_file_in_an_existing_folder(tmp_path):
    with pytest.raises(InputError, match="^--history-store: folder .*missing does not exist$"):
        open_history_store(f"sqlite:///{tmp_path / 'missing' / 'h.db'}")
    with pytest.raises(InputError, match="^--history-store: .* is a folder, give a file$"):
        open_history_store(f"sqlite:///{tmp_path}")
    relative = os.path.relpath(tmp_path / "rel.db")
    with open_history_store(f"sqlite:///{relative}") as store:  # three slashes: relative, as in SQLAlchemy
        store.append("u", ["a"])
    assert (tmp_path / "rel.db").is_file()


def test_bad_options_are_refused():
    with pytest.raises(InputError, match="^max_events_per_user must be at least 1, not 0$"):
        open_history_store("redis://localhost/0", max_events_per_user=0)
    with pytest.raises(InputError, match="^timeout_s must be positive"):
        open_history_store("redis://localhost/0", timeout_s=0)


@pytest.mark.parametrize("call, error", [
    (lambda s: s.append("", ["a"]), "^user_id: must be a non-empty string$"),
    (lambda s: s.append("u" * 300, ["a"]), "^user_id: longer than 256 characters$"),
    (lambda s: s.history(None), "^user_id: must be a non-empty string$"),
    (lambda s: s.delete(""), "^user_id: must be a non-empty string$"),
    (lambda s: s.append("u", []), "^item_ids: give at least one item id$"),
    (lambda s: s.append("u", "abc"), "^item_ids: give at least one item id$"),
    (lambda s: s.append("u", ["a", ""]), r"^item_ids\[1\]: must be a non-empty string$"),
    (lambda s: s.append("u", ["a", 7]), r"^item_ids\[1\]: must be a non-empty string$"),
    (lambda s: s.append("u", ["i" * 257]), r"^item_ids\[0\]: longer than 256 characters$"),
    (lambda s: s.append("u", ["a", "b"], timestamps=[1]), "^timestamps: 1 given for 2 item ids$"),
    (lambda s: s.append("u", ["a"], timestamps=[1.5]), r"^timestamps\[0\]: 1.5 is not a 64-bit integer$"),
    (lambda s: s.append("u", ["a"], timestamps=[2**63]), r"^timestamps\[0\]: \d+ is not a 64-bit integer$"),
    (lambda s: s.append("u", ["a"], idempotency_key=""), "^idempotency_key: must be a non-empty string$"),
])
def test_bad_input_is_a_one_line_error_naming_the_field(store, call, error):
    with pytest.raises(InputError, match=error):
        call(store)
    assert store.history("u") == ([], [])  # nothing half-appended


def test_an_append_beyond_luas_unpack_limit_is_stored_whole(store_url, user):
    items = [str(i) for i in range(9000)]  # Lua's unpack stops near 8000 values: the script pushes in chunks
    with open_history_store(store_url, max_events_per_user=10_000) as store:
        assert store.append(user, items).appended == 9000
        assert store.history(user).item_ids == items


def test_sqlite_writers_share_commits_and_a_failing_write_fails_alone(tmp_path, monkeypatch):
    """Group commit: appends queued while a commit (an fsync) runs are committed together by the next
    leader, in queue order; a write that fails inside a group is rolled back alone."""
    import sqlite3

    store = open_history_store(f"sqlite:///{tmp_path / 'h.db'}")
    groups = []
    commit = store._commit

    def slow_commit(group):  # a slow disk: every fsync takes 20 ms
        groups.append(len(group))
        time.sleep(0.02)
        commit(group)

    monkeypatch.setattr(store._writes, "_run_group", slow_commit)

    def writer(t):
        for i in range(10):
            assert store.append(f"user-{t % 3}", [f"{t}-{i}"]).appended == 1

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(groups) == 120 and max(groups) > 4 and len(groups) < 60  # many appends per commit
    for u in range(3):
        events = store.history(f"user-{u}").item_ids
        assert len(events) == 40
        for t in range(u, 12, 3):  # each writer's events in its order
            mine = [e for e in events if e.startswith(f"{t}-")]
            assert mine == [f"{t}-{i}" for i in range(10)]

    def broken(conn):
        raise sqlite3.OperationalError("disk I/O error")

    failed, ok = [], []
    gate = threading.Event()
    monkeypatch.setattr(store._writes, "_run_group", lambda group: (gate.wait(5), commit(group)))
    runners = [threading.Thread(target=lambda: failed.append(_error_of(store._write, broken)))]
    runners += [threading.Thread(target=lambda i=i: ok.append(store.append("user-ok", [str(i)]))) for i in range(3)]
    for r in runners:
        r.start()
    time.sleep(0.2)
    gate.set()
    for r in runners:
        r.join()
    assert isinstance(failed[0], HistoryStoreUnavailable) and "disk I/O error" in str(failed[0])
    assert len(ok) == 3 and sorted(store.history("user-ok").item_ids) == ["0", "1", "2"]
    store.close()


def _error_of(call, *args):
    try:
        call(*args)
    except Exception as exc:
        return exc
    return None
