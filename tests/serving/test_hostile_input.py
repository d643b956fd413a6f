"""Hostile input to ``Recommend``: property-based fuzzing against a live in-process server.

Whatever a client sends (random unicode ids, empty strings, 1 MB ids, empty or 100,000-id histories,
huge, negative or zero ``k``, duplicates, exclusion lists), the answer is OK, INVALID_ARGUMENT or
RESOURCE_EXHAUSTED (never INTERNAL, UNKNOWN or UNAVAILABLE), an OK answer obeys the contract, and
the server still answers a normal request afterwards.

The server here accepts requests up to 4 MiB (``--max-message-bytes``) so that 100,000-id
histories of real item ids reach the model; bigger requests must be RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sasrec.v1 import recommender_pb2, recommender_pb2_grpc
from serving.servicer import MAX_ID_BYTES
from tests.serving.conftest import start_server
from tests.serving.helpers import item_names

NAMES = item_names(40)
KNOWN = set(NAMES)
MAX_MESSAGE = 4 << 20
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
CASES = {"run": 0}
OUTCOMES: dict[str, int] = {}

# Text that protobuf can carry: any code point except lone surrogates.
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
ONE_ID = st.one_of(
    st.sampled_from(NAMES),
    TEXT,
    st.just(""),
    st.sampled_from(["<oov>", "\x00", "item-0000\x00", " item-0001", "ITEM-0002", "💥" * 300]),
    st.integers(MAX_ID_BYTES - 2, MAX_ID_BYTES + 2).map(lambda n: "é" * n),  # around the id limit (characters)
)


@st.composite
def id_lists(draw, max_small: int = 60):
    """Small random lists, or big ones built from a drawn recipe (hypothesis cannot draw 100,000 items fast)."""
    kind = draw(st.sampled_from(["small", "small", "small", "empty", "huge-known", "huge-short", "huge-mixed",
                                 "one-mb-id", "many-mb-ids"]))
    if kind == "small":
        return draw(st.lists(ONE_ID, max_size=max_small))
    if kind == "empty":
        return []
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    n = draw(st.sampled_from([1_000, 20_000, 100_000]))
    if kind == "huge-known":  # real ids, duplicates galore: 100,000 x 11 bytes is above 1 MiB, below 4 MiB
        return [NAMES[i] for i in rng.integers(0, 40, n)]
    if kind == "huge-short":
        return [str(i) for i in rng.integers(0, 1000, n)]
    if kind == "huge-mixed":
        pool = NAMES + ["", "x", "ü", "<oov>"]
        return [pool[i] for i in rng.integers(0, len(pool), n)]
    size = draw(st.sampled_from([1 << 20, (1 << 20) + 7]))
    return ["x" * size] * (1 if kind == "one-mb-id" else draw(st.integers(2, 5)))


@st.composite
def requests(draw):
    fields = dict(history=draw(id_lists()), user_id=draw(st.one_of(TEXT, st.just("u" * 5000))))
    if draw(st.booleans()):
        fields["exclude_item_ids"] = draw(id_lists(max_small=20))
    k = draw(st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1), st.integers(-2, 45),
                       st.sampled_from([0, 1, 40, 41, 2**31 - 1, -(2**31)])))
    if k is not None:
        fields["k"] = k
    exclude_seen = draw(st.sampled_from([None, True, False]))
    if exclude_seen is not None:
        fields["exclude_seen"] = exclude_seen
    return recommender_pb2.RecommendRequest(**fields)


@pytest.fixture(scope="module")
def fuzz_server(model_base):
    srv = start_server(model_base, max_message_bytes=MAX_MESSAGE, metrics_port=None)
    assert srv.wait_ready(60)
    yield srv
    srv.stop(1)


@pytest.fixture(scope="module")
def stub(fuzz_server):
    # The client may send far more than the server accepts: the server's limit is what is under test.
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(f"127.0.0.1:{fuzz_server.port}", options=options) as channel:
        yield recommender_pb2_grpc.RecommenderStub(channel)


def expected_status(request) -> set:
    """The codes a correct server may answer (a set: near the size limit either answer is right)."""
    size = request.ByteSize()
    if size > MAX_MESSAGE + 64:
        return {grpc.StatusCode.RESOURCE_EXHAUSTED}
    k = request.k if request.HasField("k") else 10
    too_long = any(len(x) > MAX_ID_BYTES for x in [*request.history, *request.exclude_item_ids])
    answer = grpc.StatusCode.INVALID_ARGUMENT if (not 1 <= k <= 40 or too_long) else grpc.StatusCode.OK
    return {answer} | ({grpc.StatusCode.RESOURCE_EXHAUSTED} if size > MAX_MESSAGE - 64 else set())


def check_ok_response(request, response) -> None:
    k = request.k if request.HasField("k") else 10
    exclude_seen = request.exclude_seen if request.HasField("exclude_seen") else True
    ids = [item.item_id for item in response.items]
    scores = [item.score for item in response.items]
    assert len(ids) <= k and len(set(ids)) == len(ids)
    assert set(ids) <= KNOWN, "only real item ids are ever returned"
    assert not set(ids) & set(request.exclude_item_ids)
    if exclude_seen:
        assert not set(ids) & set(request.history)
    assert scores == sorted(scores, reverse=True) and all(np.isfinite(scores))
    assert response.unknown_history_ids == sum(1 for h in request.history if h and h not in KNOWN)
    assert response.cold_start == (not any(h in KNOWN for h in request.history))
    removed = (set(request.history) & KNOWN if exclude_seen else set()) | (set(request.exclude_item_ids) & KNOWN)
    assert len(ids) == min(k, 40 - len(removed))  # as many as asked for while candidates remain


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=requests())
def test_recommend_fuzz_never_internal(stub, request):
    CASES["run"] += 1
    try:
        response = stub.Recommend(request, timeout=30)
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code, response = exc.code(), None
        assert code in ALLOWED, (code, exc.details())
        assert exc.details(), "every error names its cause"
    OUTCOMES[code.name] = OUTCOMES.get(code.name, 0) + 1
    assert code in expected_status(request), (code, request.ByteSize(), request.k if request.HasField("k") else None)
    if response is not None:
        check_ok_response(request, response)


def test_server_alive_after_fuzzing(stub, fuzz_server, capsys):
    """Runs after the fuzz test (file order): a normal request still works and health is SERVING."""
    from serving.client import RecommenderClient

    response = stub.Recommend(recommender_pb2.RecommendRequest(history=NAMES[:3], k=5), timeout=10)
    assert len(response.items) == 5 and response.model_version == 1
    with RecommenderClient(f"127.0.0.1:{fuzz_server.port}") as client:
        assert client.health() == "SERVING"
    assert fuzz_server.batcher._queue.qsize() == 0
    with capsys.disabled():
        print(f"\n[hostile input] Recommend fuzz cases run: {CASES['run']}, outcomes: {OUTCOMES}")
    if CASES["run"]:  # zero when the fuzz test was deselected
        assert CASES["run"] >= 100


def test_huge_history_matches_direct_call(stub, recommender):
    """100,000 ids reach the model and are answered exactly like the direct SavedModel call."""
    rng = np.random.default_rng(7)
    history = [NAMES[i] for i in rng.integers(0, 40, 100_000)] + ["nope"] * 10
    request = recommender_pb2.RecommendRequest(history=history, k=40, exclude_seen=False)
    assert request.ByteSize() > 1 << 20
    response = stub.Recommend(request, timeout=60)
    direct = recommender.recommend(history, k=40, exclude_seen=False)
    assert [i.item_id for i in response.items] == direct.item_ids
    assert response.unknown_history_ids == 10


def test_default_server_rejects_oversized_request_quickly(client):
    """With the default 1 MiB limit, a 1 MB id and a 100,000-id history are RESOURCE_EXHAUSTED."""
    for history in (["x" * (1 << 20)], NAMES * 2500):
        with pytest.raises(grpc.RpcError) as err:
            client.recommend(history, k=3)
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(client.recommend(NAMES[:3], k=3).items) == 3


# -- live histories: AppendEvents, RecommendForUser, GetHistory, DeleteUser ------------------------------

HISTORY_LIMITS = dict(max_events_per_append=1000, max_id_length=256)  # the server's defaults, spelled out
HISTORY_ALLOWED = ALLOWED
HISTORY_OUTCOMES: dict[str, int] = {}
# Mostly storable ids (odd, unknown or real), so that many calls are accepted and histories grow to the cap.
STORABLE_ID = st.one_of(st.sampled_from(NAMES), st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40),
                        st.sampled_from(["<oov>", "\x00", " item-0001", "ITEM-0002", "💥" * 64, "x" * 256, "a:b", "1:2"]))
USER_ID = st.one_of(st.sampled_from(["same-user", "other-user"]), st.sampled_from(["same-user", "other-user"]), TEXT, st.just(""), st.sampled_from(["u", "same-user", "u" * 256, "u" * 257, "\x00", "💥" * 64]),
                    st.just("u" * 5000))
TIMESTAMPS = st.one_of(st.just("none"), st.just("match"), st.just("none"), st.just("match"), st.lists(st.integers(-(2**63), 2**63 - 1), max_size=5))


@st.composite
def history_calls(draw):
    """``(method, request)`` of one of the four live-history RPCs with hostile fields."""
    method = draw(st.sampled_from(["AppendEvents", "AppendEvents", "RecommendForUser", "RecommendForUser",
                                   "GetHistory", "DeleteUser"]))
    user_id = draw(USER_ID)
    if method in ("GetHistory", "DeleteUser"):
        cls = recommender_pb2.GetHistoryRequest if method == "GetHistory" else recommender_pb2.DeleteUserRequest
        return method, cls(user_id=user_id)
    items = draw(st.one_of(id_lists(), st.lists(STORABLE_ID, min_size=1, max_size=30),
                           st.lists(STORABLE_ID, min_size=1, max_size=30)))
    times = draw(TIMESTAMPS)
    if times == "none":
        times = []
    elif times == "match":
        times = draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=len(items), max_size=len(items))) \
            if len(items) <= 60 else list(range(len(items)))
    fields = dict(user_id=user_id, item_ids=items, timestamps=times,
                  idempotency_key=draw(st.one_of(st.just(""), st.just(""), st.uuids().map(str), TEXT, st.just("k" * 257))))
    if method == "AppendEvents":
        return method, recommender_pb2.AppendEventsRequest(**fields)
    k = draw(st.one_of(st.none(), st.integers(1, 40), st.integers(-2, 45), st.sampled_from([2**31 - 1, -(2**31)])))
    if k is not None:
        fields["k"] = k
    if draw(st.booleans()):
        fields["exclude_item_ids"] = draw(id_lists(max_small=10))
    return method, recommender_pb2.RecommendForUserRequest(**fields)


def history_expected(method, request) -> set:
    """The codes a correct server may answer: every rule the request breaks (any one of them may be
    named first), OK when it breaks none."""
    size = request.ByteSize()
    if size > MAX_MESSAGE + 64:
        return {grpc.StatusCode.RESOURCE_EXHAUSTED}
    bad = set()
    too_big = {grpc.StatusCode.RESOURCE_EXHAUSTED} if size > MAX_MESSAGE - 64 else set()
    if not request.user_id or len(request.user_id) > 256:
        bad.add(grpc.StatusCode.INVALID_ARGUMENT)
    if method in ("AppendEvents", "RecommendForUser"):
        appends = method == "AppendEvents" or bool(request.item_ids or request.timestamps or request.idempotency_key)
        if method == "RecommendForUser":
            k = request.k if request.HasField("k") else 10
            if not 1 <= k <= 40 or any(len(x) > MAX_ID_BYTES for x in request.exclude_item_ids):
                bad.add(grpc.StatusCode.INVALID_ARGUMENT)
        if appends:
            if len(request.item_ids) > 1000:
                bad.add(grpc.StatusCode.RESOURCE_EXHAUSTED)
            if (not request.item_ids or any(not x or len(x) > 256 for x in request.item_ids)
                    or (request.timestamps and len(request.timestamps) != len(request.item_ids))
                    or len(request.idempotency_key) > 256):
                bad.add(grpc.StatusCode.INVALID_ARGUMENT)
        # A reused key with other events is INVALID_ARGUMENT: possible whenever a key is given.
        if appends and request.idempotency_key:
            return (bad or {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}) | too_big
    return (bad or {grpc.StatusCode.OK}) | too_big


@pytest.fixture(scope="module")
def history_stub(model_base, tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('fuzz-histories') / 'h.db'}"
    srv = start_server(model_base, max_message_bytes=MAX_MESSAGE, metrics_port=None, history_store=url,
                       **HISTORY_LIMITS)
    assert srv.wait_ready(60)
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}", options=options) as channel:
        yield recommender_pb2_grpc.RecommenderStub(channel)
    srv.stop(1)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(call=history_calls())
def test_live_history_fuzz_never_internal(history_stub, call):
    method, request = call
    before = None
    if request.user_id and len(request.user_id) <= 256:
        before = list(history_stub.GetHistory(recommender_pb2.GetHistoryRequest(user_id=request.user_id),
                                              timeout=30).events)
    try:
        response = getattr(history_stub, method)(request, timeout=60)
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code, response = exc.code(), None
        assert code in HISTORY_ALLOWED, (method, code, exc.details())
        assert exc.details() and "\n" not in exc.details(), "every error names its cause on one line"
    HISTORY_OUTCOMES[f"{method} {code.name}"] = HISTORY_OUTCOMES.get(f"{method} {code.name}", 0) + 1
    assert code in history_expected(method, request), (method, code, request.ByteSize())
    if before is None:
        return
    after = [(e.item_id, e.timestamp if e.HasField("timestamp") else None) for e in history_stub.GetHistory(
        recommender_pb2.GetHistoryRequest(user_id=request.user_id), timeout=30).events]
    before = [(e.item_id, e.timestamp if e.HasField("timestamp") else None) for e in before]
    if code is not grpc.StatusCode.OK:
        assert after == before, "a refused call changed the stored history"
        return
    if method == "DeleteUser":
        assert after == [] and response.deleted == bool(before)
        return
    if method == "GetHistory":
        return
    reply = response if method == "AppendEvents" else response.append
    if reply.duplicate or not (method == "AppendEvents" or request.item_ids):
        assert after == before and reply.appended == 0
    else:  # stored verbatim (odd and unknown ids too), newest 1000 kept
        times = list(request.timestamps) or [None] * len(request.item_ids)
        assert after == (before + list(zip(request.item_ids, times)))[-1000:]
        assert reply.appended == len(request.item_ids) and reply.dropped == max(0, len(before) + reply.appended - 1000)
    if method == "RecommendForUser":  # scored like Recommend on the stored history: unknown ids counted
        history = [i for i, _ in after]
        assert response.history_length == len(history)
        rec = response.recommendation
        assert rec.unknown_history_ids == sum(1 for h in history if h not in KNOWN)
        assert rec.cold_start == (not any(h in KNOWN for h in history))
        assert set(i.item_id for i in rec.items) <= KNOWN


def test_history_server_alive_after_fuzzing(history_stub, capsys):
    """Runs after the live-history fuzz test: a normal append and recommendation still work."""
    reply = history_stub.AppendEvents(recommender_pb2.AppendEventsRequest(user_id="after-fuzz", item_ids=NAMES[:2]),
                                      timeout=10)
    assert reply.appended == 2
    answer = history_stub.RecommendForUser(recommender_pb2.RecommendForUserRequest(user_id="after-fuzz", k=3),
                                           timeout=10)
    assert answer.history_length >= 2 and len(answer.recommendation.items) == 3
    with capsys.disabled():
        print(f"\n[hostile input] live-history fuzz outcomes: {dict(sorted(HISTORY_OUTCOMES.items()))}")
