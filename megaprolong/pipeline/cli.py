"""``megaprolong-pipeline {plan,submit,status,run} PIPELINE.yaml [--root DIR]``: a whole ProLong run, base
model to evaluated long-context model, as one YAML and one folder (see megaprolong/pipeline/config.py)."""

from __future__ import annotations

import argparse
import sys
import time

from megaprolong.config import ConfigError
from megaprolong.pipeline.config import load_pipeline
from megaprolong.pipeline.steps import Pipeline
from megaprolong.runtime.log import get_logger


def _pipeline(args) -> Pipeline:
    return Pipeline(load_pipeline(args.pipeline, args.root), args.pipeline)


def plan(pipe: Pipeline) -> int:
    """Every step, its inputs and outputs, each stage's fit; exit 2 when steps do not connect or a stage
    does not fit its nodes."""
    print(f"pipeline {pipe.path} -> {pipe.root}")
    for step in pipe.steps():
        state = "complete" if pipe.incomplete(step) is None else "to run"
        print(f"{step.name:<12} [{step.kind}, {step.nodes} node(s), {state}] after: {', '.join(step.needs) or '-'}")
        print(f"{'':<12} reads: {', '.join(step.reads)}")
        print(f"{'':<12} makes: {', '.join(step.makes)}")
    lines, problems = pipe.fit_lines()
    for line in lines:
        print(line)
    problems = pipe.boundary_problems() + problems
    for problem in problems:
        print(f"megaprolong-pipeline plan: {problem}", file=sys.stderr)
    return 2 if problems else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megaprolong-pipeline", description=__doc__)
    p.add_argument("command", choices=["plan", "submit", "status", "run", "step"],
                   help="plan: every step, its inputs and outputs, each stage's fit (refused when they do not connect "
                        "or fit); submit: the incomplete steps as chained Slurm jobs; status: each step's state (exit 1 when one "
                        "failed); "
                        "run --local: the steps in order on this machine")
    p.add_argument("name", nargs="?", help=argparse.SUPPRESS)  # step NAME: one python step (the jobs run it)
    p.add_argument("pipeline", help="the pipeline YAML (examples/pipeline_prolong_8b.yaml, pipeline_tiny.yaml)")
    p.add_argument("--root", help="the pipeline's folder (overrides the YAML's root)")
    p.add_argument("--local", action="store_true", help="run: on this machine, without Slurm")
    p.add_argument("--watch", type=float, nargs="?", const=30.0, metavar="SECONDS",
                   help="status: refresh every SECONDS (30) until every step is done or one failed")
    args = p.parse_args(argv)
    log = get_logger("pipeline")
    try:
        pipe = _pipeline(args)
        if args.command == "plan":
            return plan(pipe)
        if args.command == "step":
            pipe.run_python(args.name, log.info)
            missing = pipe.incomplete(next(s for s in pipe.steps() if s.name == args.name))
            if missing:
                raise ConfigError(f"step {args.name} ended without a complete output: {missing}")
            return 0
        if args.command == "run":
            if not args.local:
                raise ConfigError("run needs --local (on a cluster: submit)")
            problems = pipe.boundary_problems()
            if problems:
                raise ConfigError(problems[0])
            from megaprolong.pipeline.local import run_local

            run_local(pipe, log.info)
            return 0
        from megaprolong.pipeline import slurm

        if args.command == "submit":
            problems = pipe.boundary_problems() + pipe.fit_lines()[1]
            if problems:
                raise ConfigError("; ".join(problems))
            jobs = slurm.submit(pipe, log.info)
            print(" ".join(jobs.values()))
            return 0
        while True:
            rows = slurm.status(pipe)
            print(f"{time.strftime('%H:%M:%S')} pipeline {pipe.root}")
            for name, state, detail in rows:
                print(f"  {name:<12} {state:<12} {detail}")
            if not args.watch or all(s == "done" for _, s, _ in rows) or any(s == "failed" for _, s, _ in rows):
                return 1 if any(s == "failed" for _, s, _ in rows) else 0
            time.sleep(args.watch)
    except ConfigError as e:
        print(f"megaprolong-pipeline {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
