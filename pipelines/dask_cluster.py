"""The Dask cluster a command runs on: a running scheduler, or a LocalCluster started for the command.

Shared by every ``--engine dask`` command (``prepare``, ``score``), so the flags mean the same everywhere.
With ``--scheduler tcp://HOST:8786`` the command is a client of that cluster (Kubernetes, YARN, cloud,
``dask scheduler`` + ``dask worker`` by hand) and leaves it running; without it, a ``LocalCluster`` of
``--workers`` processes (one thread each) is started and closed with the command.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from typing import Iterator

from pipelines.errors import InputError

ENGINES = ("pandas", "dask")


def add_dask_arguments(parser: argparse.ArgumentParser) -> None:
    """``--engine``, ``--scheduler``, ``--workers``, ``--memory-limit`` (the same on every command)."""
    group = parser.add_argument_group("engine", "pandas runs in this process; dask runs on a Dask cluster")
    group.add_argument("--engine", choices=ENGINES, default="pandas", help="where the work runs")
    group.add_argument("--scheduler", help="dask: address of a running scheduler, e.g. tcp://HOST:8786 "
                       "(default: start a LocalCluster for this command)")
    group.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                       help="dask LocalCluster: worker processes (one thread each)")
    group.add_argument("--memory-limit", default="auto",
                       help="dask LocalCluster: memory per worker, e.g. 6GB; above it workers spill to disk "
                       "(auto: the machine's memory divided among the workers)")


def check_dask_arguments(args: argparse.Namespace) -> None:
    """Dask-only flags given with the pandas engine are a mistake, not something to ignore silently."""
    if args.engine != "dask" and args.scheduler:
        raise InputError("--scheduler needs --engine dask")
    if args.workers < 1:
        raise InputError(f"--workers must be >= 1, got {args.workers}")


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, *, workers: int = 1, memory_limit: str | int = "auto",
                local_directory: str | None = None) -> Iterator:
    """A ``distributed.Client`` for the block: connected to ``scheduler``, or to a LocalCluster it starts
    (and closes). Workers of a LocalCluster are separate processes, so a crashed worker is restarted by
    its nanny and its tasks are recomputed."""
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise InputError(f"--scheduler {scheduler}: cannot connect ({exc})") from None
        with client:
            yield client
        return
    # The dashboard needs a free port and bokeh; a command-line job has no use for it.
    logging.getLogger("distributed").setLevel(logging.ERROR)
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, memory_limit=memory_limit,
                      dashboard_address=None, local_directory=local_directory) as cluster, Client(cluster) as client:
        yield client
