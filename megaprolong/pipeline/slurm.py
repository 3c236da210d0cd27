"""``megaprolong-pipeline submit`` and ``status``: the steps as Slurm jobs of the repository's sbatch scripts,
chained with ``--dependency=afterok``; ``ROOT/pipeline.json`` remembers each step's job.

A step whose output is complete is not submitted; one whose job is still pending or running is kept (and
the steps after it wait for it); one whose job can no longer start (its dependency failed) is cancelled and
submitted again. So a second ``submit`` after a failure resumes the chain where it broke.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from megaprolong.config import ConfigError
from megaprolong.pipeline.steps import REPO, Pipeline, Step
from megaprolong.runtime.files import replace_text

RECORD = "pipeline.json"
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "SUSPENDED", "RESIZING"}
SCRIPTS = {"python": "slurm/pipeline_step.sh", "train": "slurm/train.sh", "sft": "slurm/sft.sh", "eval": "slurm/eval.sh"}


def _record(pipe: Pipeline) -> dict:
    try:
        return json.loads((pipe.root / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def _save(pipe: Pipeline, record: dict) -> None:
    pipe.root.mkdir(parents=True, exist_ok=True)
    replace_text(pipe.root / RECORD, json.dumps(record, indent=2))


def job_state(job: str) -> tuple[str, str]:
    """(JobState, Reason) of ``job``; ("ENDED", "") once Slurm no longer knows it."""
    try:
        out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    except FileNotFoundError:
        raise ConfigError("scontrol not found: submit and status need Slurm's commands (run --local runs here)")
    if out.returncode and "invalid job id" not in out.stderr.lower():
        # Slurm could not be asked (no controller, wrong cluster): never report a running job as failed
        raise ConfigError(f"cannot ask Slurm about job {job}: {out.stderr.strip() or out.stdout.strip()}")
    fields = dict(f.split("=", 1) for f in out.stdout.split() if "=" in f)
    return (fields["JobState"], fields.get("Reason", "")) if "JobState" in fields else ("ENDED", "")


def _env(pipe: Pipeline, step: Step) -> dict:
    c = pipe.cfg.cluster
    env = {"REPO": str(REPO), "PYTHON": c.python or sys.executable, "GPUS_PER_NODE": str(c.gpus_per_node),
           "NODE_CHECK": "1" if c.node_check else "0", **({"CONTAINER": c.container} if c.container else {})}
    if step.kind == "python":
        env.update(PIPELINE=str(pipe.path), ROOT=str(pipe.root), STEP=step.name)
    elif step.kind == "train":
        env.update(step.env, EXTRA_ARGS=" ".join(step.args))
    elif step.kind == "sft":  # sft.sh sets the model, data and output folder from its variables
        extra = [a for a in step.args if not a.startswith(("model=", "output_dir=", "data.path=", "data.mds="))]
        env.update(step.env, EXTRA_ARGS=" ".join(extra))
    else:
        env.update(step.env)
    return env


def _sbatch(pipe: Pipeline, step: Step, after: list[str]) -> str:
    pipe.logs_dir.mkdir(parents=True, exist_ok=True)
    name = f"mp-{pipe.root.name}-{step.name.replace(':', '-')}"
    cmd = ["sbatch", "--parsable", f"--job-name={name}", f"--output={pipe.logs_dir / step.name.replace(':', '-')}-%j.out",
           "--open-mode=append", f"--nodes={step.nodes}", f"--chdir={REPO}",
           *([f"--dependency=afterok:{':'.join(after)}"] if after else []), *pipe.cfg.cluster.sbatch,
           str(REPO / SCRIPTS[step.kind])]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **_env(pipe, step)})
    if out.returncode:
        raise ConfigError(f"step {step.name}: sbatch failed: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]


def submit(pipe: Pipeline, say=print) -> dict[str, str]:
    """Submit every incomplete step; returns {step: job id} of the steps submitted or still under way."""
    record, jobs, submitted = _record(pipe), {}, set()
    for step in pipe.steps():
        if pipe.incomplete(step) is None:
            say(f"{step.name:<12} complete (verified): not submitted")
            continue
        previous = record.get(step.name, {}).get("job")
        if previous:
            state, reason = job_state(previous)
            # kept only while it can still start: not waiting on a failed job, nor on a job replaced just now
            # (Slurm may not have marked it DependencyNeverSatisfied yet)
            waits_on_old = any(n in submitted for n in step.needs)
            if state in ACTIVE and "DependencyNeverSatisfied" not in reason and not waits_on_old:
                jobs[step.name] = previous
                say(f"{step.name:<12} job {previous} ({state.lower()}): kept")
                continue
            if state in ACTIVE:  # it would never start
                subprocess.run(["scancel", previous], capture_output=True)
        after = [jobs[n] for n in step.needs if n in jobs]
        jobs[step.name] = _sbatch(pipe, step, after)
        submitted.add(step.name)
        record[step.name] = {"job": jobs[step.name], "submitted": time.strftime("%Y-%m-%d %H:%M:%S")}
        _save(pipe, record)
        say(f"{step.name:<12} job {jobs[step.name]}" + (f" (after {', '.join(after)})" if after else ""))
    return jobs


def _last_error(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    errors = [line for line in lines if re.search(r"error|Error|failed|FAILED", line)]
    return (errors or lines or ["(empty log)"])[-1].strip()[:300]


def _progress(pipe: Pipeline, step: Step) -> str:
    """step N of M and the latest tokens/s, from the run's metrics."""
    if step.kind == "train":
        metrics = Path(step.env["CKPT_DIR"]) / "metrics.jsonl"
        total = pipe.stage_config([s.name for s in pipe.cfg.stages].index(step.name)).train.steps
    elif step.kind == "sft":
        metrics, total = pipe.sft_dir / "metrics.jsonl", None
    else:
        return ""
    try:
        row = json.loads(metrics.read_text().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return ", starting"
    return f", step {row['step']} of {total or '?'}, {row.get('tokens_per_s') or 0:,.0f} tok/s"


def status(pipe: Pipeline) -> list[tuple[str, str, str]]:
    """(step, state, detail) per step: done / running / waiting / failed / not started."""
    record, rows = _record(pipe), []
    for step in pipe.steps():
        job = record.get(step.name, {}).get("job")
        if pipe.incomplete(step) is None:
            rows.append((step.name, "done", f"job {job}" if job else "(made before)"))
            continue
        if not job:
            rows.append((step.name, "not started", ""))
            continue
        state, reason = job_state(job)
        if state == "RUNNING" or state == "COMPLETING":
            rows.append((step.name, "running", f"job {job}{_progress(pipe, step)}"))
        elif state in ACTIVE:
            rows.append((step.name, "waiting", f"job {job} ({state.lower()}: {reason})"))
        else:
            log = pipe.logs_dir / f"{step.name.replace(':', '-')}-{job}.out"
            rows.append((step.name, "failed", f"job {job}: {_last_error(log)}"))
    return rows
