"""``megaprolong-convert``: HF checkpoints (Llama-3.x, Qwen2.5, Qwen3) <-> megatron-core distributed checkpoints
(logic in megaprolong.convert)."""

from __future__ import annotations

import argparse
import json
import sys

from megaprolong.runtime.log import get_logger


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megaprolong-convert",
                                description="Convert between HF checkpoints (Llama-3.x, Qwen2.5, Qwen3 dense) and megaprolong's megatron-core "
                                            "distributed checkpoints (which load under any TP/PP/CP layout).")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF model directory -> OUT/step_00000000 (train with checkpoint.load=OUT)")
    a.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors, sharded or not, or .bin)")
    a.add_argument("--out", required=True, help="output checkpoint directory (must not exist unless --force)")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel size the checkpoint will be trained with (checked)")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel size it will be trained with (checked)")
    a.add_argument("--rope-base", type=float, help="record this RoPE base instead of the HF config's rope_theta")
    a.add_argument("--vocab-multiple", type=int, help="pad the vocabulary to a multiple of this for tensor "
                   "parallelism (default: 128 when --tp does not divide it, else none); stripped on export")
    a.add_argument("--verify", action="store_true",
                   help="compare HF and megatron logits on random tokens; exit 1 above --tolerance")
    a.add_argument("--tolerance", type=float, default=1e-3, help="max |logit difference| for --verify (fp32)")
    a.add_argument("--force", action="store_true", help="replace OUT if it exists")
    b = sub.add_parser("mcore-to-hf", help="megaprolong checkpoint (any layout) -> HF safetensors directory")
    b.add_argument("--ckpt", required=True, help="a step_N checkpoint, or a run's checkpoint dir (newest is used)")
    b.add_argument("--out", required=True, help="output HF directory (must not exist unless --force)")
    b.add_argument("--tokenizer", help="HF tokenizer directory whose files are copied into OUT")
    b.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the HF weights (default: the dtype the checkpoint was saved in)")
    b.add_argument("--max-shard-gb", type=float, default=1.0,
                   help="size of each safetensors file, GiB: also the most of the output held in memory at once")
    b.add_argument("--force", action="store_true", help="replace OUT if it exists")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megaprolong.convert import jobs
    from megaprolong.convert.hf import ConversionError

    try:
        if args.command == "hf-to-mcore":
            step = jobs.hf_to_mcore(args.hf, args.out, args.tp, args.pp, args.rope_base, args.force,
                                    args.vocab_multiple)
            get_logger("convert").info(f"wrote {step}")
            if args.verify:
                result = jobs.verify(args.hf, str(step), tolerance=args.tolerance)
                print(json.dumps(result))
                if not result["ok"]:
                    print("megaprolong-convert: verification failed", file=sys.stderr)
                    return 1
        else:
            out = jobs.mcore_to_hf(args.ckpt, args.out, args.tokenizer, args.dtype, args.force,
                                   int(args.max_shard_gb * 2**30))
            get_logger("convert").info(f"wrote {out}")
    except (ConversionError, FileNotFoundError) as e:
        print(f"megaprolong-convert: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
