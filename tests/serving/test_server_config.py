"""`sasrec serve` flags: validation messages, TensorFlow thread pools, CPU scheduling."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest

from sasrec.cli import build_parser, main
from serving.server import ServerConfig, config_from_args


def parse(*flags: str):
    return build_parser().parse_args(["serve", "--model-base", "models/x", *flags])


def test_thread_flags_default_to_two_batches_on_one_thread():
    config = config_from_args(parse())
    assert (config.model_workers, config.intra_op_threads, config.inter_op_threads) == (2, 1, 1)
    assert config.cpu_scheduling == "batch"
    assert config_from_args(parse("--cpu-scheduling", "default")).cpu_scheduling == "default"
    assert config == ServerConfig(model_base="models/x", auth_token=config.auth_token)
    config = config_from_args(parse("--intra-op-threads", "0", "--inter-op-threads", "2"))
    assert (config.intra_op_threads, config.inter_op_threads) == (0, 2)


@pytest.mark.parametrize("flag", ["--intra-op-threads", "--inter-op-threads"])
def test_negative_thread_flag_is_an_error_naming_it(flag, capsys):
    assert main(["serve", "--model-base", "models/x", flag, "-1"]) == 2
    assert f"{flag} must be >= 0, got -1" in capsys.readouterr().err


def test_processes_default_to_one_and_must_be_positive(capsys):
    assert config_from_args(parse()).processes == 1
    assert config_from_args(parse("--processes", "3")).processes == 3
    assert main(["serve", "--model-base", "models/x", "--processes", "0"]) == 2
    assert "--processes must be >= 1, got 0" in capsys.readouterr().err


def serve_actions():
    """The argparse actions of `sasrec serve`, by dest."""
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    return {action.dest: action for action in serve._actions}


def test_every_field_has_exactly_one_flag_whose_parsed_default_is_the_dataclass_default(monkeypatch):
    monkeypatch.delenv("SASREC_AUTH_TOKEN", raising=False)
    actions = serve_actions()
    fields = dataclasses.fields(ServerConfig)
    args = parse()
    for field in fields:
        flag = "--" + field.name.replace("_", "-")
        assert [a.option_strings for a in actions.values() if flag in a.option_strings] == [[flag]], flag
        assert actions[field.name].option_strings == [flag]
        if field.name == "model_base":
            assert actions[field.name].required
            continue
        assert getattr(args, field.name) == field.default, flag
        assert actions[field.name].help.count("(default") <= 1, flag
    # The only flags that are not fields: help, the token file read into auth_token, the log level.
    assert set(actions) - {f.name for f in fields} == {"help", "auth_token_file", "log_level"}
    assert config_from_args(args) == ServerConfig(model_base="models/x")


def test_special_flags_map_onto_their_fields(tmp_path, monkeypatch):
    monkeypatch.delenv("SASREC_AUTH_TOKEN", raising=False)
    assert config_from_args(parse("--metrics-port", "-1")).metrics_port is None
    assert config_from_args(parse("--metrics-port", "0")).metrics_port == 0
    assert config_from_args(parse()).max_k is None
    assert config_from_args(parse("--max-k", "7")).max_k == 7
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    assert config_from_args(parse("--auth-token-file", str(token))).auth_token == "s3cret"
    assert config_from_args(parse("--auth-token", "abc")).auth_token == "abc"
    monkeypatch.setenv("SASREC_AUTH_TOKEN", "from-env")
    assert config_from_args(parse()).auth_token == "from-env"
    actions = serve_actions()
    assert actions["max_k"].help.endswith("(default: every item of the model)")
    assert actions["cpu_scheduling"].choices == ["batch", "default"]
    assert actions["tls_cert"].help.count("default") == 0


@pytest.mark.parametrize("flag, value, least", [
    ("--max-batch-size", "0", "1"), ("--batch-timeout-ms", "-1", "0"), ("--max-k", "0", "1"),
    ("--workers", "0", "1"), ("--model-workers", "0", "1"),
])
def test_a_value_below_the_minimum_is_one_line_naming_the_flag(flag, value, least, capsys):
    assert main(["serve", "--model-base", "models/x", flag, value]) == 2
    got = float(value) if flag == "--batch-timeout-ms" else int(value)  # as the flag's type parses it
    assert capsys.readouterr().err.splitlines() == [f"sasrec serve: error: {flag} must be >= {least}, got {got}"]


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


@pytest.mark.parametrize("xla, inter_op", [(False, None), (True, 2)], ids=["default-export-default-pools",
                                                                         "xla-export-two-inter-op-threads"])
def test_warming_a_new_version_does_not_stall_calls_to_the_serving_one(tmp_path, xla, inter_op):
    """A hot reload's warm-up runs beside the serving model's calls instead of in front of them: calls
    keep completing all through it. With an XLA export (one compile per batch size and width) that
    needs a second inter-op thread, as the flag's help says; a default export needs nothing."""
    from sasrec.export import export_run
    from tests.serving.helpers import make_run, publish_copy

    # ML-1M-sized (XLA compiles take ~0.5 s each); three batch sizes keep the test short.
    run = make_run(tmp_path / "run", num_items=3416, maxlen=200, hidden_units=50)
    publish_copy(export_run(run, tmp_path / "m", version=1, jit_compile=xla), tmp_path / "m", 2)
    script = textwrap.dedent(
        """
        import json, os, sys, threading, time
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        from serving.server import ServerConfig, set_tensorflow_threads
        config = ServerConfig(model_base="")
        set_tensorflow_threads(config.intra_op_threads, int(sys.argv[2]) or config.inter_op_threads)
        from sasrec.recommender import Recommender
        serving = Recommender.load(sys.argv[1] + "/1")
        serving.warm_up(4)
        done, stop = [], threading.Event()
        def call():
            while not stop.is_set():
                serving.recommend(["item-0001", "item-0002", "item-0003"], k=5)
                done.append(time.perf_counter())
        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(0.2)
        before = time.perf_counter()
        time.sleep(1.0)
        start = time.perf_counter()
        new = Recommender.load(sys.argv[1] + "/2")
        new.warm_up(4)
        end = time.perf_counter()
        stop.set()
        caller.join()
        rate_before = sum(before <= t < start for t in done) / (start - before)
        rate_during = sum(start <= t <= end for t in done) / (end - start)
        print(json.dumps({"calls_per_s_before": rate_before, "calls_per_s_during": rate_during, "warm_s": end - start}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m"), str(inter_op or 0)],
                          capture_output=True, text=True, timeout=300, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # Sharing two cores with the warm-up halves the rate at worst; stalled, a call completes only
    # between two compiles (measured: an XLA export on one inter-op thread, 2.5% of the rate before).
    assert out["calls_per_s_during"] >= 0.2 * out["calls_per_s_before"], out


def test_an_xla_model_on_one_inter_op_thread_gets_a_warning(server, monkeypatch, caplog):
    from types import SimpleNamespace

    from serving.server import RecommenderServer

    for single, expected in ((True, 1), (False, 0)):
        monkeypatch.setattr(RecommenderServer, "_single_inter_op_thread", staticmethod(lambda: single))
        caplog.clear()
        with caplog.at_level("WARNING", logger="serving"):
            server._on_model(SimpleNamespace(xla=True, version=7))
            server._on_model(SimpleNamespace(xla=False, version=8))
        warnings = [r.getMessage() for r in caplog.records if "--inter-op-threads 2" in r.getMessage()]
        assert len(warnings) == expected and all("version 7" in w for w in warnings)
