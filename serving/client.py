"""A small Python client for the recommendation service.

    from serving.client import RecommenderClient
    with RecommenderClient("localhost:8500") as client:
        response = client.recommend(["1193", "661", "914"], k=10)
        for item in response.items:
            print(item.item_id, item.score)
        # A server started with --history-store keeps the histories: send only what is new.
        answer = client.recommend_for_user("u42", k=10, item_ids=["2355"], idempotency_key="event-7781")
        print(answer.recommendation.items[0].item_id)

Health probe for containers: ``python -m serving.client health localhost:8500`` exits 0 when the
server reports SERVING through the standard gRPC health service, 1 otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import grpc

from sasrec.v1 import recommender_pb2, recommender_pb2_grpc


# A channel with this option opens its own TCP connection; by default gRPC shares one connection
# between all channels of a process to the same target.
OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)


class RecommenderClient:
    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool = False,
        tls_ca: str | None = None,
        timeout: float | None = 5.0,
        max_message_bytes: int = 4 << 20,
        own_connection: bool = False,
    ):
        """``own_connection``: this client's channel opens its own TCP connection instead of sharing one
        with other clients of the same target in this process, so a server started with ``--processes N``
        (which spreads connections, not calls) sees several clients as several connections."""
        options = [("grpc.max_send_message_length", max_message_bytes)]
        if own_connection:
            options.append(OWN_CONNECTION)
        if tls or tls_ca:
            root = Path(tls_ca).read_bytes() if tls_ca else None
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root), options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = recommender_pb2_grpc.RecommenderStub(self.channel)
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None

    def recommend(
        self,
        history: Sequence[str],
        k: int | None = 10,
        *,
        exclude_seen: bool | None = True,
        exclude_item_ids: Sequence[str] = (),
        user_id: str = "",
        timeout: float | None = None,
        explain: bool = False,
        explain_items: int | None = None,
        timestamps: Sequence[int] = (),
    ) -> recommender_pb2.RecommendResponse:
        """``explain``/``explain_items``: each returned item carries the history items that drove it.
        ``timestamps``: none, or each history event's Unix seconds (read by a time_bias model)."""
        request = recommender_pb2.RecommendRequest(
            history=list(history), exclude_item_ids=list(exclude_item_ids), user_id=user_id,
            timestamps=list(timestamps),
        )
        return self._call(self.stub.Recommend, _with_options(request, k, exclude_seen, explain, explain_items), timeout)

    def append_events(
        self,
        user_id: str,
        item_ids: Sequence[str],
        *,
        timestamps: Sequence[int] = (),
        idempotency_key: str = "",
        timeout: float | None = None,
    ) -> recommender_pb2.AppendEventsResponse:
        """Append events (oldest first) to the history the server stores for ``user_id``. Give an
        ``idempotency_key`` to make a retry after an error or timeout safe."""
        request = recommender_pb2.AppendEventsRequest(
            user_id=user_id, item_ids=list(item_ids), timestamps=list(timestamps), idempotency_key=idempotency_key
        )
        return self._call(self.stub.AppendEvents, request, timeout)

    def recommend_for_user(
        self,
        user_id: str,
        k: int | None = 10,
        *,
        exclude_seen: bool | None = True,
        exclude_item_ids: Sequence[str] = (),
        item_ids: Sequence[str] = (),
        timestamps: Sequence[int] = (),
        idempotency_key: str = "",
        timeout: float | None = None,
        explain: bool = False,
        explain_items: int | None = None,
    ) -> recommender_pb2.RecommendForUserResponse:
        """Recommend from the stored history, after appending ``item_ids`` (if any) as :meth:`append_events`."""
        request = recommender_pb2.RecommendForUserRequest(
            user_id=user_id, exclude_item_ids=list(exclude_item_ids), item_ids=list(item_ids),
            timestamps=list(timestamps), idempotency_key=idempotency_key,
        )
        return self._call(self.stub.RecommendForUser, _with_options(request, k, exclude_seen, explain, explain_items),
                          timeout)

    def get_history(self, user_id: str, timeout: float | None = None) -> recommender_pb2.GetHistoryResponse:
        return self._call(self.stub.GetHistory, recommender_pb2.GetHistoryRequest(user_id=user_id), timeout)

    def delete_user(self, user_id: str, timeout: float | None = None) -> recommender_pb2.DeleteUserResponse:
        """Erase the user's stored events; the next :meth:`recommend_for_user` is a cold start."""
        return self._call(self.stub.DeleteUser, recommender_pb2.DeleteUserRequest(user_id=user_id), timeout)

    def _call(self, method, request, timeout: float | None):
        return method(request, timeout=timeout or self.timeout, metadata=self._metadata)

    def model_info(self, timeout: float | None = None) -> recommender_pb2.ModelInfo:
        return self._call(self.stub.GetModelInfo, recommender_pb2.GetModelInfoRequest(), timeout)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """``SERVING``, ``NOT_SERVING``, ... or ``UNREACHABLE`` when the call itself fails."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout or self.timeout)
        except grpc.RpcError:
            return "UNREACHABLE"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "RecommenderClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _with_options(request, k: int | None, exclude_seen: bool | None, explain: bool = False,
                  explain_items: int | None = None):
    """``request`` with its optional ``k``, ``exclude_seen`` and ``explain_items`` set unless None (the
    server's default)."""
    if k is not None:
        request.k = k
    if exclude_seen is not None:
        request.exclude_seen = exclude_seen
    request.explain = bool(explain)
    if explain_items is not None:
        request.explain_items = explain_items
    return request


def format_table(response: recommender_pb2.RecommendResponse) -> str:
    lines = [f"{'rank':>4}  {'item_id':<24} {'score':>10}"]
    for rank, item in enumerate(response.items, 1):
        because = ", ".join(f"{c.item_id} ({c.weight:.3g})" for c in item.explanation)
        lines.append(f"{rank:>4}  {item.item_id:<24} {item.score:>10.4f}" + (f"  because of {because}" if because else ""))
    notes = [f"model {response.model_name} v{response.model_version}"]
    if response.unknown_history_ids:
        notes.append(f"{response.unknown_history_ids} unknown history ids ignored")
    if response.cold_start:
        notes.append("cold start: popularity ranking")
    if response.explain_method:
        notes.append(f"explained by {response.explain_method}")
    return "\n".join(lines) + "\n(" + "; ".join(notes) + ")"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m serving.client", description="gRPC health probe")
    parser.add_argument("action", choices=["health"])
    parser.add_argument("target", help="HOST:PORT")
    parser.add_argument("--service", default="", help="service name to check (default: the whole server)")
    parser.add_argument("--tls-ca", help="CA certificate (PEM) when the server uses TLS")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    with RecommenderClient(args.target, tls_ca=args.tls_ca, timeout=args.timeout) as client:
        status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
