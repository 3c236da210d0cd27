#!/usr/bin/env bash
# Print the path of a Python >= 3.12 (megatron-core 0.17+ needs it), preferring 3.12, the release
# NVIDIA's containers ship. Looks on PATH, then in pyenv's versions (where these machines keep 3.12
# off PATH). Exits 1 with a message on stderr when there is none.
set -u
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }
candidates=(python3.12 python3.13 python3)
root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
for v in "$root"/versions/3.12*/bin/python3.12 "$root"/versions/3.13*/bin/python3.13; do
  candidates+=("$v")
done
for c in "${candidates[@]}"; do
  p=$(command -v "$c" 2>/dev/null) || continue
  if ok "$p"; then echo "$p"; exit 0; fi
done
echo "error: no Python >= 3.12 found (megatron-core 0.19 needs it). Install one, or pass PYTHON=/path/to/python3.12." >&2
exit 1
