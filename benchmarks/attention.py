"""Attention variants (issue 19): a short screen of each variant against today's attention on ML-1M.

    python -m benchmarks.attention [--dataset DIR] [--epochs 4] [--eval-max-users 1000] [--variants a,b]
    python -m benchmarks.attention --long-histories [--maxlens 200,1000,2000] [--steps 5]
    python -m benchmarks.attention --full --variants a,b [--seeds 42,1,2] [--work runs/attention] [--dataset DIR]
                                   [--preset dense|sparse] [--on ml-1m|beauty|ml-100k]
    python -m benchmarks.attention --serving-cost [--variants a,b] [--seconds 3] [--rounds 3]

Each variant trains the ``dense`` preset (configs/dense.toml) with its attention fields changed and
nothing else, from scratch, for a fixed small number of epochs (``--epochs``), validating on a
seeded sample of ``--eval-max-users`` users (full ranking, seen items removed) after the last epoch.
Reported per variant: validation NDCG@10 / HR@10 after those epochs and training seconds per epoch
(the mean over epochs after the first, which also compiles). This is a screen, not the issue's
protocol: a few epochs of one seed rank how fast each variant learns, not where it ends; the leaders
need full runs (early stopping, all users, test split, 3 seeds) before a preset changes. A run of some
``--variants`` replaces their rows and keeps the others (column ``measured``: the date of each row's run).

``--long-histories`` times what linear attention is for: one training step (forward and backward, BCE,
TF with XLA) of a 2-block d-64 model on synthetic ids of batch 32 at each maxlen, softmax against
linear attention, each in its own process (median of ``--steps`` steps after compiling; that process's
peak RSS), into section ``attention-long``. It needs no data.

``--full`` is the issue's protocol for the leaders: each variant and seed trains the dense preset with
``sasrec train`` to the preset's own early stop (validation on all users) in run folder
``WORK/<variant>-s<seed>``, which an interrupted benchmark resumes (a finished run is only read back);
reported are each run's test HR@10 / NDCG@10 (full ranking, all users) and, per variant, the mean and
the spread (max - min) over its seeds, into section ``attention-full`` (other variants' rows are kept, and
so are a variant's seeds that this run did not train: seeds run in parallel processes count together).
``--preset sparse`` does the same with the sparse preset on Beauty (``Beauty.txt``, run folders
``WORK/<variant>-sparse-s<seed>``, section ``attention-full-beauty``). ``--on ml-100k`` runs a preset on
another data set (ML-100K's ``u.data``; run folders ``WORK/<variant>-ml-100k-<preset>-s<seed>``, section
``attention-full-ml-100k-<preset>``), to see whether what won on the preset's own data generalises.

``--serving-cost`` exports each variant at the dense preset's shape with random weights and measures its
in-process cost per user (batches of 64, and single users) in rounds taken in turn over the variants,
into section ``attention-serving``. It needs no data.

``--dataset`` is a prepared ML-1M folder (``sasrec prepare --format pairs`` of ml-1m.txt.gz, no
k-core); without it the script prepares ``../shared/data/ml-1m/ml-1m.txt.gz`` (or
``$SASREC_SHARED_DATA``) into a temporary folder. When neither is there it says so and exits 0.
Results go to the ``attention`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.report import SHARED_DATA, accelerator, section_rows, write_section, write_section_keeping  # noqa: E402

DATA = SHARED_DATA / "ml-1m" / "ml-1m.txt.gz"
# --full --on: the data sets (file, `sasrec prepare` format) and the preset each is measured with by default.
FULL_DATA = {
    "ml-1m": dict(data_name="ML-1M", data=DATA, format="pairs", preset="dense"),
    "beauty": dict(data_name="Beauty", data=SHARED_DATA / "beauty" / "Beauty.txt", format="sequences", preset="sparse"),
    "ml-100k": dict(data_name="ML-100K", data=SHARED_DATA / "ml-100k" / "u.data", format="movielens", preset="dense"),
}


def full_setting(preset: str, on: str | None) -> dict:
    """Where ``--full`` runs of ``preset`` on data set ``on`` (default: the preset's own) go: the data set's
    entry with its section and run-folder suffix (the first two settings keep their original names, so their
    earlier runs still resume)."""
    on = on or next(key for key, where in FULL_DATA.items() if where["preset"] == preset)
    named = {("dense", "ml-1m"): ("attention-full", ""), ("sparse", "beauty"): ("attention-full-beauty", "-sparse")}
    section, suffix = named.get((preset, on), (f"attention-full-{on}-{preset}", f"-{on}-{preset}"))
    return {**FULL_DATA[on], "key": on, "section": section, "suffix": suffix}


# name -> config overrides on top of the dense preset; "default" is the preset as it is.
VARIANTS = {
    "default": {},
    "cosine": dict(attention_similarity="cosine"),
    "silu": dict(attention_normalisation="silu"),
    # One window per block: measured on the 2-block model, so it says so for the 4-block dense preset.
    "window 50 / global": dict(num_blocks=2, warmup_steps=0, attention_window=[50, 0]),
    "relative bias": dict(position_bias="relative"),
    "rotary (no absolute)": dict(position_bias="rotary", absolute_positions=False),
    "linear": dict(attention_normalisation="linear"),
    # Depth, with a learning-rate warm-up (about 4 epochs of ML-1M) so the deeper stack starts stably: the
    # dense preset's since 2026-12-01 (so a no-op on it now; kept for the runs that decided it), and the
    # 2-block model it replaced.
    "4 blocks": dict(num_blocks=4, warmup_steps=200),
    "2 blocks": dict(num_blocks=2, warmup_steps=0),
    "6 blocks": dict(num_blocks=6),
    # A fixed budget with the learning rate annealed to 0 instead of a constant rate and early stopping: the
    # constant-rate 4-block runs peaked at epochs 50-62.
    "cosine lr 70 epochs": dict(lr_decay="cosine", epochs=70),
    # The two changes that lifted the dense preset's full softmax on ML-1M, for the sparse preset (a no-op on
    # the dense one, which has both).
    "seen negatives out + beta_2 0.999": dict(exclude_seen_negatives=True, beta_2=0.999),
    # For the sparse preset (the dense one has both already): positions counted from the start, which
    # let live histories continue cached states (issue 18), and twice the width: the sparse preset's since
    # 2026-12-02 (a no-op on it now; kept for the runs that decided it), and the width it replaced.
    "positions from start": dict(positions="from_start"),
    # Relative positions only, counted from the start so states continue: rotary scores depend only on the
    # distance between query and key, so counting from the start costs the rotary model nothing.
    "rotary from start": dict(position_bias="rotary", absolute_positions=False, positions="from_start"),
    "d 128": dict(hidden_units=128),
    "d 64": dict(hidden_units=64),
    "d 256": dict(hidden_units=256),
    # The two that led on Beauty, together.
    "cosine d 128": dict(attention_similarity="cosine", hidden_units=128),
    # Regularising the d 128 sparse preset, which peaked at epoch 20 on Beauty with a constant rate and
    # overfitted after: the learning rate annealed over twice that (the sparse preset's since 2026-12-02, so
    # a no-op on it now), the constant rate it replaced, or decoupled weight decay.
    "cosine lr 40 epochs": dict(lr_decay="cosine", epochs=40),
    "constant lr": dict(lr_decay="none", epochs=200),
    # The annealed rate's best epochs came late (30-40 of 40): a longer horizon.
    "cosine lr 60 epochs": dict(lr_decay="cosine", epochs=60),
    "weight decay 0.1": dict(weight_decay=0.1),
    # A quarter of ML-1M's users hold more than maxlen + 1 training items, so one window per user leaves a
    # third of the training events unseen: earlier full windows every maxlen items see 87% of them. The dense
    # preset's since 2026-12-03 (a no-op on it now; kept for the runs that decided it), and the paper's one
    # window per user that it replaced.
    "sliding windows 200": dict(sliding_window_step=200),
    "one window per user": dict(sliding_window_step=0),
}
# --long-histories: the model and batch of the step timing; the catalog is ML-1M's size.
LONG_BATCH, LONG_HIDDEN, LONG_BLOCKS, LONG_ITEMS = 32, 64, 2, 3416


def run_name(variant: str) -> str:
    return variant.replace(" ", "-").replace("/", "").replace("(", "").replace(")", "")


def screen(name: str, fields: dict, data: Path, work: Path, args) -> dict:
    from sasrec.config import SASRecConfig
    from sasrec.train import train

    config = SASRecConfig(**{**SASRecConfig.preset("dense").to_dict(), **fields, "epochs": args.epochs,
                             "eval_every": args.epochs, "eval_max_users": args.eval_max_users,
                             "tensorboard": False})
    run = work / run_name(name)
    started = time.perf_counter()
    train(data, run, config, verbose=0)
    wall = time.perf_counter() - started
    with open(run / "log.csv") as f:
        log = list(csv.DictReader(f))
    seconds = [float(row["wall_seconds"]) for row in log]
    per_epoch = [b - a for a, b in zip(seconds, seconds[1:])] or seconds
    last = log[-1]
    return {
        "variant": name,
        "fields": " ".join(f"{k}={v}" for k, v in fields.items()) or "(dense preset)",
        "epochs": len(log),
        "val NDCG@10": float(last["val_ndcg@10"]),
        "val HR@10": float(last["val_hr@10"]),
        "s / epoch": sum(per_epoch) / len(per_epoch),
        "first epoch s": seconds[0],
        "wall s": wall,
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def training_step_time(normalisation: str, maxlen: int, steps: int) -> dict:
    """Median seconds of one training step (BCE, TF with XLA) and this process's peak RSS; runs in a
    process of its own, so that the peak belongs to this configuration alone."""
    import resource
    import statistics

    import keras
    import numpy as np

    from pipelines.dataset import FIRST_ITEM_ID
    from sasrec.config import SASRecConfig
    from sasrec.losses import SequenceLoss
    from sasrec.model import build_model

    keras.utils.set_random_seed(0)
    config = SASRecConfig(maxlen=maxlen, hidden_units=LONG_HIDDEN, num_blocks=LONG_BLOCKS, loss="bce",
                          positions="from_start", attention_normalisation=normalisation)
    vocab = LONG_ITEMS + FIRST_ITEM_ID
    model = build_model(config, vocab)
    model.training_loss = SequenceLoss("bce")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=True)
    rng = np.random.default_rng(0)
    ids, pos, neg = (rng.integers(FIRST_ITEM_ID, vocab, (LONG_BATCH, maxlen)).astype("int32") for _ in range(3))
    model.train_on_batch(ids, {"pos": pos, "neg": neg})  # compiles
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        model.train_on_batch(ids, {"pos": pos, "neg": neg})
        seconds.append(time.perf_counter() - started)
    return {"seconds": statistics.median(seconds), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def attention_tensor_mib(normalisation: str, maxlen: int) -> float:
    """The largest attention tensor of one block (float32, one head): the (B, L, L) weights for softmax;
    for linear the chunks' C x C scores plus their D x D prefix sums."""
    from sasrec.layers import LINEAR_CHUNK

    if normalisation == "softmax":
        return LONG_BATCH * maxlen * maxlen * 4 / 2**20
    chunks = -(-maxlen // LINEAR_CHUNK)
    return LONG_BATCH * chunks * (LINEAR_CHUNK**2 + LONG_HIDDEN**2) * 4 / 2**20


def long_histories(args) -> int:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    rows = []
    for maxlen in [int(n) for n in args.maxlens.split(",")]:
        measured = {}
        for normalisation in ("softmax", "linear"):
            # A fresh process per configuration: its own compile and its own peak memory.
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                measured[normalisation] = pool.submit(training_step_time, normalisation, maxlen, args.steps).result()
            print(maxlen, normalisation, measured[normalisation], flush=True)
        softmax, linear = measured["softmax"], measured["linear"]
        rows.append({
            "maxlen": maxlen,
            "softmax ms / step": softmax["seconds"] * 1000,
            "linear ms / step": linear["seconds"] * 1000,
            "softmax / linear": softmax["seconds"] / linear["seconds"],
            "softmax peak RSS MiB": softmax["peak_rss_mib"],
            "linear peak RSS MiB": linear["peak_rss_mib"],
            "softmax attention MiB": attention_tensor_mib("softmax", maxlen),
            "linear attention MiB": attention_tensor_mib("linear", maxlen),
        })
    notes = (
        f"One training step (forward and backward, BCE with one negative per position, Adam), TF with XLA on "
        f"{accelerator()}: {LONG_BLOCKS} blocks, d {LONG_HIDDEN}, one head, dropout 0.2, batch {LONG_BATCH} of full "
        f"windows of synthetic ids over {LONG_ITEMS:,} items; median of {args.steps} steps after the compiling one, "
        "softmax and linear of one maxlen measured back to back. Peak RSS: the whole process (TensorFlow, model, "
        "XLA buffers), each configuration in its own process. Attention MiB: the largest attention tensor of one "
        "block, computed not measured (softmax: the (B, L, L) float32 weights, of which a training step keeps "
        "several; linear: the chunks' 64 x 64 scores plus their D x D prefix sums)."
    )
    write_section("attention-long", "Linear attention on long histories: training step time and memory", rows,
                  notes=notes)
    return 0


def full_run(name: str, seed: int, data: Path, work: Path, preset: str, suffix: str) -> dict:
    """Train (or resume, or read back) one variant and seed with the preset's stopping rule: its row."""
    import json
    import subprocess

    from sasrec.run import RunFolder

    run = work / f"{run_name(name)}{suffix}-s{seed}"
    overrides = [a for key, value in {**VARIANTS[name], "seed": seed}.items() for a in ("--set", f"{key}={json.dumps(value)}")]
    subprocess.run([sys.executable, "-m", "sasrec", "train", "--data", str(data), "--out", str(run),
                    "--config", str(ROOT / "configs" / f"{preset}.toml"), "--quiet", *overrides], cwd=ROOT, check=True)
    folder = RunFolder(run)
    test = folder.test_metrics("full")
    training = folder.read_metrics()["training"]
    return {
        "variant": name, "seed": seed, "test HR@10": test["hr@10"], "test NDCG@10": test["ndcg@10"],
        "best val NDCG@10": training["best"], "epochs (best)": f"{training['epoch']} ({training['best_epoch']})",
        "s / epoch": training["train_seconds"] / training["epoch"],
    }


def with_seed_means(runs: list[dict], earlier: list[dict]) -> list[dict]:
    """Each variant's seed rows, this run's and the earlier ones (cells as text) of seeds it did not rerun,
    then, for a variant with 2 seeds or more, the mean and spread over all of them: seeds run apart (in
    parallel processes, in another session) count together."""
    import statistics

    fresh = {(row["variant"], str(row["seed"])) for row in runs}
    names = list(dict.fromkeys(row["variant"] for row in runs))
    rows = []
    for name in names:
        seeds = [row for row in earlier if row["variant"] == name and row["seed"].isdigit()
                 and (name, row["seed"]) not in fresh] + [row for row in runs if row["variant"] == name]
        seeds.sort(key=lambda row: int(row["seed"]))
        rows += seeds
        if len(seeds) < 2:
            continue
        summary = {"variant": name, "seed": f"mean of {len(seeds)}"}
        for metric in ("test HR@10", "test NDCG@10", "best val NDCG@10"):
            values = [float(row[metric]) for row in seeds]
            summary[metric] = f"{statistics.mean(values):.4f} (spread {max(values) - min(values):.4f})"
        rows.append(summary)
    return rows


def full_runs(names: list[str], data: Path, args) -> int:
    from pipelines.dataset import read_manifest
    from sasrec.config import SASRecConfig

    where = full_setting(args.preset, args.on)
    runs = []
    for name in names:
        for seed in args.seeds:
            runs.append(full_run(name, seed, data, args.work, args.preset, where["suffix"]))
            print(runs[-1], flush=True)
    config = SASRecConfig.preset(args.preset)
    users = read_manifest(data)["statistics"]["users"]
    notes = (
        f"The issue's protocol: the {args.preset} preset (configs/{args.preset}.toml) with only the variant's "
        f"fields changed, each seed trained with `sasrec train` to the preset's own early stop (validation "
        f"NDCG@10 on all {users:,} users every {config.eval_every} epochs, patience {config.patience}), then "
        f"evaluated once on the test split: full ranking over all items, the user's seen items removed, all "
        f"users; device {accelerator()}. Spread: max - min over the seeds; a variant's gain counts only when it "
        "is larger than the spreads. s / epoch includes epochs that shared the 2 cores with other jobs. Rows of "
        "variants and seeds not in the latest run are kept from earlier runs (a variant's mean counts them); the quality sections hold the preset's own "
        "runs (variant default) under the same protocol."
    )
    # Read now, after hours of training: another process may have written seeds of the same variant meanwhile.
    rows = with_seed_means(runs, section_rows(where["section"])[0])
    write_section_keeping(where["section"], f"Attention variants: full runs on {where['data_name']} ({args.preset} "
                          "preset, test split)", rows, key="variant", notes=notes)
    return 0


def serving_costs(names: list[str], args) -> int:
    """In-process serving cost of each variant at the dense preset's shape (random weights: the cost does not
    depend on them), measured in interleaved rounds so a noisy neighbour hits every variant alike."""
    from benchmarks.serving import ceiling, export_ml1m_sized, histories
    from sasrec.config import SASRecConfig

    dense = SASRecConfig.preset("dense").to_dict()
    users = histories(2000)
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="attention-serving-") as tmp:
        bases = {}
        for name in names:
            bases[name] = Path(tmp) / run_name(name)
            export_ml1m_sized(bases[name], config=SASRecConfig(**{**dense, **VARIANTS[name]}))
        for _ in range(args.rounds):
            for name in names:
                got = ceiling(bases[name], users, seconds=args.seconds, rounds=1)
                if name not in best or got["users_per_s"] > best[name]["users_per_s"]:
                    best[name] = got
    reference = best.get("default")
    rows = []
    for name in names:
        got = best[name]
        row = {"variant": name, "fields": " ".join(f"{k}={v}" for k, v in VARIANTS[name].items()) or "(dense preset)",
               "users/s (batch 64)": got["users_per_s"], "CPU ms / user": got["cpu_ms"],
               "one user p50 ms": got["single_p50_ms"]}
        if reference:
            row["cost x default"] = reference["users_per_s"] / got["users_per_s"]
        print(row, flush=True)
        rows.append(row)
    notes = (
        f"Serving cost per user of each variant, in process (`Recommender`, the SavedModel's serving_default): the "
        f"dense preset's shape (3,416 items, maxlen {dense['maxlen']}, d {dense['hidden_units']}, "
        f"{dense['num_blocks']} blocks unless the variant says otherwise) with "
        f"random weights, ML-1M-like history lengths (median ~96, many cut to {dense['maxlen']}). users/s: batches of 64 for "
        f"{args.seconds:g} s, best of {args.rounds} rounds taken in turn over the variants; CPU ms / user: the "
        "process's CPU time per user in that round; one user p50: 300 single-user calls. cost x default: "
        "default's users/s over the variant's (above 1: dearer to serve). Same 2 cores for every variant, so "
        "compare the ratios; a gRPC server adds its own cost per request (section serving)."
    )
    write_section("attention-serving", "Attention variants: serving cost per user", rows, notes=notes)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, help="prepared ML-1M dataset folder")
    parser.add_argument("--data", type=Path, default=DATA, help="ml-1m.txt.gz, prepared when --dataset is not given")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--eval-max-users", type=int, default=1000)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--long-histories", action="store_true",
                        help="time a training step of softmax vs linear attention at long maxlens instead")
    parser.add_argument("--maxlens", default="200,1000,2000", help="--long-histories: comma-separated maxlens")
    parser.add_argument("--steps", type=int, default=5, help="--long-histories: timed steps per configuration")
    parser.add_argument("--full", action="store_true",
                        help="full runs (early stop, test split) of --variants with each of --seeds instead")
    parser.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default=[42, 1, 2],
                        help="--full: comma-separated training seeds")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "attention",
                        help="--full: where the run folders are kept (and resumed from)")
    parser.add_argument("--preset", choices=["dense", "sparse"], default="dense",
                        help="--full: the preset the variants change: dense (run on ML-1M) or sparse (on Beauty)")
    parser.add_argument("--on", choices=sorted(FULL_DATA),
                        help="--full: another data set for the preset (ml-100k: u.data), e.g. to see that a change "
                        "generalises")
    parser.add_argument("--serving-cost", action="store_true",
                        help="measure each of --variants' in-process serving cost per user instead (no data needed)")
    parser.add_argument("--seconds", type=float, default=3.0, help="--serving-cost: seconds per round and variant")
    parser.add_argument("--rounds", type=int, default=3, help="--serving-cost: rounds over the variants")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if args.long_histories:
        return long_histories(args)
    if args.serving_cost:
        return serving_costs(names, args)
    if not SHARED_DATA.is_dir() or not (args.dataset or args.data.is_file()):
        print(f"skipped: {SHARED_DATA} (ML-1M, ml-1m/ml-1m.txt.gz) is absent; this benchmark needs it", file=sys.stderr)
        return 0
    if args.full:
        where = full_setting(args.preset, args.on)
        source = args.data if where["key"] == "ml-1m" else where["data"]
        # Kept with the runs: a resumed run must find the dataset it started on.
        data = args.dataset or args.work / where["data_name"].lower()
        if not (data / "manifest.json").exists():
            if not source.is_file():
                print(f"skipped: {source} is absent; --full --preset {args.preset} needs it", file=sys.stderr)
                return 0
            from pipelines.prepare import prepare_file

            prepare_file(where["format"], source, data, kcore="none")
        return full_runs(names, data, args)
    notes = (
        f"Screen, not the full protocol: each variant is the dense preset with only its attention fields changed, "
        f"trained from scratch for {args.epochs} epochs (one seed, 42), validated once at the end on "
        f"{args.eval_max_users or 'all'} seeded users (full ranking, seen items removed); device {accelerator()}. "
        "s / epoch: mean training seconds of the epochs after the first (the first also compiles). "
        "A short screen ranks how fast a variant learns, not where it converges; only full runs with early stopping, "
        "all users, the test split and 3 seeds may change the presets (none has yet). Rows of variants not in the "
        "latest run are kept from earlier runs (measured: each row's date; the command above is the latest run's)."
    )
    order = list(VARIANTS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="attention-") as tmp:
        data = args.dataset
        if data is None:
            from pipelines.prepare import prepare_file

            data = Path(tmp) / "ml-1m"
            prepare_file("pairs", args.data, data, kcore="none")
        for name in names:
            row = screen(name, VARIANTS[name], data, Path(tmp), args)
            print(row, flush=True)
            rows.append(row)
            write_section_keeping("attention", "Attention variants: short screen on ML-1M (dense preset)", rows,
                                  key="variant", notes=notes, measured=True,
                                  order=lambda r: order.index(r["variant"]) if r["variant"] in order else len(order))
    return 0


if __name__ == "__main__":
    sys.exit(main())
