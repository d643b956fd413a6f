"""Training speed: sequences per second, seconds per epoch and the fraction of peak FLOP/s reached.

    python -m benchmarks.train_speed [--backends tensorflow,jax] [--losses bce,ce] [--quick]

Each (backend, loss) runs in its own process (Keras picks its backend at import). Two figures:
- full windows: batches of 128 sequences of 200 items (the paper configuration: d 50, 2 blocks,
  1 head), timed over ``--steps`` train steps after warm-up: comparable with the reference figures
  of other implementations in TARGETS.md;
- ML-1M epochs: ``--epochs`` epochs of the real training feed with length bucketing on and again
  with it off, after a first epoch that compiles every batch shape; median, fastest and slowest
  epoch, so that epoch-to-epoch spread (e.g. recompilation) shows (skipped when ../shared/data is
  absent).
The ratio to the reference is against SASRec.pytorch measured side by side on this kind of machine
(TARGETS.md: 340-367 windows/s on full windows; it always pads to full windows, so its ML-1M epoch
is 6,040 of them).
FLOPs are counted analytically (matmuls only, backward = 2 x forward).

    python -m benchmarks.train_speed --sparse [--epochs 4]

times Beauty epochs of the sparse preset (its full softmax over 12,101 items, length bucketing on) in one
TensorFlow process: seconds per epoch after one that compiles, and how many of the positions the batches
compute carry a target (the rest is padding). Section ``train-speed-sparse``.

    python -m benchmarks.train_speed --ce-floor

times, in one TensorFlow process, what a full-softmax CE step cannot go below on this machine: the
loss's three (B*W, d) x (d, V) matmuls alone (with XLA and with TensorFlow's own oneDNN kernels), the
loss alone forward and backward (``sasrec.losses.ce_loss``, XLA), and whole BCE and CE train steps.
Section ``train-speed-ce-floor``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.report import SHARED_DATA, accelerator, write_section

ROOT = Path(__file__).resolve().parent.parent
ML1M = SHARED_DATA / "ml-1m" / "ml-1m.txt.gz"
BEAUTY = SHARED_DATA / "beauty" / "Beauty.txt"
MAXLEN, D, BLOCKS, BATCH, VOCAB = 200, 50, 2, 128, 3418


def train_flops_per_sequence(loss: str, length: int = MAXLEN, d: int = D, blocks: int = BLOCKS, vocab: int = VOCAB) -> float:
    """Matmul FLOPs of one training step per sequence: forward (projections, attention, feed-forward,
    output scores), times 3 for forward plus backward."""
    per_block = 4 * 2 * length * d * d + 2 * 2 * length * length * d + 2 * 2 * length * d * d
    scores = 2 * length * d * (vocab if loss == "ce" else 2)
    return 3.0 * (blocks * per_block + scores)


def cpu_peak_flops() -> tuple[float, str]:
    """fp32 peak of this CPU: cores x clock x 64 FLOP/cycle (two AVX-512 FMA units), or 32 with AVX2."""
    flags, mhz = "", 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = line
            if line.startswith("cpu MHz") and not mhz:
                mhz = float(line.split(":")[1])
    except OSError:
        pass
    per_cycle = 64 if "avx512f" in flags else 32
    cores = os.cpu_count() or 1
    return cores * mhz * 1e6 * per_cycle, f"{cores} cores x {mhz / 1000:.2f} GHz x {per_cycle} FLOP/cycle"


# Dense TF32 tensor-core peak (what XLA uses for float32 matmuls on Hopper by default), FLOP/s.
GPU_PEAKS = {"H100": 494.7e12, "H200": 494.7e12}


def peak_flops() -> tuple[float, str, str]:
    """(peak FLOP/s, how it was derived, device label): the GPU's when one is listed, else the CPU's."""
    device = accelerator()
    for name, peak in GPU_PEAKS.items():
        if name in device:
            return peak, f"{device}, dense TF32 tensor cores", device
    peak, text = cpu_peak_flops()
    return peak, text, "CPU"


# SASRec.pytorch (torch 2.13 CPU), windows/s, measured side by side on this kind of machine (TARGETS.md).
REFERENCE_WINDOWS_PER_S = (340.0, 367.0)


def child(loss: str, steps: int, jit: bool, epochs: int) -> dict:
    import numpy as np
    import keras

    from sasrec.config import SASRecConfig
    from sasrec.losses import SequenceLoss
    from sasrec.model import build_model

    config = SASRecConfig(maxlen=MAXLEN, hidden_units=D, num_blocks=BLOCKS, loss=loss, jit_compile=jit)
    model = build_model(config, VOCAB)
    model.training_loss = SequenceLoss(loss, VOCAB - 2, config.num_negatives)
    model.compile(optimizer=keras.optimizers.Adam(1e-3, beta_2=0.98), jit_compile=jit)
    rng = np.random.default_rng(0)
    x = rng.integers(2, VOCAB, (BATCH, MAXLEN)).astype("int32")
    y = {"pos": rng.integers(2, VOCAB, (BATCH, MAXLEN)).astype("int32"), "neg": rng.integers(2, VOCAB, (BATCH, MAXLEN)).astype("int32")}
    for _ in range(3):
        model.train_on_batch(x, y)
    started = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    seconds = (time.perf_counter() - started) / steps
    out = {"full_window_seq_per_s": BATCH / seconds, "ms_per_step": 1000 * seconds}
    if epochs and ML1M.exists():
        for bucketing in (True, False):
            out[f"bucketing_{'on' if bucketing else 'off'}"] = ml1m_epochs(model, config, loss, bucketing, epochs)
    return out


def prepared(source: Path, file_format: str):
    """The dataset of raw file ``source`` (``sasrec prepare``'s defaults but no k-core), read into memory."""
    import tempfile

    from pipelines.dataset import read_dataset
    from pipelines.prepare import prepare_file

    with tempfile.TemporaryDirectory() as tmp:
        prepare_file(file_format, source, Path(tmp) / "data", kcore="none")
        return read_dataset(Path(tmp) / "data")


def ml1m_epochs(model, config, loss: str, bucketing: bool, epochs: int) -> dict:
    """Seconds of each of ``epochs`` ML-1M epochs, after one that compiles every batch shape."""
    from sasrec.feed import TrainingFeed

    feed = TrainingFeed(prepared(ML1M, "pairs"), maxlen=config.maxlen, batch_size=BATCH, loss=loss, seed=0,
                        length_bucketing=bucketing)
    return timed_epochs(model, feed, epochs)


def timed_epochs(model, feed, epochs: int) -> dict:
    """Seconds of each of ``epochs`` epochs of ``feed``, after one that compiles every batch shape."""
    import keras

    seconds = []

    class EpochClock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            feed.set_epoch(epoch)
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds.append(time.perf_counter() - self.started)

    model.fit(feed, epochs=epochs + 1, verbose=0, callbacks=[EpochClock()])
    timed = sorted(seconds[1:])  # the first epoch compiles
    median = timed[len(timed) // 2] if len(timed) % 2 else (timed[len(timed) // 2 - 1] + timed[len(timed) // 2]) / 2
    return {"windows": len(feed.windows), "median_s": median, "min_s": timed[0], "max_s": timed[-1],
            "epochs_s": [round(t, 2) for t in seconds[1:]]}


def sparse_child(epochs: int) -> dict:
    """Beauty epochs of the sparse preset (TensorFlow + XLA, seed 0): :func:`timed_epochs` plus the positions the
    batches compute per epoch and the share of them with a target."""
    from sasrec.config import PRESETS, SASRecConfig
    from sasrec.feed import TrainingFeed
    from sasrec.losses import SequenceLoss
    from sasrec.model import build_model
    from sasrec.train import make_optimizer

    ds = prepared(BEAUTY, "sequences")
    config = SASRecConfig(**PRESETS["sparse"])
    loss = config.resolved_loss(ds.num_items)
    feed = TrainingFeed(ds, maxlen=config.maxlen, batch_size=config.batch_size, loss=loss, seed=0)
    model = build_model(config, ds.vocab_size)
    model.training_loss = SequenceLoss(loss, ds.num_items, targets_per_batch=feed.targets_per_batch)
    model.compile(optimizer=make_optimizer(config, len(feed)), jit_compile=True)
    shapes = feed.batch_shapes()
    return {**timed_epochs(model, feed, epochs), "loss": loss, "positions": sum(rows * width for rows, width in shapes),
            "targets": round(feed.targets_per_batch * len(feed)), "widths": sorted({width for _, width in shapes})}


def report_sparse(epochs: int) -> int:
    if not BEAUTY.is_file():
        print(f"skipped: {BEAUTY} is absent; --sparse needs it", file=sys.stderr)
        return 0
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-m", "benchmarks.train_speed", "--child-sparse", "--epochs", str(epochs)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"--sparse failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    result = json.loads(lines[-1][7:])
    rows = [{"data": "Beauty", "loss": result["loss"], "windows": result["windows"],
             "epoch s (median [min-max])": f"{result['median_s']:.1f} [{result['min_s']:.1f}-{result['max_s']:.1f}]",
             "windows/s": result["windows"] / result["median_s"], "positions computed per epoch": result["positions"],
             "share with a target": result["targets"] / result["positions"],
             "batch widths": " ".join(map(str, result["widths"]))}]
    print(json.dumps(rows[0]), flush=True)
    from sasrec.config import PRESETS

    p = PRESETS["sparse"]
    config_text = (f"the sparse preset (maxlen {p['maxlen']}, d {p['hidden_units']}, {p['num_blocks']} blocks, "
                   f"dropout {p['dropout']}, batch {p['batch_size']})")
    notes = (f"{config_text}, Beauty (`Beauty.txt`, leave-one-out, 22,363 users, 12,101 items), TensorFlow + XLA, "
             f"seed 0, length bucketing on; {epochs} timed epochs after one that compiles every batch width, "
             "training only (no validation). Positions computed: the batches' rows x widths; share with a target: "
             "the positions the loss counts (the rest is left padding, which the full softmax pays for all the same).")
    write_section("train-speed-sparse", "Training speed: Beauty epochs of the sparse preset", rows, notes=notes)
    return 0


def row(backend: str, loss: str, xla: bool, result: dict, peak: float) -> dict:
    """One table row: full-window speed, its ratio to the reference (BCE) and the ML-1M epochs."""
    flops = result["full_window_seq_per_s"] * train_flops_per_sequence(loss)
    low, high = REFERENCE_WINDOWS_PER_S
    out = {
        "backend": backend, "loss": loss, "xla": xla,
        "full windows seq/s": result["full_window_seq_per_s"], "ms/step (128x200)": result["ms_per_step"],
        "x reference": f"{result['full_window_seq_per_s'] / high:.2f}-{result['full_window_seq_per_s'] / low:.2f}"
        if loss == "bce" else "", "% of peak": 100 * flops / peak,
    }
    for mode in ("on", "off"):
        epochs = result.get(f"bucketing_{mode}")
        if epochs is None:
            out[f"ML-1M epoch s, bucketing {mode} (median [min-max])"] = ""
            continue
        out[f"ML-1M epoch s, bucketing {mode} (median [min-max])"] = (
            f"{epochs['median_s']:.2f} [{epochs['min_s']:.2f}-{epochs['max_s']:.2f}]")
        if loss == "bce":
            out[f"ML-1M x reference, bucketing {mode}"] = (
                f"{epochs['windows'] / high / epochs['median_s']:.2f}-{epochs['windows'] / low / epochs['median_s']:.2f}")
    return out


def ce_floor(steps: int) -> list[dict]:
    """Rows of the CE floor (see the module docstring), all timed on full 128 x 200 windows."""
    import numpy as np
    import tensorflow as tf

    from sasrec.losses import ce_loss

    n, rng = BATCH * MAXLEN, np.random.default_rng(0)
    h = tf.constant(rng.normal(size=(BATCH, MAXLEN, D)).astype("float32"))
    table = tf.constant(rng.normal(size=(VOCAB, D)).astype("float32"))
    grad = tf.constant(rng.normal(size=(n, VOCAB)).astype("float32"))
    pos = tf.constant(rng.integers(2, VOCAB, (BATCH, MAXLEN)).astype("int32"))

    def matmuls(h, table, grad):
        flat = tf.reshape(h, (n, D))
        logits = tf.matmul(flat, table, transpose_b=True)  # forward, then the two gradients
        return [tf.reduce_sum(logits[:, :1]), tf.reduce_sum(tf.matmul(grad, table)[:1]),
                tf.reduce_sum(tf.matmul(grad, flat, transpose_a=True)[:1])]

    def loss_and_gradients(h, table, pos):
        with tf.GradientTape() as tape:
            tape.watch([h, table])
            loss = ce_loss(h, table, pos)
        return tape.gradient(loss, [h, table])

    def ms(fn, *args) -> float:
        fn(*args)
        started = time.perf_counter()
        for _ in range(steps):
            tf.nest.map_structure(lambda t: t.numpy(), fn(*args))
        return 1000 * (time.perf_counter() - started) / steps

    gemm_flop = 3 * 2 * n * D * VOCAB
    rows = []
    for label, fn, args, flop in [
        ("the loss's 3 matmuls, XLA", tf.function(matmuls, jit_compile=True), (h, table, grad), gemm_flop),
        ("the loss's 3 matmuls, TensorFlow kernels (oneDNN)", tf.function(matmuls), (h, table, grad), gemm_flop),
        ("CE loss alone, forward + backward, XLA", tf.function(loss_and_gradients, jit_compile=True), (h, table, pos),
         gemm_flop),
    ]:
        t = ms(fn, *args)
        rows.append({"what": label, "ms per 128x200 step": t, "GFLOP/s": flop / t / 1e6})
    for loss in ("bce", "ce"):
        rows.append({"what": f"whole {loss.upper()} train step (TensorFlow, XLA)",
                     "ms per 128x200 step": child(loss, steps, True, 0)["ms_per_step"], "GFLOP/s": ""})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="tensorflow,jax")
    parser.add_argument("--losses", default="bce,ce")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-xla", action="store_true", help="plain tf.function / no jit")
    parser.add_argument("--epochs", type=int, default=4, help="timed ML-1M epochs per bucketing mode")
    parser.add_argument("--quick", action="store_true", help="few steps, no ML-1M epoch (CI-sized)")
    parser.add_argument("--epoch-backends", default="tensorflow,jax",
                        help="backends whose ML-1M epoch is timed too (the others: full windows only)")
    parser.add_argument("--ce-floor", action="store_true",
                        help="time what a full-softmax CE step cannot go below (its own section)")
    parser.add_argument("--sparse", action="store_true",
                        help="time Beauty epochs of the sparse preset instead (its own section)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-sparse", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ce_floor:
        return report_ce_floor(args.steps)
    if args.sparse:
        return report_sparse(args.epochs)
    if args.child_sparse:
        print("RESULT " + json.dumps(sparse_child(args.epochs)))
        return 0
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.steps, not args.no_xla, 0 if args.quick else args.epochs)))
        return 0
    steps = 3 if args.quick else args.steps
    peak, peak_text, device = peak_flops()
    gpu = device != "CPU"
    notes = (f"Paper configuration: maxlen {MAXLEN}, d {D}, {BLOCKS} blocks, 1 head, batch {BATCH}, "
             f"{VOCAB - 2} items. Peak assumed {peak / 1e9:,.0f} GFLOP/s ({peak_text}). Reference "
             "(TARGETS.md, same kind of machine): SASRec.pytorch 340-367 windows/s measured side by side, "
             "keras-rs ~350-545 (BCE); plain Keras full-softmax CE ~147 windows/s. x reference = our windows/s "
             "over the reference's (its ML-1M epoch is 6,040 full windows). With length bucketing short "
             "histories cost less than full windows; the ML-1M epochs' min-max is the epoch-to-epoch spread.")
    rows = []
    for backend in args.backends.split(","):
        for loss in args.losses.split(","):
            cmd = [sys.executable, "-m", "benchmarks.train_speed", "--child", loss, "--steps", str(steps),
                   "--epochs", str(args.epochs)]
            cmd += ["--no-xla"] * args.no_xla + ["--quick"] * (args.quick or backend not in args.epoch_backends.split(","))
            env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                rows.append({"backend": backend, "loss": loss, "error": (done.stderr.strip().splitlines() or ["?"])[-1][:120]})
                continue
            result = json.loads(lines[-1][7:])
            rows.append(row(backend, loss, not args.no_xla, result, peak))
            # Written after every row: a run stopped at a time limit keeps what it measured.
            write_section("train-speed" + ("-gpu" if gpu else "") + ("-quick" if args.quick else ""),
                          "Training speed (paper configuration)" + (f" on {device}" if gpu else ""), rows,
                          notes=notes)
    return 0


def report_ce_floor(steps: int) -> int:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if os.environ["KERAS_BACKEND"] != "tensorflow":
        raise SystemExit("--ce-floor times TensorFlow: run it with KERAS_BACKEND=tensorflow")
    rows = ce_floor(steps)
    t = {row["what"]: row["ms per 128x200 step"] for row in rows}
    matmuls = min(t["the loss's 3 matmuls, XLA"], t["the loss's 3 matmuls, TensorFlow kernels (oneDNN)"])
    bce_step, ce_step = t["whole BCE train step (TensorFlow, XLA)"], t["whole CE train step (TensorFlow, XLA)"]
    text = (f"With the logits materialised, a CE step is the BCE step (the same model) plus at least the loss's "
            f"matmuls: {bce_step:.0f} + {matmuls:.0f} ms, so at most {1000 * BATCH / (bce_step + matmuls):.0f} "
            f"sequences/s; measured {ce_step:.0f} ms ({1000 * BATCH / ce_step:.0f} sequences/s). 400 sequences/s "
            f"needs {1000 * BATCH / 400:.0f} ms per step.")
    print(text, flush=True)
    notes = (f"Paper configuration (maxlen {MAXLEN}, d {D}, {BLOCKS} blocks, batch {BATCH}, {VOCAB - 2} items), full "
             f"windows, {steps} timed steps after one that compiles, one TensorFlow process. The loss's matmuls: the "
             f"({BATCH * MAXLEN:,} x {D}) x ({D} x {VOCAB:,}) logits and the two gradient matmuls that read the "
             f"({BATCH * MAXLEN:,} x {VOCAB:,}) logits gradient (350 MB in float32). " + text)
    write_section("train-speed-ce-floor", "Training speed: what a full-softmax CE step cannot go below", rows, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
