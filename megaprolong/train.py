"""``megaprolong-train --config RECIPE.yaml [key=value ...]``: train under torchrun or srun."""

from __future__ import annotations

import argparse
import os
import sys

from megaprolong.config import ConfigError, describe_keys, load_config, resolve_relative_paths
from megaprolong.training.config import Config, validate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="megaprolong-train",
        description="Train a megatron-core Llama with the ProLong recipe. Launch with torchrun or srun; "
                    "the parallel layout (parallel.tp/pp/cp) must divide the world size.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (set in the YAML file or as key=value overrides):\n" + "\n".join(describe_keys(Config)),
    )
    parser.add_argument("--config", help="recipe YAML file (see examples/); omitted: all defaults")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override a config key, e.g. parallel.tp=2 train.steps=10 (values parsed as YAML)")
    return parser.parse_args(argv)


PATH_KEYS = ["data.mix", "data.root", "data.prefix", "data.cache_dir", "checkpoint.dir", "checkpoint.load",
             "logging.metrics_file"]


def file_problems(cfg: Config) -> list[str]:
    """Every path of the recipe checked (datasets' .idx/.bin pairs, checkpoints to load, folders to write):
    one line per problem. Runs before any process group, so a bad path fails at once on every rank."""
    from megaprolong.data.check import check_checkpoint_path, check_indexed, check_writable_dir
    from megaprolong.data.dataset import load_mix

    problems, prefixes = [], []
    if cfg.data.mix:
        if not os.path.isfile(cfg.data.mix):
            problems.append(f"data.mix={cfg.data.mix}: not found")
        else:
            prefixes = [d.prefix for d in load_mix(cfg.data.mix, cfg.data.root).domains]
    elif cfg.data.prefix:
        prefixes = [cfg.data.prefix]
    if cfg.data.prepare != "tiny":  # the tiny recipes build their data on first use
        for prefix in prefixes:
            problems += check_indexed(prefix)
    if cfg.data.cache_dir:
        problems += check_writable_dir("data.cache_dir", cfg.data.cache_dir)
    if cfg.checkpoint.load:
        problems += check_checkpoint_path("checkpoint.load", cfg.checkpoint.load)
    if cfg.checkpoint.resume not in ("auto", "none"):
        found = check_checkpoint_path("checkpoint.resume", cfg.checkpoint.resume)
        if not found:  # a named checkpoint must verify: sizes on every rank, checksums on rank 0 (2 MiB a file)
            from megaprolong.training.checkpoint import verify

            rank0 = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"
            found = [f"checkpoint.resume={cfg.checkpoint.resume}: {p}" for p in verify(cfg.checkpoint.resume, rank0)]
        problems += found
    if cfg.checkpoint.dir:
        problems += check_writable_dir("checkpoint.dir", cfg.checkpoint.dir)
    return problems


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
    args = parse_args(argv)
    try:
        cfg = load_config(Config, args.config, args.overrides)
        resolve_relative_paths(cfg, args.config, PATH_KEYS)
    except ConfigError as e:
        print(f"megaprolong-train: {e}", file=sys.stderr)
        return 2
    try:  # before any process group starts: a bad layout fails in a second, with the keys named
        validate(cfg, int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1))))
    except ConfigError as e:
        print(f"megaprolong-train: {e}", file=sys.stderr)
        return 2
    if not cfg.data.prefix and not cfg.data.mix:
        print("megaprolong-train: set data.mix (a mix YAML) or data.prefix (an indexed dataset PREFIX)",
              file=sys.stderr)
        return 2
    try:
        problems = file_problems(cfg)
    except ConfigError as e:  # e.g. a malformed mix YAML
        problems = [str(e)]
    if problems:
        for problem in problems:
            print(f"megaprolong-train: {problem}", file=sys.stderr)
        return 2
    # Imported late: --help and config errors should not pay megatron-core's import time.
    from megaprolong.runtime.attempts import RepeatedFailure
    from megaprolong.training.trainer import run

    try:
        run(cfg, lambda: build_dataset(cfg))
    except ConfigError as e:
        print(f"megaprolong-train: {e}", file=sys.stderr)
        return 2
    except RepeatedFailure as e:
        print(f"megaprolong-train: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
