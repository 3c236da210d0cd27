"""``megaprolong-pipeline run --local``: the pipeline's steps in order on this machine, without Slurm.

Training and SFT run under torchrun with ``cluster.local_processes`` processes, evaluation through the
Slurm job's script ``slurm/eval.sh`` with ``LOCAL=1`` (its commands here, not through srun); the other steps
in this process. A step whose output is complete (it verifies) is skipped, so a second run continues where the first
stopped; a step that ends without a complete output stops the run, naming what is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys

from megaprolong.config import ConfigError
from megaprolong.pipeline.steps import REPO, Pipeline, Step


def _torchrun(processes: int, module: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m",
            module, *args]


def commands(pipe: Pipeline, step: Step) -> list[list[str]]:
    """The commands a training, SFT or evaluation step runs here."""
    n = pipe.cfg.cluster.local_processes
    if step.kind == "train":
        run, init = step.env["CKPT_DIR"], step.env.get("INIT_CKPT")
        return [_torchrun(n, "megaprolong.train", ["--config", step.env["RECIPE"], f"run.dir={run}",
                                                   f"checkpoint.dir={run}", f"data.root={step.env['DATA_ROOT']}",
                                                   *([f"checkpoint.load={init}"] if init else []), *step.args])]
    if step.kind == "sft":
        return [_torchrun(n, "megaprolong.sft", ["--config", step.env["RECIPE"], *step.args])]
    if step.kind == "eval":  # the Slurm job's own script (suites, then the report), without srun: one definition
        return [["bash", str(REPO / "slurm" / "eval.sh")]]
    raise ValueError(step.kind)


def step_env(step: Step) -> dict:
    """What a step's commands find in their environment beyond this process's: eval.sh's settings."""
    if step.kind == "eval":
        return {**step.env, "LOCAL": "1", "REPO": str(REPO), "PYTHON": sys.executable}
    return {}


def run_local(pipe: Pipeline, say=print) -> list[str]:
    """Run every incomplete step in order; returns the names of the steps that ran."""
    ran = []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for step in pipe.steps():
        if pipe.incomplete(step) is None:
            say(f"{step.name}: complete (verified), skipped")
            continue
        say(f"== {step.name}")
        if step.kind == "python":
            pipe.run_python(step.name, say)
        else:
            for cmd in commands(pipe, step):
                if subprocess.run(cmd, env={**env, **step_env(step)}).returncode:
                    raise ConfigError(f"step {step.name}: {' '.join(cmd[:6])} ... failed (above)")
        missing = pipe.incomplete(step)
        if missing:
            raise ConfigError(f"step {step.name} ended without a complete output: {missing}")
        ran.append(step.name)
    return ran
