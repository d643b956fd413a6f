"""`sasrec train` and `sasrec evaluate`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pipelines.errors import InputError

BACKENDS = ("tensorflow", "jax", "torch")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train SASRec on a dataset folder",
        description="Train SASRec on a dataset folder made by `sasrec prepare`. A run folder that already "
        "holds checkpoints is resumed. Settings: --config FILE (TOML, see configs/), then --set key=value.",
    )
    p.add_argument("--data", required=True, type=Path, help="dataset folder (from `sasrec prepare`)")
    p.add_argument("--out", required=True, type=Path, help="run folder to create or resume")
    p.add_argument("--config", help="TOML config file, or a preset: dense | sparse (default: the preset that fits "
                   "the data, dense when the mean history has >= 30 events)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config field (repeatable)")
    p.add_argument("--backend", choices=BACKENDS, help="Keras backend (default: $KERAS_BACKEND or tensorflow)")
    p.add_argument("--epochs", type=int, help="shortcut for --set epochs=N")
    p.add_argument("--xla", action=argparse.BooleanOptionalAction, default=None, help="XLA-compile steps (config jit_compile)")
    p.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=None, help="bfloat16 compute")
    p.add_argument("--devices", type=int, default=1, help="data-parallel over this many local devices (TF MirroredStrategy / JAX DataParallel)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)

    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a trained run (HR, NDCG, MRR at 1/5/10/20)",
        description="Evaluate RUN/best.keras. Protocols: full (every item, seen items removed) and "
        "sampled-100 (100 uniform unseen negatives, the SASRec paper's). Writes RUN/metrics.json.",
    )
    p.add_argument("--run", required=True, type=Path, help="run folder (from `sasrec train`)")
    p.add_argument("--data", type=Path, help="dataset folder (default: the one the run was trained on)")
    p.add_argument("--split", choices=("valid", "test"), default="test")
    p.add_argument("--protocol", choices=("full", "sampled-100", "both"), default="full")
    p.add_argument("--backend", choices=BACKENDS)
    p.set_defaults(func=run_evaluate)


def select_backend(name: str | None) -> None:
    """Keras reads KERAS_BACKEND once, at import: set it before anything imports keras."""
    if name:
        os.environ["KERAS_BACKEND"] = name
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def load_config(args) -> "SASRecConfig":  # noqa: F821
    from pipelines.dataset import read_manifest
    from sasrec.config import PRESETS, SASRecConfig

    if args.config in PRESETS:
        config = SASRecConfig.preset(args.config)
    elif args.config:
        config = SASRecConfig.from_toml(args.config)
    else:
        mean_length = read_manifest(args.data)["statistics"]["mean_length"]
        name = SASRecConfig.preset_for(mean_length)
        print(f"Config: the {name} preset (mean history length {mean_length:.1f}); see configs/{name}.toml")
        config = SASRecConfig.preset(name)
    overrides = list(args.set)
    if args.epochs is not None:
        overrides.append(f"epochs={args.epochs}")
    if args.xla is not None:
        overrides.append(f"jit_compile={str(args.xla).lower()}")
    if args.mixed_precision is not None:
        overrides.append(f"mixed_precision={str(args.mixed_precision).lower()}")
    return config.with_overrides(overrides)


def run_train(args) -> int:
    select_backend(args.backend)
    from sasrec import distributed

    distributed.expose_host_devices(args.devices)
    if not (args.data / "manifest.json").is_file():
        raise InputError(f"--data {args.data}: not a dataset folder (no manifest.json); make one with `sasrec prepare`")
    config = load_config(args)
    from sasrec.train import check_tensorboard, train

    check_tensorboard(config)
    with distributed.data_parallel(args.devices) as strategy:
        if strategy is not None:
            print(f"Training on {args.devices} device(s) ({type(strategy).__name__})")
        result = train(args.data, args.out, config, verbose=0 if args.quiet else "auto")
    print_results(result)
    return 0


def run_evaluate(args) -> int:
    select_backend(args.backend)
    from sasrec.train import evaluate_run

    protocols = ("full", "sampled-100") if args.protocol == "both" else (args.protocol,)
    result = evaluate_run(args.run, splits=(args.split,), protocols=protocols, data_dir=args.data)
    print_results(result)
    return 0


def print_results(result: dict) -> None:
    ks = (1, 5, 10, 20)
    header = f"{'split':<6} {'protocol':<12} {'model':<11} " + " ".join(f"{m + '@' + str(k):>8}" for m in ("hr", "ndcg", "mrr") for k in ks)
    print(header)
    for r in result["results"]:
        p = r["protocol"]
        for name, metrics in (("sasrec", r["metrics"]), ("popularity", r.get("popularity"))):
            if metrics:
                row = " ".join(f"{metrics[f'{m}@{k}']:>8.4f}" for m in ("hr", "ndcg", "mrr") for k in ks)
                print(f"{p['split']:<6} {p['protocol']:<12} {name:<11} {row}")
    users = {r["protocol"]["users_evaluated"] for r in result["results"]}
    print(f"users evaluated: {', '.join(map(str, sorted(users)))}; protocol details in metrics.json")
    if "training" in result:
        t = result["training"]
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in t.items()}))
