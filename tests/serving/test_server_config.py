"""`sasrec serve` flags: validation messages, TensorFlow thread pools, CPU scheduling."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from sasrec.cli import build_parser, main
from serving.server import ServerConfig, config_from_args


def parse(*flags: str):
    return build_parser().parse_args(["serve", "--model-base", "models/x", *flags])


def test_thread_flags_default_to_one_thread_per_model_call():
    config = config_from_args(parse())
    assert (config.intra_op_threads, config.inter_op_threads) == (1, 1)
    assert config.cpu_scheduling == "batch"
    assert config_from_args(parse("--cpu-scheduling", "default")).cpu_scheduling == "default"
    assert config == ServerConfig(model_base="models/x", auth_token=config.auth_token)
    config = config_from_args(parse("--intra-op-threads", "0", "--inter-op-threads", "2"))
    assert (config.intra_op_threads, config.inter_op_threads) == (0, 2)


@pytest.mark.parametrize("flag", ["--intra-op-threads", "--inter-op-threads"])
def test_negative_thread_flag_is_an_error_naming_it(flag, capsys):
    assert main(["serve", "--model-base", "models/x", flag, "-1"]) == 2
    assert f"{flag} must be >= 0, got -1" in capsys.readouterr().err


def test_thread_pools_are_set_before_tensorflow_starts_and_kept_after_with_a_warning():
    # A fresh process: the pools can only be sized before TensorFlow runs its first op.
    script = textwrap.dedent(
        """
        import logging, os
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        import tensorflow as tf
        from serving.server import set_tensorflow_threads
        set_tensorflow_threads(1, 1)
        print("before", tf.config.threading.get_intra_op_parallelism_threads(),
              tf.config.threading.get_inter_op_parallelism_threads(), flush=True)
        tf.constant(1.0) + 1.0
        set_tensorflow_threads(2, 1)
        print("after", tf.config.threading.get_intra_op_parallelism_threads(),
              tf.config.threading.get_inter_op_parallelism_threads(), flush=True)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "before 1 1" in proc.stdout and "after 1 1" in proc.stdout
    assert "intra-op threads stay at 1, not 2" in proc.stderr


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="scheduling policies are Linux-only")
def test_batch_scheduling_covers_threads_started_before_and_after():
    script = textwrap.dedent(
        """
        import os, threading
        from serving.server import set_batch_scheduling
        ids, go = {}, threading.Event()
        def record(name):
            ids[name] = threading.get_native_id()
            go.wait()
        before = threading.Thread(target=record, args=("before",)); before.start()
        while "before" not in ids: pass
        set_batch_scheduling()
        after = threading.Thread(target=record, args=("after",)); after.start()
        while "after" not in ids: pass
        ids["main"] = threading.get_native_id()
        print(sorted(name for name, tid in ids.items() if os.sched_getscheduler(tid) == os.SCHED_BATCH))
        go.set()
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['after', 'before', 'main']"
