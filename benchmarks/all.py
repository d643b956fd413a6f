"""Run every benchmark (`make bench`); `--quick` runs the CI-sized variants.

Each script writes its own section of BENCHMARKS.md (the soak test: RELIABILITY.md). The quality benchmark's full variant trains on
the real data sets for hours on a CPU; the quick variant trains the synthetic demo data.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    quick = ["--quick"] if args.quick else []
    scripts = [
        ("pipeline", quick),
        ("train_speed", quick),
        # Quick runs write their own "-quick" sections; serving and soak only print theirs, so the
        # full figures in BENCHMARKS.md / RELIABILITY.md are never replaced by CI-sized ones.
        ("serving", ["--seconds", "2", "--concurrency", "1,16", "--no-report"] if args.quick else []),
        ("batch", quick),
        ("quality", quick),
        ("time_to_quality", quick),
        ("soak", ["--quick", "--no-report"] if args.quick else []),  # writes RELIABILITY.md
    ]
    failed = []
    for name, extra in scripts:
        print(f"== benchmarks.{name} {' '.join(extra)}", flush=True)
        if subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *extra], cwd=ROOT).returncode:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
