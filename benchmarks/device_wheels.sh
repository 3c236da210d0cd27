#!/usr/bin/env bash
# The wheels the GPU checks carry to the lent machine (Python 3.12, its own torch 2.11 and transformers 5.17,
# no network): what benchmarks/device_wheels.txt lists, built for that interpreter and platform, without
# their dependencies (the machine has torch, numpy, packaging; tests/test_device_check.py checks that the
# set resolves there and does not bring a torch). Run here, in the repository root; .whl/ is git-ignored.
#   benchmarks/device_wheels.sh [DIR]    (default .whl)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PYTHON=${PYTHON:-python3}
mkdir -p "$DIR"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$DIR" -r benchmarks/device_wheels.txt
du -sh "$DIR"
