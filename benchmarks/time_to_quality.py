"""Time to quality on ML-1M: wall clock from process start to the reported test metric.

    python -m benchmarks.time_to_quality [--backend jax] [--cases ce,bce] [--ce-set key=value ...]

Each case trains from scratch with `sasrec train` in a fresh process (imports, compilation, every
validation and the final test evaluation all count) and stops as soon as validation NDCG@10 reaches
the target value on the target's protocol (or at its epoch budget, or by patience): the stop
threshold is the target itself, chosen before any run and from validation only, never from test results. The row reports the whole process's wall time
and the test metric the target is stated on:

- ``ce``: `configs/dense.toml`, target full-ranking NDCG@10 >= 0.18 within 60 s on one GPU;
- ``bce``: `configs/ml-1m-paper.toml`, target sampled-100 NDCG@10 >= 0.59 within 60 s on one GPU.

On the GPU machine (JAX, no TensorFlow) run it with ``--backend jax``; `benchmarks/gpu/run.sh` does
that with the carried wheels and data. ``--quick`` trains the synthetic demo data instead (CI-sized).
``--variant 'KEY=VALUE ...'`` (repeatable) compares settings in one run, ``--budget-s`` skips what would
not finish in time. Results go to the "time-to-quality" section of BENCHMARKS.md ("time-to-quality-gpu"
on a GPU).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.quality import CASES as QUALITY_CASES
from benchmarks.quality import sasrec, synthetic_source
from benchmarks.report import SHARED_DATA, accelerator, write_section
from sasrec.run import RunFolder

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    config: str
    protocol: str  # the test protocol the target is stated on
    target: float  # NDCG@10 on that protocol
    speed: tuple[str, ...]  # how often to validate and how long to wait for an improvement

    @property
    def overrides(self) -> tuple[str, ...]:
        """The stop rule, fixed before any run: validation NDCG@10, on the protocol the target is stated
        on, reaches the target value itself. Only validation data decides when to stop; a run may stop
        there and still miss the target on test, and the table shows it."""
        return (f"val_protocol={self.protocol}", f"stop_at_ndcg={self.target}", *self.speed)


CASES = {
    "ce": Case("configs/dense.toml", "full", 0.18, ("eval_every=1", "patience=5")),
    # Sampled validation is noisier than full ranking: patience 25 evaluations = the paper config's 50 epochs.
    "bce": Case("configs/ml-1m-paper.toml", "sampled-100", 0.59, ("eval_every=2", "patience=25")),
}


def prepare(work: Path, quick: bool) -> Path:
    data = work / ("synthetic" if quick else "ml1m")
    if not (data / "manifest.json").exists():
        source = synthetic_source(work) if quick else QUALITY_CASES["ml1m-ce"].prepare
        sasrec("prepare", *source, "--out", str(data))
    return data


def run_case(name: str, case: Case, data: Path, run: Path, backend: str, extra: list[str], quick: bool) -> dict:
    shutil.rmtree(run, ignore_errors=True)  # from scratch: a resumed run would not be a time to quality
    sets = [a for s in (*case.overrides, "tensorboard=false", *extra) for a in ("--set", s)]
    started = time.perf_counter()
    sasrec("train", "--data", str(data), "--out", str(run), "--config", case.config, "--backend", backend,
           "--quiet", *sets)
    wall = time.perf_counter() - started
    metrics = RunFolder(run).read_metrics()
    result = next(r for r in metrics["results"] if r["protocol"]["protocol"] == case.protocol)
    ndcg, training = result["metrics"]["ndcg@10"], metrics["training"]
    return {
        "case": name,
        "backend": backend,
        "device": accelerator(),
        "config": case.config + "".join(f" {s}" for s in (*case.overrides, *extra)),
        "epochs (best)": f"{training['epoch']} ({training['best_epoch']})",
        "train s": training["train_seconds"],
        "wall s (process)": wall,
        "test NDCG@10": ndcg,
        "protocol": case.protocol,
        "target": "" if quick else f"NDCG@10 >= {case.target} in <= 60 s",
        "met": "" if quick else ("yes" if ndcg >= case.target and wall <= 60 else "no"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="tensorflow", choices=["tensorflow", "jax", "torch"])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "time-to-quality")
    parser.add_argument("--quick", action="store_true", help="synthetic demo data, 2 epochs (CI-sized)")
    for name in CASES:
        parser.add_argument(f"--{name}-set", action="append", default=[], metavar="KEY=VALUE",
                            help=f"extra config override for the {name} case")
    parser.add_argument("--variant", action="append", default=[], metavar="'KEY=VALUE ...'",
                        help="overrides for every case, one row per case and variant (repeatable; default: one "
                        "variant without overrides); compares settings in one run")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="skip the remaining runs once this many seconds have passed or the next run would "
                        "likely pass them (0: no limit); rows are written after every run")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if not args.quick and not (SHARED_DATA / "ml-1m" / "ml-1m.txt.gz").is_file():
        print(f"{SHARED_DATA}/ml-1m/ml-1m.txt.gz is absent: this benchmark needs ML-1M", file=sys.stderr)
        return 1
    args.work.mkdir(parents=True, exist_ok=True)
    data = prepare(args.work, args.quick)
    section = "time-to-quality" + ("-gpu" if accelerator() != "CPU" else "") + ("-quick" if args.quick else "")
    notes = (
        "Wall time of one `sasrec train` process from start to the test metrics written (imports, data "
        "loading, compilation, validations, final evaluation), trained from scratch; leave-one-out, all 6,040 users. "
        "Stop rule (validation only): validation NDCG@10 on the target's protocol reaches the target value. "
        "Targets (issue 6): on one H100/H200, full NDCG@10 >= 0.18 with ce and sampled-100 NDCG@10 >= 0.59 with bce, "
        "each within 60 s." + (" Quick mode: synthetic data, 2 epochs, no target." if args.quick else "")
    )
    rows, longest = [], 0.0
    for v, variant in enumerate(args.variant or [""]):
        for name in args.cases.split(","):
            elapsed = time.perf_counter() - started
            if args.budget_s and elapsed + max(longest, 60.0) > args.budget_s:
                print(f"skipped {name} [{variant}]: {elapsed:.0f} s of the {args.budget_s:.0f} s budget used", flush=True)
                continue
            extra = [*getattr(args, f"{name}_set"), *variant.split()]
            extra += ["epochs=2", "maxlen=50", "stop_at_ndcg=0"] if args.quick else []
            run = args.work / (f"run-{name}-{args.backend}" + (f"-v{v}" if len(args.variant) > 1 else ""))
            row = run_case(name, CASES[name], data, run, args.backend, extra, args.quick)
            longest = max(longest, row["wall s (process)"])
            print(row, flush=True)
            rows.append(row)
            write_section(section, "Time to quality (ML-1M, from process start)", rows, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
