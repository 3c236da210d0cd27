"""``megaprolong-sft --config RECIPE.yaml [key=value ...]``: the SFT stage under torchrun or srun."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megaprolong.config import ConfigError, describe_keys, load_config, resolve_relative_paths
from megaprolong.runtime.log import get_logger
from megaprolong.sft.config import PATH_KEYS, SFTConfig, gradient_accumulation


def main(argv: list[str] | None = None) -> int:
    from megaprolong.runtime.preemption import StopRequest

    stop = StopRequest()  # first: a preemption signal during start-up is kept, not lost (or fatal)
    parser = argparse.ArgumentParser(
        prog="megaprolong-sft",
        description="Supervised fine-tuning of an HF Llama-3 checkpoint on chat data (ProLong's final stage): "
                    "Llama-3 chat template, loss on assistant replies only, conversations packed into "
                    "train.seq_length tokens with per-conversation attention. Runs TRL's SFTTrainer; launch "
                    "with torchrun or srun for several GPUs (FSDP2) or CPU processes (DDP over gloo).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (set in the YAML file or as key=value overrides):\n" + "\n".join(describe_keys(SFTConfig)),
    )
    parser.add_argument("--config", help="recipe YAML file (examples/sft_ultrachat.yaml, examples/tiny_sft.yaml)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad conversation (data.strict)")
    parser.add_argument("--check", action="store_true",
                        help="only run the start-up checks (config, paths, the output folder's lock) and exit: 0 "
                             "when SFT could start, 2 with the problem otherwise (the sbatch script runs this first)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override a config key, e.g. train.steps=10 model=runs/hf (values parsed as YAML)")
    args = parser.parse_args(argv)
    from megaprolong.runtime import run_lock
    from megaprolong.runtime.attempts import FATAL_EXIT, REPEATED_EXIT, RepeatedFailure, fatal_error, record_fatal

    cfg = None
    try:
        cfg = load_config(SFTConfig, args.config, args.overrides)
        resolve_relative_paths(cfg, args.config, PATH_KEYS)
        cfg.data.strict = cfg.data.strict or args.strict
        gradient_accumulation(cfg, int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1))))
        for key in ("model", "tokenizer"):
            path = getattr(cfg, key)
            if path and not os.path.isdir(path):
                raise ConfigError(f"{key}={path}: not an HF model folder (make one with megaprolong-convert mcore-to-hf)")
        if (error := fatal_error(cfg.output_dir)) is not None:
            print(f"megaprolong-sft: {error}\nmegaprolong-sft: (found in this launch's progress record: not retrying)",
                  file=sys.stderr)
            return FATAL_EXIT
        if (busy := run_lock.check(cfg.output_dir)) is not None:
            print(f"megaprolong-sft: {busy}", file=sys.stderr)
            return FATAL_EXIT
        source = cfg.data.mds or cfg.data.path
        if not os.path.exists(source) and cfg.data.prepare != "tiny":
            raise ConfigError(f"data: {source} does not exist")
        from megaprolong.sft.data import chat_files, is_saved_dataset

        if cfg.data.path and os.path.isdir(cfg.data.path) and not is_saved_dataset(Path(cfg.data.path)):
            from megaprolong.data.readers import DataError  # which split of a folder of several: decided now

            try:
                chat_files(cfg.data.path, cfg.data.split)
            except DataError as e:
                raise ConfigError(str(e)) from None
    except ConfigError as e:
        return _fatal(cfg.output_dir if cfg else None, str(e), record_fatal)
    if args.check:
        if int(os.environ.get("RANK", 0)) == 0:
            run_lock.RunLock(cfg.output_dir, say=get_logger("sft").info)
        get_logger("sft").info("start-up checks passed")
        return 0
    from megaprolong.data.readers import DataError
    from megaprolong.sft.run import run_sft

    try:
        out = run_sft(cfg, stop)
    except (DataError, ConfigError) as e:
        return _fatal(cfg.output_dir, str(e), record_fatal)
    except RepeatedFailure as e:
        print(f"megaprolong-sft: {e}", file=sys.stderr)
        return REPEATED_EXIT
    get_logger("sft").info(f"fine-tuned model -> {out}" if out else
                           "stop requested (SIGTERM/SIGUSR1): checkpointed, exiting; a rerun resumes")
    return 0


def _fatal(folder: str | None, error: str, record_fatal) -> int:
    """Bad input: said, recorded (rank 0) so that this launch is not retried; exit 2."""
    print(f"megaprolong-sft: {error}", file=sys.stderr)
    if int(os.environ.get("RANK", 0)) == 0:
        record_fatal(folder, error)
    return 2
