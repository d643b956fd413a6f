"""Cached attention states behind RecommendForUser: exact answers, bounded memory, erasure, new versions."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

from sasrec.recommender import AttentionState
from serving.history_store import Cursor
from serving.state_cache import ENTRY_OVERHEAD_BYTES, StateCache
from tests.serving.conftest import start_server
from tests.serving.helpers import item_names, make_run, same_answer

NAMES = item_names(40)
MAXLEN = 12
AT = Cursor(0, 1)


def fake_state(length: int, version: int = 1) -> AttentionState:
    keys = np.zeros((2, length, 1, 16), np.float32)
    return AttentionState(version, keys, keys.copy(), np.zeros(16, np.float32), np.zeros(length, np.int32), 0)


def test_the_cache_stays_within_its_byte_budget_dropping_the_least_recently_used():
    one = fake_state(10).nbytes + ENTRY_OVERHEAD_BYTES
    cache = StateCache(max_bytes=3 * one + 10)
    for user in "abc":
        assert cache.put(user, fake_state(10), AT, cache.begin())
    cache.get("a")  # a is now the most recently used
    cache.put("d", fake_state(10), AT, cache.begin())
    assert len(cache) == 3 and cache.nbytes == 3 * one <= cache.max_bytes
    assert cache.get("b") is None and cache.get("a") is not None
    assert not cache.put("huge", fake_state(200), AT, cache.begin())  # alone larger than the budget
    cache.put("a", fake_state(20), AT, cache.begin())  # a larger state for a: the oldest other one goes
    assert cache.nbytes == one + fake_state(20).nbytes + ENTRY_OVERHEAD_BYTES <= cache.max_bytes
    assert cache.get("c") is None and cache.get("d") is not None


def test_a_state_is_kept_with_the_cursor_of_the_history_it_was_computed_from():
    cache = StateCache(max_bytes=10**6)
    state = fake_state(3)
    cache.put("u", state, Cursor(7, 10), cache.begin())
    assert cache.get("u").state is state and cache.get("u").cursor == (7, 10)
    assert cache.get("v") is None


def test_a_state_computed_before_an_erasure_is_not_kept():
    cache = StateCache(max_bytes=10**6)
    before = cache.begin()
    cache.put("u", fake_state(3), AT, before)
    cache.evict("u")
    assert len(cache) == 0 and cache.nbytes == 0
    assert not cache.put("u", fake_state(3), AT, before)  # a call that read the store before the erasure
    assert cache.put("u", fake_state(3), AT, cache.begin())


@pytest.fixture(scope="module")
def from_start_base(tmp_path_factory):
    from sasrec.export import export_run

    run = make_run(tmp_path_factory.mktemp("run") / "run", maxlen=MAXLEN, positions="from_start", seed=3)
    base = tmp_path_factory.mktemp("models") / "from-start"
    export_run(run, base)
    return base


def outcomes(srv) -> dict:
    get = srv.metrics.registry.get_sample_value
    return {o: get("sasrec_state_requests_total", {"outcome": o}) or 0
            for o in ("continued", "miss", "new_version", "positions_from_end", "window_full")}




@pytest.fixture
def live_server(from_start_base, tmp_path):
    from serving.client import RecommenderClient

    def start(base=from_start_base, **overrides):
        srv = start_server(base, history_store=f"sqlite:///{tmp_path / 'h.db'}", **{"state_cache_mb": 64, **overrides})
        assert srv.wait_ready(60)
        servers.append(srv)
        client = RecommenderClient(f"127.0.0.1:{srv.port}", timeout=10)
        clients.append(client)
        return srv, client

    servers, clients = [], []
    yield start
    for client in clients:
        client.close()
    for srv in servers:
        srv.stop(1)


def batched_requests(srv) -> float:
    return srv.metrics.registry.get_sample_value("sasrec_batch_size_sum") or 0


@pytest.mark.parametrize("live_compute", ["numpy", "signature"])
def test_states_are_continued_event_by_event_and_answer_as_recommend(live_server, live_compute):
    srv, client = live_server(live_compute=live_compute)
    assert (srv.store.get().host is None) == (live_compute == "signature")
    rng = np.random.default_rng(5)
    recommends = 0
    histories = {f"user-{u}": [] for u in range(5)}
    for _ in range(10):
        for user, history in histories.items():
            new = [NAMES[i] for i in rng.integers(0, 40, int(rng.integers(0, 4)))]
            new += ["unknown-id"] if rng.random() < 0.2 else []
            k, exclude = int(rng.integers(1, 20)), [NAMES[int(rng.integers(0, 40))]]
            answer = client.recommend_for_user(user, k=k, item_ids=new, exclude_item_ids=exclude)
            history += new
            assert answer.history_length == len(history)
            same_answer(answer.recommendation, client.recommend(history, k=k, exclude_item_ids=exclude))
            repeat = client.recommend_for_user(user, k=7)  # nothing new: answered from the state
            same_answer(repeat.recommendation, client.recommend(history, k=7))
            recommends += 2
    # In numpy, RecommendForUser is answered in its own thread: only the Recommend calls reach the batcher.
    assert (batched_requests(srv) == recommends) == (live_compute == "numpy")
    counts = outcomes(srv)
    # Each user: one miss, then continued until the known items pass maxlen (12), then re-encoded.
    assert counts["miss"] == len(histories) and counts["continued"] > 30 and counts["window_full"] >= 1
    assert counts["new_version"] == counts["positions_from_end"] == 0
    assert len(srv.states) == len(histories) and srv.states.nbytes > 0


def test_answers_with_exclusions_and_k_equal_recommend(live_server):
    _, client = live_server()
    rng = np.random.default_rng(6)
    history = []
    for step in range(8):
        new = [NAMES[i] for i in rng.integers(0, 40, 2)]
        history += new
        k = int(rng.integers(1, 30))
        exclude = [NAMES[i] for i in rng.integers(0, 40, 3)]
        for exclude_seen in (True, False):
            answer = client.recommend_for_user("u", k=k, item_ids=new if exclude_seen else [],
                                               exclude_seen=exclude_seen, exclude_item_ids=exclude)
            same_answer(answer.recommendation,
                        client.recommend(history, k=k, exclude_seen=exclude_seen, exclude_item_ids=exclude))


def test_delete_user_drops_the_cached_state(live_server):
    srv, client = live_server()
    client.recommend_for_user("gone", k=3, item_ids=NAMES[5:9])
    assert len(srv.states) == 1
    assert client.delete_user("gone").deleted
    assert len(srv.states) == 0 and srv.states.nbytes == 0
    answer = client.recommend_for_user("gone", k=3)
    assert answer.recommendation.cold_start and answer.history_length == 0


@pytest.mark.parametrize("live_compute", ["numpy", "signature"])
def test_trims_and_another_processs_writes_and_erasures_are_read_whole_and_answered_exactly(
        live_server, tmp_path, live_compute):
    """The server reads only what a state has not seen, by its cursor; events dropped by the cap, appends by
    another process (here another store object on the same file) and an erasure followed by new events there
    make the store send the whole history instead. Every answer equals Recommend on the stored history."""
    from serving.history_store import open_history_store

    srv, client = live_server(live_compute=live_compute, max_events_per_user=16)
    other = open_history_store(f"sqlite:///{tmp_path / 'h.db'}", max_events_per_user=16)
    rng = np.random.default_rng(11)

    def check(answer):
        stored = other.history("u").item_ids
        assert answer.history_length == len(stored)
        same_answer(answer.recommendation, client.recommend(stored, k=8))

    try:
        for step in range(30):
            new = [NAMES[i] for i in rng.integers(0, 40, int(rng.integers(1, 3)))]
            check(client.recommend_for_user("u", k=8, item_ids=new))
            if step % 7 == 3:
                other.append("u", [NAMES[int(rng.integers(0, 40))]])
                check(client.recommend_for_user("u", k=8))
            if step == 12:  # erased and begun again elsewhere: this server's state is of the old history
                other.delete("u")
                other.append("u", NAMES[:3])
                check(client.recommend_for_user("u", k=8))
    finally:
        other.close()
    counts = outcomes(srv)
    # The history reaches the cap (16 events) around step 10: from then on each append drops events.
    assert counts["continued"] >= 8 and counts["miss"] >= 15, counts


def test_a_new_model_version_never_answers_from_the_old_versions_states(live_server, from_start_base, tmp_path):
    from sasrec.export import export_run

    base = tmp_path / "models"
    shutil.copytree(from_start_base, base)
    srv, client = live_server(base)
    for user in ("a", "b"):
        client.recommend_for_user(user, k=5, item_ids=NAMES[3:7])
    export_run(make_run(tmp_path / "run2", maxlen=MAXLEN, positions="from_start", seed=9), base)
    deadline = time.monotonic() + 30
    while srv.store.version != 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert srv.store.version == 2
    for user in ("a", "b"):
        answer = client.recommend_for_user(user, k=5, item_ids=[NAMES[8]])
        assert answer.recommendation.model_version == 2
        same_answer(answer.recommendation, client.recommend(NAMES[3:7] + [NAMES[8]], k=5))
    assert all(entry.state.version == 2 for entry in srv.states._entries.values())


def test_the_state_cache_is_bounded_by_its_flag_and_can_be_off(live_server):
    srv, client = live_server(state_cache_mb=0.01)  # 10 KiB: two or three states of this model
    for u in range(8):
        client.recommend_for_user(f"user-{u}", k=3, item_ids=NAMES[u : u + 10])
    assert 0 < len(srv.states) < 8 and srv.states.nbytes <= 0.01 * 2**20
    off, off_client = live_server(state_cache_mb=0)
    assert off.states is None
    answer = off_client.recommend_for_user("user-0", k=3)
    same_answer(answer.recommendation, off_client.recommend(NAMES[0:10], k=3))


@pytest.mark.slow
def test_two_processes_sharing_a_redis_store_continue_each_others_histories_exactly(from_start_base, redis_url):
    """`--processes 2` and Redis: appends made through either process reach the other, whose cached state
    of the user is continued by the events it did not see (or rebuilt): every answer still equals the
    stateless one for the whole stored history."""
    import os
    import subprocess
    import sys

    from sasrec.recommender import Recommender
    from serving.client import RecommenderClient
    from tests.serving.test_processes import established_on, scrape, version_by_pid, wait_for
    from tests.serving.test_sigterm import ROOT, free_port

    port, metrics_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "sasrec", "serve", "--model-base", str(from_start_base), "--port", str(port),
           "--metrics-port", str(metrics_port), "--processes", "2", "--history-store", redis_url,
           "--state-cache-mb", "64"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reference = Recommender.load(from_start_base)
    clients = []
    try:
        def both_serving():
            try:
                return list(version_by_pid(scrape(metrics_port)).values()) == [1.0, 1.0]
            except OSError:
                return False

        wait_for(both_serving, 120, "two processes serving", proc)
        pids = version_by_pid(scrape(metrics_port))
        # The kernel spreads connections, not calls: connect until both processes hold one (at least 8).
        while len(clients) < 8 or not all(established_on(port, pid) >= 1 for pid in pids):
            assert len(clients) < 64, "64 connections all reached one process"
            clients.append(RecommenderClient(f"127.0.0.1:{port}", timeout=10, own_connection=True))
            clients[-1].get_history("shared-user")  # connect
        rng = np.random.default_rng(8)
        history = []
        for step in range(24):
            new = [NAMES[i] for i in rng.integers(0, 40, int(rng.integers(1, 3)))]
            answer = clients[int(rng.integers(0, len(clients)))].recommend_for_user("shared-user", k=6, item_ids=new)
            history += new
            expected = reference.recommend(history, k=6)
            assert [i.item_id for i in answer.recommendation.items] == expected.item_ids, step
            np.testing.assert_allclose([i.score for i in answer.recommendation.items],
                                       [s for _, s in expected.items], atol=1e-4)
        text = scrape(metrics_port)
        continued = float(text.split('sasrec_state_requests_total{outcome="continued"} ')[1].split()[0])
        assert continued > 5  # the states were used, not only rebuilt
    finally:
        for client in clients:
            client.close()
        proc.terminate()
        proc.wait(30)


def test_numpy_steps_of_a_group_run_per_model_and_a_failing_request_fails_alone():
    """RecommendForUser's queued numpy steps share one pass per model version (a hot swap can mix two in a
    group); when a pass fails, each request runs alone, so only the bad one gets the error."""
    from serving.combining import Entry
    from serving.servicer import RecommenderServicer

    class Model:
        def __init__(self, name):
            self.name, self.passes = name, []

        def recommend_stored(self, requests):
            self.passes.append([r[0] for r in requests])
            if any(r[0] == "bad" for r in requests):
                raise ValueError("k is out of range for this version")
            return [(self.name, r[0]) for r in requests]

    old, new = Model("old"), Model("new")
    entries = [Entry((old, "a")), Entry((new, "b")), Entry((old, "bad")), Entry((old, "c")), Entry((new, "d"))]
    RecommenderServicer._run_host_steps(entries)
    assert [e.result for e in entries] == [("old", "a"), ("new", "b"), None, ("old", "c"), ("new", "d")]
    assert isinstance(entries[2].error, ValueError) and all(e.error is None for e in entries if e is not entries[2])
    assert old.passes == [["a", "bad", "c"], ["a"], ["bad"], ["c"]] and new.passes == [["b", "d"]]
