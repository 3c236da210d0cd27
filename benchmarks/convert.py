"""Conversion time and peak memory on a ~1B-parameter random Llama (HF -> mcore -> HF).

    .venv/bin/python benchmarks/convert.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from _measure import run_measured


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "megaprolong-convert-bench"))
    a = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, rope_theta=500000.0)
    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(work / "hf", max_shard_size="1GB")
    largest = max(p.numel() for p in LlamaForCausalLM(cfg).parameters()) * 4 / 2**30
    repo = Path(__file__).resolve().parent.parent
    rows = []
    jobs = {"hf-to-mcore": ["hf-to-mcore", "--hf", str(work / "hf"), "--out", str(work / "mcore")],
            "mcore-to-hf": ["mcore-to-hf", "--ckpt", str(work / "mcore"), "--out", str(work / "back")]}
    for name, args in jobs.items():
        # twice: peak RSS (with the page cache of memory-mapped shards) and peak anonymous memory
        t, rss = run_measured([sys.executable, "-m", "tools.convert", *args, "--force"], repo)
        _, anon = run_measured([sys.executable, "-m", "tools.convert", *args, "--force"], repo, anonymous=True)
        rows.append((name, t, rss / 2**30, anon / 2**30))
    _, base = run_measured([sys.executable, "-c", "import megaprolong.convert.jobs, megatron.core, transformers"],
                           repo, anonymous=True)
    print(f"\nmodel: {params / 1e9:.2f}B parameters ({params * 4 / 2**30:.1f} GiB in fp32, "
          f"largest tensor {largest:.2f} GiB in fp32)")
    print(f"model in bf16: {params * 2 / 2**30:.2f} GiB; the imports alone: {base / 2**30:.2f} GiB anonymous")
    print(f"{'direction':<14} {'wall s':>8} {'peak RSS GiB':>13} {'peak anon GiB':>14}")
    for name, t, rss, anon in rows:
        print(f"{name:<14} {t:>8.1f} {rss:>13.2f} {anon:>14.2f}")


if __name__ == "__main__":
    main()
