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
    t, m = run_measured([sys.executable, "-m", "tools.convert", "hf-to-mcore", "--hf", str(work / "hf"),
                         "--out", str(work / "mcore")], repo)
    rows.append(("hf-to-mcore", t, m / 2**30))
    t, m = run_measured([sys.executable, "-m", "tools.convert", "mcore-to-hf", "--ckpt", str(work / "mcore"),
                         "--out", str(work / "back")], repo)
    rows.append(("mcore-to-hf", t, m / 2**30))
    print(f"\nmodel: {params / 1e9:.2f}B parameters ({params * 4 / 2**30:.1f} GiB in fp32, "
          f"largest tensor {largest:.2f} GiB in fp32)")
    print(f"{'direction':<14} {'wall s':>8} {'peak RSS GiB':>13}")
    for name, t, m in rows:
        print(f"{name:<14} {t:>8.1f} {m:>13.2f}")


if __name__ == "__main__":
    main()
