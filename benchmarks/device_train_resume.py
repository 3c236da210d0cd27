"""The product's own entry point on the GPU: ``megaprolong.train`` under torchrun on one device, the tiny recipe in
the recipes' settings (bf16, full recompute, periodic checkpoints), run straight to its end; then the same
command on a copy of that run whose two newest checkpoints are deleted, as if it had died after step 4's. The
copy must resume from step 4, log every step once, and take steps 5-12 as the straight run did (bf16 on a GPU:
within its rounding and kernels' nondeterminism; fp32 on the CPU: to 1e-6). Each launch must also end by
itself: a process that hangs at exit fails the step by its timeout. Prints TRAIN_RESUME_OK.

    python benchmarks/device_train_resume.py DIR [--precision fp32]   # the CPU test's form
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS, INTERVAL, RESUME_AT = 12, 4, 4
TOLERANCE = {"bf16": 5e-2, "fp32": 1e-6}  # relative, of each resumed step's loss


def train(run_dir: Path, data: Path, precision: str) -> tuple[str, float]:
    """One launch of megaprolong.train on ``run_dir``: (its output, seconds); exits 1 with its tail on failure."""
    args = ["--config", str(REPO / "examples" / "tiny_stage1.yaml"), "parallel.tp=1", "parallel.sequence_parallel=false",
            f"train.precision={precision}", "train.recompute=full", f"train.steps={STEPS}",
            f"checkpoint.interval={INTERVAL}", f"data.root={data}", f"run.dir={run_dir}"]
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                           "-m", "megaprolong.train", *args], capture_output=True, text=True, timeout=240, cwd=REPO)
    output = proc.stdout + proc.stderr
    if proc.returncode:
        print(output[-4000:])
        sys.exit(f"megaprolong.train on {run_dir} failed (exit {proc.returncode})")
    return output, time.monotonic() - start


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path, help="an empty folder for the runs and their data")
    ap.add_argument("--precision", default="bf16", choices=sorted(TOLERANCE))
    a = ap.parse_args()
    straight, resumed, data = a.dir / "straight", a.dir / "resumed", a.dir / "data"
    _, straight_s = train(straight, data, a.precision)
    shutil.copytree(straight, resumed)
    for step in range(RESUME_AT + INTERVAL, STEPS + 1, INTERVAL):  # the checkpoints after step RESUME_AT
        shutil.rmtree(resumed / "ckpt" / f"step_{step:08d}")
    output, resumed_s = train(resumed, data, a.precision)
    want, got = losses(straight), losses(resumed)
    resumed_from = f"resumed from {resumed / 'ckpt' / f'step_{RESUME_AT:08d}'} at step {RESUME_AT}"
    worst = max((abs(g - w) / abs(w) for (_, g), (_, w) in zip(got[RESUME_AT:], want[RESUME_AT:])), default=math.inf)
    ok = (resumed_from in output and [s for s, _ in got] == [s for s, _ in want] == list(range(1, STEPS + 1))
          and got[:RESUME_AT] == want[:RESUME_AT] and worst <= TOLERANCE[a.precision])
    print(f"RESULT megaprolong.train ({a.precision}, {STEPS} steps, checkpoints every {INTERVAL}): straight run "
          f"{straight_s:.0f} s; resumed at step {RESUME_AT}: {'said so' if resumed_from in output else 'NOT SAID'}, "
          f"steps {RESUME_AT + 1}-{STEPS} loss within {worst:.1e} of the straight run's "
          f"(tolerance {TOLERANCE[a.precision]:.0e}), {resumed_s:.0f} s {'ok' if ok else 'MISMATCH'}", flush=True)
    if not ok:
        print(f"straight {want}\nresumed  {got}")
        sys.exit(1)
    print("TRAIN_RESUME_OK")


if __name__ == "__main__":
    main()
