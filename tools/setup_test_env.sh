#!/usr/bin/env bash
# System pieces some tests use, installed when this machine allows it (root + apt), else left out: the
# tests that need them then skip and say why. Idempotent and quick once installed.
#   Open MPI + mpi4py: multi-node preprocessing (mpirun) tests.
set -u
PY=${1:-.venv/bin/python}
if ! command -v mpirun >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup_test_env: installing Open MPI (apt)"
  (apt-get update -qq && apt-get install -y -qq --no-install-recommends openmpi-bin libopenmpi-dev) >/dev/null 2>&1 \
    || echo "setup_test_env: Open MPI could not be installed; MPI tests will skip"
fi
if command -v mpicc >/dev/null 2>&1 && ! "$PY" -c "import mpi4py" >/dev/null 2>&1; then
  echo "setup_test_env: installing mpi4py"
  "$PY" -m pip install -q mpi4py >/dev/null 2>&1 || echo "setup_test_env: mpi4py could not be installed"
fi
exit 0
