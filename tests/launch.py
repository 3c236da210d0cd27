"""Run a worker script under torchrun (gloo, CPU) with a timeout, showing the failing rank's traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

WORKERS = Path(__file__).parent / "workers"


def torchrun(worker: str, nproc: int, *args: str, timeout: int = 180) -> str:
    """Run ``tests/workers/<worker>`` (a .py name) or a module (``megaprolong.train``) on ``nproc`` ranks;
    return its output, fail the test with the failing rank's traceback otherwise."""
    target = [str(WORKERS / worker)] if worker.endswith(".py") else ["-m", worker]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *target, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise AssertionError(f"{worker} on {nproc} ranks timed out after {timeout}s\n{out[-4000:]}\n{err[-8000:]}")
    if proc.returncode != 0:
        raise AssertionError(f"{worker} {' '.join(args)} on {nproc} ranks failed ({proc.returncode}):\n"
                             f"{_rank_traceback(proc.stderr)}\n--- stdout ---\n{proc.stdout[-3000:]}")
    return proc.stdout


def _rank_traceback(stderr: str) -> str:
    """The first failing rank's traceback lines ([rankN]: ...), else the tail of stderr."""
    lines = [l for l in stderr.splitlines() if l.startswith("[rank")]
    if lines:
        first = lines[0].split("]:")[0]
        return "\n".join(l for l in lines if l.startswith(first))[-8000:]
    return stderr[-8000:]
