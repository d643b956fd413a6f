"""Live histories over gRPC (AppendEvents, RecommendForUser, GetHistory, DeleteUser) on both store backends.

RecommendForUser must answer exactly what Recommend answers for the stored history; errors keep the
contract (INVALID_ARGUMENT / RESOURCE_EXHAUSTED naming the field, FAILED_PRECONDITION without a store,
UNAVAILABLE while the store is down; never INTERNAL).
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from pipelines.errors import InputError
from tests.serving.conftest import free_port, needs_redis, start_redis, start_server, stop
from tests.serving.helpers import item_names, same_answer

NAMES = item_names(40)
LIMITS = dict(max_events_per_user=30, max_events_per_append=50, max_id_length=32)


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def live(request, model_base, tmp_path_factory):
    """``(server, client)`` with a history store of each backend and small limits."""
    from serving.client import RecommenderClient

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('histories') / 'h.db'}"
    else:
        url = request.getfixturevalue("redis_url")
    srv = start_server(model_base, history_store=url, **LIMITS)
    assert srv.wait_ready(60)
    with RecommenderClient(f"127.0.0.1:{srv.port}", timeout=10) as client:
        yield srv, client
    srv.stop(1)


@pytest.fixture
def user(request) -> str:
    return f"u-{request.node.name}"[:32]


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def events(response) -> list[tuple[str, int | None]]:
    return [(e.item_id, e.timestamp if e.HasField("timestamp") else None) for e in response.events]


def test_appended_events_come_back_oldest_first(live, user):
    _, client = live
    assert events(client.get_history(user)) == []
    reply = client.append_events(user, NAMES[:2], timestamps=[100, 101])
    assert (reply.appended, reply.duplicate, reply.dropped) == (2, False, 0)
    client.append_events(user, [NAMES[5], "not-in-the-model"])
    assert events(client.get_history(user)) == [(NAMES[0], 100), (NAMES[1], 101), (NAMES[5], None),
                                                ("not-in-the-model", None)]


def test_a_retry_with_the_same_key_appends_nothing_twice(live, user):
    _, client = live
    assert client.append_events(user, NAMES[:3], idempotency_key="k1").appended == 3
    retry = client.append_events(user, NAMES[:3], idempotency_key="k1")
    assert (retry.appended, retry.duplicate) == (0, True)
    err = rpc_error(lambda: client.append_events(user, NAMES[3:4], idempotency_key="k1"))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("idempotency_key: ")
    assert [e.item_id for e in client.get_history(user).events] == NAMES[:3]


def test_recommend_for_user_equals_recommend_with_the_stored_history(live, user):
    _, client = live
    rng = np.random.default_rng(7)
    for u in range(6):
        uid = f"{user[:28]}-{u}"
        history = []
        for _ in range(int(rng.integers(1, 4))):
            new = [NAMES[i] for i in rng.integers(0, 40, int(rng.integers(1, 12)))]
            new += ["unknown-id"] if rng.random() < 0.3 else []
            client.append_events(uid, new)
            history += new
        assert [e.item_id for e in client.get_history(uid).events] == history
        exclude = [NAMES[i] for i in rng.integers(0, 40, 2)]
        for exclude_seen in (True, False):
            k = int(rng.integers(1, 41))
            answer = client.recommend_for_user(uid, k=k, exclude_seen=exclude_seen, exclude_item_ids=exclude)
            direct = client.recommend(history, k=k, exclude_seen=exclude_seen, exclude_item_ids=exclude)
            same_answer(answer.recommendation, direct)  # item for item, score for score (cached states: 1e-4)
            assert answer.history_length == len(history) and not answer.HasField("append")
            assert not direct.cold_start


def test_one_call_appends_the_new_events_and_answers_with_them(live, user):
    _, client = live
    client.append_events(user, NAMES[10:14])
    answer = client.recommend_for_user(user, k=5, item_ids=NAMES[20:22], timestamps=[1, 2], idempotency_key="e1")
    assert (answer.append.appended, answer.append.duplicate, answer.history_length) == (2, False, 6)
    same_answer(answer.recommendation, client.recommend(NAMES[10:14] + NAMES[20:22], k=5))
    assert not {i.item_id for i in answer.recommendation.items} & set(NAMES[20:22])
    retry = client.recommend_for_user(user, k=5, item_ids=NAMES[20:22], timestamps=[1, 2], idempotency_key="e1")
    assert retry.append.duplicate and retry.history_length == 6
    assert retry.recommendation == answer.recommendation


def test_delete_erases_and_the_next_recommendation_is_a_cold_start(live, user):
    _, client = live
    client.append_events(user, NAMES[30:35], idempotency_key="k")
    assert client.delete_user(user).deleted
    assert events(client.get_history(user)) == []
    assert not client.delete_user(user).deleted
    answer = client.recommend_for_user(user, k=3)
    assert answer.recommendation.cold_start and answer.history_length == 0
    assert [i.item_id for i in answer.recommendation.items] == NAMES[:3]  # the helper's popularity order
    assert client.append_events(user, NAMES[30:35], idempotency_key="k").appended == 5  # the key went too


def test_the_per_user_cap_keeps_the_newest_and_counts_the_dropped(live, user):
    srv, client = live
    metric = srv.metrics.registry.get_sample_value
    dropped_before = metric("sasrec_history_events_dropped_total")
    appended_before = metric("sasrec_history_events_appended_total")
    items = [NAMES[i % 40] for i in range(45)]
    assert client.append_events(user, items[:25]).dropped == 0
    assert client.append_events(user, items[25:]).dropped == 15
    assert [e.item_id for e in client.get_history(user).events] == items[15:]
    assert metric("sasrec_history_events_dropped_total") - dropped_before == 15
    assert metric("sasrec_history_events_appended_total") - appended_before == 45


@pytest.mark.parametrize("call, code, message", [
    (lambda c: c.append_events("u", ["a"] * 51), "RESOURCE_EXHAUSTED", "item_ids: 51 events in one call, the limit is 50"),
    (lambda c: c.recommend_for_user("u", item_ids=["a"] * 51), "RESOURCE_EXHAUSTED", "item_ids: 51 events"),
    (lambda c: c.append_events("u", ["a", "x" * 33]), "INVALID_ARGUMENT", "item_ids[1]: longer than 32 characters"),
    (lambda c: c.append_events("", ["a"]), "INVALID_ARGUMENT", "user_id: must be a non-empty string"),
    (lambda c: c.get_history("u" * 33), "INVALID_ARGUMENT", "user_id: longer than 32 characters"),
    (lambda c: c.delete_user(""), "INVALID_ARGUMENT", "user_id: must be a non-empty string"),
    (lambda c: c.append_events("u", []), "INVALID_ARGUMENT", "item_ids: give at least one item id"),
    (lambda c: c.append_events("u", ["a", "b"], timestamps=[1]), "INVALID_ARGUMENT", "timestamps: 1 given for 2"),
    (lambda c: c.append_events("u", ["a"], idempotency_key="k" * 33), "INVALID_ARGUMENT", "idempotency_key: longer"),
    (lambda c: c.recommend_for_user("u", timestamps=[1]), "INVALID_ARGUMENT", "item_ids: give at least one"),
    (lambda c: c.recommend_for_user("u", k=41, item_ids=["a"]), "INVALID_ARGUMENT", "k must be in 1..40, got 41"),
    (lambda c: c.recommend_for_user("u", exclude_item_ids=["x" * 2000]), "INVALID_ARGUMENT", "exclude_item_ids[0]"),
])
def test_refused_calls_name_the_field_and_store_nothing(live, call, code, message):
    _, client = live
    err = rpc_error(lambda: call(client))
    assert err.code().name == code and err.details().startswith(message), err.details()
    assert "\n" not in err.details()
    assert events(client.get_history("u")) == []


def test_without_a_store_the_calls_are_failed_precondition(client):
    for call in (lambda: client.append_events("u", ["a"]), lambda: client.recommend_for_user("u"),
                 lambda: client.get_history("u"), lambda: client.delete_user("u")):
        err = rpc_error(call)
        assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "start it with --history-store sqlite:///" in err.details()
    assert len(client.recommend(NAMES[:3], k=3).items) == 3  # stateless Recommend is unaffected


def test_a_store_that_cannot_be_opened_stops_the_server_naming_the_flag(model_base, tmp_path):
    with pytest.raises(InputError, match="^--history-store: folder .* does not exist$"):
        start_server(model_base, history_store=f"sqlite:///{tmp_path / 'missing' / 'h.db'}")


@needs_redis
def test_redis_down_answers_unavailable_until_it_is_back(model_base, tmp_path):
    from serving.client import RecommenderClient

    port = free_port()
    srv = start_server(model_base, history_store=f"redis://127.0.0.1:{port}/0", history_store_timeout_s=0.5)
    redis = None
    try:
        assert srv.wait_ready(60)  # Redis is not running: the server starts all the same
        client = RecommenderClient(f"127.0.0.1:{srv.port}", timeout=10)
        calls = (lambda: client.append_events("u", ["a"], idempotency_key="k"), lambda: client.recommend_for_user("u"),
                 lambda: client.get_history("u"), lambda: client.delete_user("u"))
        for call in calls:
            started = time.monotonic()
            err = rpc_error(call)
            assert err.code() is grpc.StatusCode.UNAVAILABLE and err.details().startswith("history store redis://")
            assert time.monotonic() - started < 3
        errors = srv.metrics.registry.get_sample_value
        assert errors("sasrec_history_store_errors_total", {"method": "AppendEvents"}) == 1
        redis, _ = start_redis(tmp_path, port)
        assert client.append_events("u", ["a"], idempotency_key="k").appended == 1
        assert client.recommend_for_user("u", k=2).history_length == 1
        stop(redis)
        redis = None
        assert rpc_error(lambda: client.recommend_for_user("u", k=2)).code() is grpc.StatusCode.UNAVAILABLE
        client.close()
    finally:
        if redis is not None:
            stop(redis)
        srv.stop(1)


def test_cli_recommend_for_a_stored_user(live, user, capsys):
    from sasrec.cli import main

    srv, client = live
    target = ["recommend", "--target", f"127.0.0.1:{srv.port}", "--user", user, "-k", "4"]
    assert main([*target, "--append", ",".join(NAMES[:3]), "--idempotency-key", "cli-1"]) == 0
    out = capsys.readouterr().out
    assert "model tiny v1" in out and f"user {user}: 3 stored events, 3 appended" in out
    assert len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) == 4
    assert main([*target, "--append", ",".join(NAMES[:3]), "--idempotency-key", "cli-1"]) == 0
    assert "0 appended (a retry: nothing appended twice)" in capsys.readouterr().out
    assert main([*target, "--history", "a"]) == 2
    assert "--history and --user: give one" in capsys.readouterr().err
    assert [e.item_id for e in client.get_history(user).events] == NAMES[:3]


def test_recommend_for_user_with_explain_explains_the_stored_history(live, user):
    _, client = live
    client.append_events(user, NAMES[3:8])
    plain = client.recommend_for_user(user, k=5).recommendation
    explained = client.recommend_for_user(user, k=5, item_ids=[NAMES[9]], explain=True).recommendation
    assert explained == client.recommend(NAMES[3:8] + [NAMES[9]], k=5, explain=True)
    assert explained.explain_method and all(len(item.explanation) == 3 for item in explained.items)
    assert {c.item_id for item in explained.items for c in item.explanation} <= set(NAMES[3:10])
    # Without explain the answer carries none, and the stored history was used either way.
    again = client.recommend_for_user(user, k=5).recommendation
    assert not again.explain_method and not any(item.explanation for item in again.items)
    assert [i.item_id for i in plain.items] != []
    same_answer(again, client.recommend(NAMES[3:8] + [NAMES[9]], k=5))
