"""Training speed: sequences per second, seconds per epoch and the fraction of peak FLOP/s reached.

    python -m benchmarks.train_speed [--backends tensorflow,jax] [--losses bce,ce] [--quick]

Each (backend, loss) runs in its own process (Keras picks its backend at import). Two figures:
- full windows: batches of 128 sequences of 200 items (the paper configuration: d 50, 2 blocks,
  1 head), timed over ``--steps`` train steps after warm-up: comparable with the reference figures
  of other implementations in TARGETS.md;
- ML-1M epoch: one epoch of the real training feed (length bucketing on), after a first epoch that
  compiles every batch shape (skipped when ../shared/data is absent).
FLOPs are counted analytically (matmuls only, backward = 2 x forward).
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


def child(loss: str, steps: int, jit: bool, epoch: bool) -> dict:
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
    if epoch and ML1M.exists():
        out.update(ml1m_epoch(model, config, loss))
    return out


def ml1m_epoch(model, config, loss: str) -> dict:
    import tempfile

    from pipelines.dataset import read_dataset
    from pipelines.prepare import prepare_file
    from sasrec.feed import TrainingFeed

    with tempfile.TemporaryDirectory() as tmp:
        prepare_file("pairs", ML1M, Path(tmp) / "ml1m", kcore="none")
        ds = read_dataset(Path(tmp) / "ml1m")
    feed = TrainingFeed(ds, maxlen=config.maxlen, batch_size=BATCH, loss=loss, seed=0)
    model.fit(feed, epochs=1, verbose=0)  # compiles every bucket shape
    feed.set_epoch(1)
    started = time.perf_counter()
    model.fit(feed, epochs=1, verbose=0)
    seconds = time.perf_counter() - started
    return {"ml1m_epoch_s": seconds, "ml1m_windows_per_s": len(feed.windows) / seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="tensorflow,jax")
    parser.add_argument("--losses", default="bce,ce")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-xla", action="store_true", help="plain tf.function / no jit")
    parser.add_argument("--quick", action="store_true", help="few steps, no ML-1M epoch (CI-sized)")
    parser.add_argument("--epoch-backends", default="tensorflow,jax",
                        help="backends whose ML-1M epoch is timed too (the others: full windows only)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.steps, not args.no_xla, epoch=not args.quick)))
        return 0
    steps = 3 if args.quick else args.steps
    peak, peak_text, device = peak_flops()
    gpu = device != "CPU"
    notes = (f"Paper configuration: maxlen {MAXLEN}, d {D}, {BLOCKS} blocks, 1 head, batch {BATCH}, "
             f"{VOCAB - 2} items. Peak assumed {peak / 1e9:,.0f} GFLOP/s ({peak_text}). Reference "
             "(TARGETS.md, same kind of machine): SASRec.pytorch ~370, keras-rs ~350-545 windows/s (BCE); "
             "plain Keras full-softmax CE ~147 windows/s. The ML-1M epoch uses length bucketing, so short "
             "histories cost less than full windows.")
    rows = []
    for backend in args.backends.split(","):
        for loss in args.losses.split(","):
            cmd = [sys.executable, "-m", "benchmarks.train_speed", "--child", loss, "--steps", str(steps)]
            cmd += ["--no-xla"] * args.no_xla + ["--quick"] * (args.quick or backend not in args.epoch_backends.split(","))
            env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                rows.append({"backend": backend, "loss": loss, "error": (done.stderr.strip().splitlines() or ["?"])[-1][:120]})
                continue
            result = json.loads(lines[-1][7:])
            flops = result["full_window_seq_per_s"] * train_flops_per_sequence(loss)
            rows.append({
                "backend": backend, "loss": loss, "xla": not args.no_xla,
                "full windows seq/s": result["full_window_seq_per_s"], "ms/step (128x200)": result["ms_per_step"],
                "GFLOP/s": flops / 1e9, "% of peak": 100 * flops / peak,
                "ML-1M epoch s": result.get("ml1m_epoch_s", ""), "ML-1M windows/s": result.get("ml1m_windows_per_s", ""),
            })
            # Written after every row: a run stopped at a time limit keeps what it measured.
            write_section("train-speed" + ("-gpu" if gpu else "") + ("-quick" if args.quick else ""),
                          "Training speed (paper configuration)" + (f" on {device}" if gpu else ""), rows,
                          notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
