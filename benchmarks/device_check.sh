#!/usr/bin/env bash
# The GPU checks on a lent machine (its own python3 and torch): installs the wheels carried in .whl/ (made
# here by benchmarks/device_wheels.sh) into a private folder, then runs benchmarks/device_check.py with the
# arguments given (correctness | performance). Its exit code is the check's: every step's failure fails it.
#   benchmarks/device_check.sh correctness     # then: benchmarks/device_check.sh performance
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=${TMPDIR:-/tmp}/megaprolong-site
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
fi
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
exec python3 benchmarks/device_check.py "$@"
