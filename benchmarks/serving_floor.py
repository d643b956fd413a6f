"""Servers that show what gRPC in Python costs on this machine without the model.

    python -m benchmarks.serving_floor {echo,instant} --port PORT

``benchmarks/serving.py`` drives these next to `sasrec serve` with the same clients, so its table
says where the time goes:

- ``echo``: a thread-pool ``grpc.server`` whose ``Recommend`` returns one fixed 10-item answer
  (the proto's parsing and serialising, nothing else; SCHED_BATCH like `sasrec serve`): the floor
  of any Python gRPC server here.
- ``instant``: the whole `sasrec serve` stack (validation, micro-batching, response building,
  metrics) with the SavedModel replaced by a model that answers at once: the most this server
  could serve with a model that cost nothing.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import threading
from concurrent import futures
from pathlib import Path

import numpy as np

ANSWER_SIZE = 10


class InstantModel:
    """Answers every history with the same ``k`` items at once (no computation, no GIL release)."""

    version = 1
    maxlen = 200
    num_items = 3416
    max_k = num_items
    card: dict = {}

    def warm_up(self, max_batch_size: int = 64, k: int = 10) -> None:
        pass

    def recommend_batch(self, histories, k=10, exclude_seen=True, exclude_item_ids=()):
        from sasrec.recommender import BatchResult

        n = len(histories)
        ids = np.array([[str(i) for i in range(1, k + 1)]] * n, dtype=object).reshape(n, k)
        return BatchResult(ids, np.ones((n, k), np.float32), np.zeros(n, np.int32), np.zeros(n, bool))


def serve_echo(port: int, stop: threading.Event) -> None:
    import grpc

    from sasrec.v1 import recommender_pb2, recommender_pb2_grpc

    answer = recommender_pb2.RecommendResponse(
        items=[recommender_pb2.ScoredItem(item_id=str(i), score=1.0) for i in range(ANSWER_SIZE)],
        model_name="echo",
        model_version=1,
    )

    class Echo(recommender_pb2_grpc.RecommenderServicer):
        def Recommend(self, request, context):
            return answer

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    recommender_pb2_grpc.add_RecommenderServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    while not stop.wait(0.5):
        pass
    server.stop(1).wait()


def serve_instant(port: int, stop: threading.Event) -> None:
    from serving.server import RecommenderServer, ServerConfig

    base = Path(tempfile.mkdtemp(prefix="sasrec-instant-"))
    (base / str(InstantModel.version)).mkdir()
    try:
        server = RecommenderServer(
            # Scheduling: main() sets the process's, as `sasrec serve` does (tests call this in-process).
            ServerConfig(model_base=str(base), port=port, metrics_port=None, poll_interval_s=3600,
                         cpu_scheduling="default"),
            loader=lambda folder: InstantModel(),
        ).start()
        while not stop.wait(0.5):
            pass
        server.stop(1)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["echo", "instant"])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    from serving.server import set_batch_scheduling

    set_batch_scheduling()  # the default of `sasrec serve`, for both floors
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    (serve_echo if args.kind == "echo" else serve_instant)(args.port, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
