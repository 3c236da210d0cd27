"""``megaprolong-sft --config RECIPE.yaml [key=value ...]``: the SFT stage under torchrun or srun."""

from __future__ import annotations

import argparse
import os
import sys

from megaprolong.config import ConfigError, describe_keys, load_config, resolve_relative_paths
from megaprolong.sft.config import PATH_KEYS, SFTConfig, gradient_accumulation


def main(argv: list[str] | None = None) -> int:
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
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override a config key, e.g. train.steps=10 model=runs/hf (values parsed as YAML)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(SFTConfig, args.config, args.overrides)
        resolve_relative_paths(cfg, args.config, PATH_KEYS)
        cfg.data.strict = cfg.data.strict or args.strict
        gradient_accumulation(cfg, int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1))))
        for key in ("model", "tokenizer"):
            path = getattr(cfg, key)
            if path and not os.path.isdir(path):
                raise ConfigError(f"{key}={path}: not an HF model folder (make one with megaprolong-convert mcore-to-hf)")
        source = cfg.data.mds or cfg.data.path
        if not os.path.exists(source) and cfg.data.prepare != "tiny":
            raise ConfigError(f"data: {source} does not exist")
    except ConfigError as e:
        print(f"megaprolong-sft: {e}", file=sys.stderr)
        return 2
    from megaprolong.data.readers import DataError
    from megaprolong.runtime.attempts import RepeatedFailure
    from megaprolong.sft.run import run_sft

    try:
        out = run_sft(cfg)
    except (DataError, ConfigError) as e:
        print(f"megaprolong-sft: {e}", file=sys.stderr)
        return 2
    except RepeatedFailure as e:
        print(f"megaprolong-sft: {e}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"megaprolong-sft: fine-tuned model -> {out}" if out else
              "megaprolong-sft: stop requested (SIGTERM/SIGUSR1): checkpointed, exiting; a rerun resumes")
    return 0
