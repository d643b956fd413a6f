"""Reliability of the live-history RPCs (issue 18): crashes, a store outage, concurrent writers, auth.

- ``kill -9`` of a ``sasrec serve`` process while appends are acknowledged (SQLite): after a restart on
  the same file every acknowledged event is there, once, in order.
- Redis stopped (SIGTERM, and SIGKILL) and restarted under load: calls during the outage answer
  UNAVAILABLE (never anything else), the server reconnects by itself, retries with the same
  idempotency key store each event exactly once; with SIGTERM nothing acknowledged is lost, with
  SIGKILL at most what ``appendfsync everysec`` allows (acknowledged in the last ~2 s before the kill).
- 8 clients appending to one user at once: no event lost or duplicated, each call's events contiguous,
  and the stored order respects acknowledgement order (acknowledged before another was sent → stored
  before it).
- Unknown item ids are stored verbatim and counted as unknown at scoring.
- With ``--auth-token-file`` every new RPC needs the token, and a refused call changes nothing.

``-s`` prints the measured figures (RELIABILITY.md, section Live histories).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from tests.serving.conftest import free_port, needs_redis, start_redis, start_server, stop
from tests.serving.helpers import item_names, same_answer

ROOT = Path(__file__).resolve().parents[2]
NAMES = item_names(40)


def report(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n[live-history reliability] {text}")


def channel_ready(port: int, timeout: float) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=timeout)


# -- kill -9 of the server (SQLite) -----------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_after_acknowledged_appends_keeps_them_sqlite(model_base, tmp_path, capsys):
    from serving.client import RecommenderClient

    url = f"sqlite:///{tmp_path / 'h.db'}"
    port = free_port()
    cmd = [sys.executable, "-m", "sasrec", "serve", "--model-base", str(model_base), "--port", str(port),
           "--metrics-port", "-1", "--history-store", url, "--poll-interval-s", "0.2"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    acked: dict[str, list[str]] = {"a": [], "b": []}
    sent: dict[str, list[str]] = {"a": [], "b": []}
    try:
        channel_ready(port, 90)
        client = RecommenderClient(f"127.0.0.1:{port}", timeout=5)
        # Two writers append one event per call as fast as they can; the kill lands between and during calls.
        stop_writing = threading.Event()

        def writer(user):
            i = 0
            while not stop_writing.is_set():
                event = f"{user}-{i}"
                sent[user].append(event)
                try:
                    client.append_events(user, [event], idempotency_key=str(i))
                except grpc.RpcError:
                    return  # the server died under this call: not acknowledged
                acked[user].append(event)
                i += 1

        threads = [threading.Thread(target=writer, args=(u,)) for u in acked]
        for t in threads:
            t.start()
        while min(len(v) for v in acked.values()) < 20:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # no shutdown, no close: right after the last acknowledgements
        proc.wait(10)
        stop_writing.set()
        for t in threads:
            t.join(10)
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # Restart on the same file (in-process: the same server code, without a second model load in a new process).
    srv = start_server(model_base, history_store=url, metrics_port=None)
    extra = 0
    try:
        with RecommenderClient(f"127.0.0.1:{srv.port}", timeout=10) as client:
            for user in acked:
                stored = [e.item_id for e in client.get_history(user).events]
                # Every acknowledged event, in order, once; at most the one call in flight at the kill beyond it.
                assert stored[:len(acked[user])] == acked[user]
                assert stored == sent[user][:len(stored)] and len(stored) - len(acked[user]) <= 1
                extra += len(stored) - len(acked[user])
                # The idempotency records survived too: a retry of the last acknowledged call appends nothing.
                last = len(acked[user]) - 1
                assert client.append_events(user, [acked[user][last]], idempotency_key=str(last)).duplicate
    finally:
        srv.stop(1)
    report(capsys, f"kill -9: acknowledged {sum(map(len, acked.values()))} events from 2 writers, "
                   f"all stored after restart; calls in flight at the kill: "
                   f"{sum(len(sent[u]) - len(acked[u]) for u in acked)}, of which stored anyway: {extra}")


# -- Redis outage under load ------------------------------------------------------------------------


@needs_redis
@pytest.mark.parametrize("how", ["sigterm", pytest.param("sigkill", marks=pytest.mark.slow)])
def test_redis_outage_under_load(model_base, tmp_path, capsys, how):
    """4 client threads append (one event per call, a key per event, retrying UNAVAILABLE with the same key)
    while Redis is stopped for ~2 s and started again on the same port and data folder."""
    from serving.client import RecommenderClient

    port = free_port()
    redis, url = start_redis(tmp_path, port)
    # A cap no writer reaches (a fast one passed the default 1,000 events): every acknowledged event stays.
    srv = start_server(model_base, history_store=url, history_store_timeout_s=0.5, metrics_port=None,
                       max_events_per_user=1_000_000)
    users = [f"load-{i}" for i in range(4)]
    acked = {u: [] for u in users}  # (event, acknowledged at)
    codes: dict[str, int] = {}
    lock = threading.Lock()
    first_ok_after_restart: list[float] = []
    restarted_at = [None]
    stop_writing = threading.Event()

    def writer(client, user):
        i = 0
        while not stop_writing.is_set():
            event = f"{user}-{i}"
            try:
                client.append_events(user, [event], idempotency_key=str(i), timeout=5)
            except grpc.RpcError as exc:
                with lock:
                    codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
                time.sleep(0.02)
                continue  # retry the same event with the same key
            now = time.monotonic()
            with lock:
                codes["OK"] = codes.get("OK", 0) + 1
                if restarted_at[0] is not None and not any(u == user for u, _ in first_ok_after_restart):
                    first_ok_after_restart.append((user, now - restarted_at[0]))
            acked[user].append((event, now))
            i += 1

    try:
        assert srv.wait_ready(60)
        clients = [RecommenderClient(f"127.0.0.1:{srv.port}", timeout=5) for _ in users]
        threads = [threading.Thread(target=writer, args=(c, u)) for c, u in zip(clients, users)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        killed_at = time.monotonic()
        stop(redis, signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        redis = None
        time.sleep(2.0)
        redis, _ = start_redis(tmp_path, port)
        restarted_at[0] = time.monotonic()
        outage = restarted_at[0] - killed_at
        time.sleep(1.5)
        stop_writing.set()
        for t in threads:
            t.join(15)
        assert not any(t.is_alive() for t in threads)

        assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
        assert codes.get("UNAVAILABLE", 0) > 0, "the outage was not seen"
        # Reconnected by itself: every writer got acknowledgements again after Redis came back.
        assert len(first_ok_after_restart) == len(users), first_ok_after_restart
        lost = {}
        for user in users:
            stored = [e.item_id for e in clients[0].get_history(user).events]
            assert len(stored) == len(set(stored)), f"{user}: duplicates stored"
            events = [e for e, _ in acked[user]]
            if how == "sigterm":  # a clean shutdown writes the AOF: nothing acknowledged is lost
                assert stored == events
                lost[user] = 0
            else:
                # The events still there are in order; missing ones were acknowledged within the fsync window.
                assert stored == [e for e in events if e in set(stored)]
                missing = [(e, t) for e, t in acked[user] if e not in set(stored)]
                assert all(killed_at - t < 2.0 for _, t in missing), [killed_at - t for _, t in missing]
                lost[user] = len(missing)
        for c in clients:
            c.close()
    finally:
        stop_writing.set()
        srv.stop(1)
        if redis is not None:
            stop(redis)
    total = sum(len(v) for v in acked.values())
    report(capsys, f"Redis {how} outage {outage:.2f} s under 4 writers: {codes.get('OK', 0)} OK, "
                   f"{codes.get('UNAVAILABLE', 0)} UNAVAILABLE, other codes: "
                   f"{ {k: v for k, v in codes.items() if k not in ('OK', 'UNAVAILABLE')} }; acknowledged {total}, "
                   f"lost {sum(lost.values())}; first OK after restart "
                   f"{max(t for _, t in first_ok_after_restart):.2f} s (slowest writer)")


# -- 8 concurrent writers on one user ------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'h.db'}"
    return request.getfixturevalue("redis_url")


def test_eight_clients_appending_to_one_user(model_base, store_url, capsys):
    from serving.client import RecommenderClient

    srv = start_server(model_base, history_store=store_url, metrics_port=None)
    user = f"shared-{time.monotonic_ns()}"
    calls = []  # (client, events, sent at, acknowledged at)
    lock = threading.Lock()
    barrier = threading.Barrier(8)
    try:
        assert srv.wait_ready(60)

        def writer(j):
            with RecommenderClient(f"127.0.0.1:{srv.port}", timeout=10) as client:
                barrier.wait()
                for i in range(15):
                    events = [f"c{j}-{i}-{n}" for n in range(1 + (i + j) % 3)]  # 1 to 3 events per call
                    sent = time.monotonic()
                    reply = client.append_events(user, events, idempotency_key=f"c{j}-{i}")
                    done = time.monotonic()
                    assert (reply.appended, reply.duplicate) == (len(events), False)
                    with lock:
                        calls.append((j, events, sent, done))

        errors = []

        def run(j):
            try:
                writer(j)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(j,)) for j in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        with RecommenderClient(f"127.0.0.1:{srv.port}", timeout=10) as client:
            stored = [e.item_id for e in client.get_history(user).events]
    finally:
        srv.stop(1)
    acknowledged = [e for _, events, _, _ in calls for e in events]
    assert len(calls) == 8 * 15
    assert sorted(stored) == sorted(acknowledged), "an event was lost or duplicated"
    position = {e: i for i, e in enumerate(stored)}
    for _, events, _, _ in calls:  # one call's events are contiguous and in order
        assert [position[e] for e in events] == list(range(position[events[0]], position[events[0]] + len(events)))
    for j in range(8):  # each client's own events keep their order
        mine = [e for e in stored if e.startswith(f"c{j}-")]
        assert mine == [e for c, events, _, _ in sorted(calls, key=lambda c: c[2]) if c == j for e in events]
    # Acknowledged before another call was sent -> stored before it (the order acknowledgements imply).
    violations = [(a[1][0], b[1][0]) for a in calls for b in calls
                  if a[3] < b[2] and position[a[1][0]] > position[b[1][0]]]
    assert not violations, violations[:5]
    overlapping = sum(1 for a in calls for b in calls if a is not b and a[2] < b[3] and b[2] < a[3]) // 2
    report(capsys, f"8 writers, one user ({store_url.split(':')[0]}): {len(calls)} calls, "
                   f"{len(acknowledged)} events acknowledged, {len(stored)} stored, 0 lost/duplicated, "
                   f"{overlapping} overlapping call pairs")


# -- unknown items ----------------------------------------------------------------------------------


def test_unknown_items_are_stored_and_counted_unknown_at_scoring(model_base, tmp_path):
    from serving.client import RecommenderClient

    srv = start_server(model_base, history_store=f"sqlite:///{tmp_path / 'h.db'}", metrics_port=None)
    odd = ["nope", "💥", "item-0001 ", "ITEM-0002", "<oov>", "a\x00b", "x" * 256]
    try:
        assert srv.wait_ready(60)
        with RecommenderClient(f"127.0.0.1:{srv.port}", timeout=10) as client:
            client.append_events("odd", [NAMES[3], *odd, NAMES[4]])
            assert [e.item_id for e in client.get_history("odd").events] == [NAMES[3], *odd, NAMES[4]]
            answer = client.recommend_for_user("odd", k=5)
            assert answer.recommendation.unknown_history_ids == len(odd)
            assert answer.history_length == len(odd) + 2 and not answer.recommendation.cold_start
            same_answer(answer.recommendation, client.recommend([NAMES[3], *odd, NAMES[4]], k=5))
            only_unknown = client.recommend_for_user("odd-only", k=3, item_ids=odd)
            assert only_unknown.recommendation.cold_start
            assert only_unknown.recommendation.unknown_history_ids == len(odd)
    finally:
        srv.stop(1)


# -- auth ---------------------------------------------------------------------------------------------


def test_auth_token_file_guards_every_new_rpc(model_base, tmp_path):
    from sasrec.cli import build_parser
    from serving.client import RecommenderClient
    from serving.server import RecommenderServer, config_from_args

    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    args = build_parser().parse_args([
        "serve", "--model-base", str(model_base), "--port", "0", "--metrics-port", "-1",
        "--history-store", f"sqlite:///{tmp_path / 'h.db'}", "--auth-token-file", str(token_file),
        "--cpu-scheduling", "default", "--intra-op-threads", "0", "--inter-op-threads", "0"])
    config = config_from_args(args)
    assert config.auth_token == "s3cret-token"
    srv = RecommenderServer(config).start()
    target = f"127.0.0.1:{srv.port}"
    try:
        assert srv.wait_ready(60)
        good = RecommenderClient(target, token="s3cret-token", timeout=10)
        good.append_events("victim", NAMES[:3], idempotency_key="k")
        calls = {
            "AppendEvents": lambda c: c.append_events("victim", ["injected"]),
            "RecommendForUser": lambda c: c.recommend_for_user("victim", k=3, item_ids=["injected"]),
            "GetHistory": lambda c: c.get_history("victim"),
            "DeleteUser": lambda c: c.delete_user("victim"),
        }
        bad_clients = [RecommenderClient(target, timeout=10), RecommenderClient(target, token="wrong", timeout=10),
                       RecommenderClient(target, token="s3cret-token ", timeout=10)]
        for client in bad_clients:
            for name, call in calls.items():
                with pytest.raises(grpc.RpcError) as err:
                    call(client)
                assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED, name
        # Raw metadata tricks: the health service's open prefix, a wrong scheme, the token twice (wrong first).
        with grpc.insecure_channel(target) as channel:
            from sasrec.v1 import recommender_pb2

            delete = channel.unary_unary("/sasrec.v1.Recommender/DeleteUser",
                                         request_serializer=recommender_pb2.DeleteUserRequest.SerializeToString,
                                         response_deserializer=recommender_pb2.DeleteUserResponse.FromString)
            for metadata in ([("authorization", "s3cret-token")], [("authorization", "Basic s3cret-token")],
                             [("authorization", "Bearer wrong"), ("authorization", "Bearer s3cret-token")]):
                with pytest.raises(grpc.RpcError) as err:
                    delete(recommender_pb2.DeleteUserRequest(user_id="victim"), metadata=metadata, timeout=10)
                assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
            sneaky = channel.unary_unary("/grpc.health.v1.Health/DeleteUser",
                                         request_serializer=recommender_pb2.DeleteUserRequest.SerializeToString,
                                         response_deserializer=recommender_pb2.DeleteUserResponse.FromString)
            with pytest.raises(grpc.RpcError) as err:
                sneaky(recommender_pb2.DeleteUserRequest(user_id="victim"), timeout=10)
            assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
        # Nothing refused reached the store.
        assert [e.item_id for e in good.get_history("victim").events] == NAMES[:3]
        assert good.recommend_for_user("victim", k=3).history_length == 3
        assert good.delete_user("victim").deleted
        assert [e.item_id for e in good.get_history("victim").events] == []
        for client in [good, *bad_clients]:
            client.close()
    finally:
        srv.stop(1)
