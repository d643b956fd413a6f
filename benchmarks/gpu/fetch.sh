#!/usr/bin/env bash
# Prepare, on this (CPU) machine, what the GPU machine of the `device` tool lacks: it has JAX with
# CUDA, numpy, pandas, pyarrow, h5py, rich, ml-dtypes and no internet, but no TensorFlow, Keras or
# tomli-w. Downloads the pure-Python / cp312 wheels into .whl/ and copies ML-1M into .gpudata/; both
# folders are in .gitignore and only travel to that machine (the data's licence forbids committing it).
#
#   bash benchmarks/gpu/fetch.sh
#   then, with the device tool: run(command="bash benchmarks/gpu/run.sh", carry=[".whl", ".gpudata"])
set -euo pipefail
cd "$(dirname "$0")/../.."
keras=$(python3 -c 'from importlib.metadata import version; print(version("keras"))' 2>/dev/null || echo 3.15.1)
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "keras==$keras" namex optree tomli-w
mkdir -p .gpudata/ml-1m
cp ../shared/data/ml-1m/ml-1m.txt.gz .gpudata/ml-1m/
ls -l .whl .gpudata/ml-1m
