"""``megaprolong-train --config RECIPE.yaml [key=value ...]``: train under torchrun or srun."""

from __future__ import annotations

import argparse
import os
import sys

from megaprolong.config import ConfigError, describe_keys, load_config, resolve_relative_paths
from megaprolong.training.config import Config, apply_run_dir, validate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="megaprolong-train",
        description="Train a megatron-core Llama with the ProLong recipe. Launch with torchrun or srun; "
                    "the parallel layout (parallel.tp/pp/cp) must divide the world size.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (set in the YAML file or as key=value overrides):\n" + "\n".join(describe_keys(Config)),
    )
    parser.add_argument("--config", help="recipe YAML file (see examples/); omitted: all defaults")
    parser.add_argument("--check", action="store_true",
                        help="only run the start-up checks (config, layout, data, checkpoints, the folder's lock) "
                             "and exit: 0 when training could start, 2 with one line per problem otherwise "
                             "(the sbatch scripts run this once before launching torchrun)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override a config key, e.g. parallel.tp=2 train.steps=10 (values parsed as YAML)")
    return parser.parse_args(argv)


PATH_KEYS = ["data.mix", "data.root", "data.prefix", "data.cache_dir", "checkpoint.dir", "checkpoint.load",
             "logging.metrics_file", "logging.tensorboard_dir", "eval.data", "eval.root", "run.dir"]


def _mix_or_prefix(path: str | None, root: str | None, seq_length: int):
    """A mix YAML, or one indexed dataset PREFIX as a one-domain mix."""
    from megaprolong.data.dataset import DomainSpec, MixSpec, load_mix

    if path is None:
        return None
    if path.endswith((".yaml", ".yml")):
        return load_mix(path, root)
    return MixSpec(seq_length=seq_length, domains=[DomainSpec(name=os.path.basename(path), prefix=path, weight=1.0)])


def file_problems(cfg: Config) -> list[str]:
    """Every path of the recipe checked (datasets' .idx/.bin pairs, checkpoints to load, folders to write):
    one line per problem. Runs before any process group, so a bad path fails at once on every rank."""
    from megaprolong.data.check import check_checkpoint_path, check_indexed, check_mix_data, check_writable_dir
    from megaprolong.training.checkpoint_dir import resume_problems

    problems, spec = [], None
    if cfg.data.mix and not os.path.isfile(cfg.data.mix):
        problems.append(f"data.mix={cfg.data.mix}: not found")
    else:
        spec = _mix_or_prefix(cfg.data.mix or cfg.data.prefix, cfg.data.root, cfg.train.seq_length)
    if cfg.eval.interval and cfg.eval.data:
        if cfg.eval.data.endswith((".yaml", ".yml")) and not os.path.isfile(cfg.eval.data):
            problems.append(f"eval.data={cfg.eval.data}: not found")
        else:
            held = _mix_or_prefix(cfg.eval.data, cfg.eval.root, cfg.train.seq_length)
            unreadable = [line for d in held.domains for line in check_indexed(d.prefix)]
            problems += [f"eval.data: {line}" for line in unreadable or
                         check_mix_data(held, cfg.train.seq_length, cfg.model.vocab_size)]
    if spec is not None and cfg.data.prepare == "tiny":  # the tiny recipes build their data on first use
        problems += check_mix_data(spec, cfg.train.seq_length, cfg.model.vocab_size, datasets=False)
    elif spec is not None:
        unreadable = [line for d in spec.domains for line in check_indexed(d.prefix)]
        problems += unreadable or check_mix_data(spec, cfg.train.seq_length, cfg.model.vocab_size)
    if cfg.data.cache_dir:
        problems += check_writable_dir("data.cache_dir", cfg.data.cache_dir)
    if cfg.checkpoint.load:
        problems += check_checkpoint_path("checkpoint.load", cfg.checkpoint.load)
    if cfg.checkpoint.resume not in ("auto", "none"):
        found = check_checkpoint_path("checkpoint.resume", cfg.checkpoint.resume)
        if not found:  # a named checkpoint must verify: sizes on every rank, checksums on rank 0 (2 MiB a file)
            from megaprolong.training.checkpoint_dir import verify

            rank0 = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"
            found = [f"checkpoint.resume={cfg.checkpoint.resume}: {p}" for p in verify(cfg.checkpoint.resume, rank0)]
        problems += found
    if cfg.checkpoint.dir:
        problems += check_writable_dir("checkpoint.dir", cfg.checkpoint.dir)
        if cfg.checkpoint.resume == "auto":
            problems += resume_problems(cfg.checkpoint.dir)
    return problems


def folder_problem(cfg: Config) -> str | None:
    """Another live run writes ``checkpoint.dir`` (its lock): not this run's error to record there."""
    from megaprolong.runtime import run_lock

    return run_lock.check(cfg.checkpoint.dir)


def build_heldout(cfg: Config):
    """The held-out sequences (``eval.data``): the first ``eval.sequences`` packed sequences of each domain,
    at the stage's length, the same at every evaluation; and the domains' names."""
    from megaprolong.data.dataset import heldout_samples

    spec = _mix_or_prefix(cfg.eval.data, cfg.eval.root, cfg.train.seq_length)
    cache = cfg.data.cache_dir or os.path.join(os.path.dirname(spec.domains[0].prefix), ".megaprolong_cache")
    return heldout_samples(spec, cfg.eval.sequences, cache), [d.name for d in spec.domains]


def build_dataset(cfg: Config):
    """The run's data: a mix of domains, or one dataset of short documents."""
    from megaprolong.data.dataset import MixDataset, load_mix, single_domain

    total = cfg.train.steps * cfg.train.global_batch_size
    if cfg.data.prepare == "tiny":
        from megaprolong.data.tiny import prepare_tiny_data

        prepare_tiny_data(cfg.data.root)
    elif cfg.data.prepare is not None:
        raise ConfigError(f"data.prepare={cfg.data.prepare!r}: only 'tiny' is known")
    if cfg.data.mix:
        spec = load_mix(cfg.data.mix, cfg.data.root)
        if spec.seq_length != cfg.train.seq_length:
            raise ConfigError(f"data.mix has seq_length {spec.seq_length}, train.seq_length is {cfg.train.seq_length}")
        cache = cfg.data.cache_dir or os.path.join(os.path.dirname(spec.domains[0].prefix), ".megaprolong_cache")
        return MixDataset(spec, total, cfg.train.seed, cache)
    cache = cfg.data.cache_dir or os.path.join(os.path.dirname(os.path.abspath(cfg.data.prefix)), ".megaprolong_cache")
    return single_domain(cfg.data.prefix, cfg.train.seq_length, total, cfg.train.seed, cache)


def main(argv: list[str] | None = None) -> int:
    from megaprolong.runtime.preemption import StopRequest

    stop = StopRequest()  # first: a preemption signal during start-up is kept, not lost (or fatal)
    args = parse_args(argv)
    try:
        cfg = load_config(Config, args.config, args.overrides)
        resolve_relative_paths(cfg, args.config, PATH_KEYS)
        apply_run_dir(cfg)
    except ConfigError as e:
        return _fatal(None, str(e))
    from megaprolong.runtime.attempts import FATAL_EXIT, REPEATED_EXIT, FatalError, RepeatedFailure, fatal_error

    ck = cfg.checkpoint.dir
    if (error := fatal_error(ck) if ck else None) is not None:  # a restart in a launch that already failed so
        print(f"megaprolong-train: {error}", file=sys.stderr)
        print("megaprolong-train: (found in this launch's progress record: not retrying)", file=sys.stderr)
        return FATAL_EXIT
    if (busy := folder_problem(cfg)) is not None:
        print(f"megaprolong-train: {busy}", file=sys.stderr)
        return FATAL_EXIT
    try:  # before any process group starts: a bad layout fails in a second, with the keys named
        validate(cfg, int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1))))
        if not cfg.data.prefix and not cfg.data.mix:
            raise ConfigError("set data.mix (a mix YAML) or data.prefix (an indexed dataset PREFIX)")
        problems = file_problems(cfg)
    except ConfigError as e:  # e.g. a malformed mix YAML
        problems = [str(e)]
    if problems:
        return _fatal(ck, "\n".join(problems))
    if args.check:
        if _rank() == 0 and ck:  # the batch shell's check takes the folder for its job
            from megaprolong.runtime.run_lock import RunLock

            RunLock(ck, say=lambda line: print(f"megaprolong-train: {line}"))
        print("megaprolong-train: start-up checks passed")
        return 0
    # Imported late: --help and config errors should not pay megatron-core's import time.
    from megaprolong.runtime.log import get_logger
    from megaprolong.training.trainer import NonFiniteLoss, run

    try:
        run(cfg, lambda: build_dataset(cfg), stop=stop, make_heldout=lambda: build_heldout(cfg),
            log=get_logger("train").info)
    except (ConfigError, FatalError) as e:
        return _fatal(ck, str(e))
    except RepeatedFailure as e:
        print(f"megaprolong-train: {e}", file=sys.stderr)
        return REPEATED_EXIT
    except NonFiniteLoss as e:  # recorded as this step's failure: a restart retries it once, then the run stops
        print(f"megaprolong-train: {e}", file=sys.stderr)
        return 1
    return 0


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def _fatal(folder: str | None, error: str) -> int:
    """Bad input: one line per problem, recorded (rank 0) so that this launch is not retried; exit 2."""
    from megaprolong.runtime.attempts import FATAL_EXIT, record_fatal

    for line in error.splitlines():
        print(f"megaprolong-train: {line}", file=sys.stderr)
    if _rank() == 0:
        record_fatal(folder, error)
    return FATAL_EXIT


if __name__ == "__main__":
    sys.exit(main())
