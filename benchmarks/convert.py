"""Conversion time and peak memory on a ~1.5B-parameter random Llama in bf16 (HF -> mcore -> HF).

Both directions stream: peak anonymous memory above the imports is about one tensor set (hf-to-mcore) or
one output shard plus a layer (mcore-to-hf, `--max-shard-gb`), not the model.

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


SHAPES = {  # Llama-3 shapes; the 8B preset keeps all of its tensor sizes with fewer layers (disk: 3 copies)
    "1.5b": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, layers=16),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, layers=8),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "megaprolong-convert-bench"))
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.5b", help="tensor sizes of this Llama-3 model")
    ap.add_argument("--layers", type=int, help="number of layers (default: 16 for 1.5b, 8 for 8b of its 32)")
    a = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shape = dict(SHAPES[a.shape])
    layers = a.layers or shape.pop("layers")
    shape.pop("layers", None)
    cfg = LlamaConfig(vocab_size=128256, num_hidden_layers=layers, num_key_value_heads=8, tie_word_embeddings=False,
                      rope_theta=500000.0, **shape)
    with torch.device("meta"):
        sizes = {n: p.numel() * 2 / 2**30 for n, p in LlamaForCausalLM(cfg).named_parameters()}  # bf16 GiB
    params = sum(sizes.values()) / 2 * 2**30
    largest = max(sizes.values())
    layer = sum(v for n, v in sizes.items() if ".layers.0." in n)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(work / "hf", max_shard_size="1GB")
    repo = Path(__file__).resolve().parent.parent
    rows = []
    jobs = {"hf-to-mcore": ["hf-to-mcore", "--hf", str(work / "hf"), "--out", str(work / "mcore")],
            "mcore-to-hf": ["mcore-to-hf", "--ckpt", str(work / "mcore"), "--out", str(work / "back")],
            "mcore-to-hf 256M shards": ["mcore-to-hf", "--ckpt", str(work / "mcore"), "--out", str(work / "back"),
                                        "--max-shard-gb", "0.25"]}
    _, base = run_measured([sys.executable, "-c", "import megaprolong.convert.jobs, megatron.core, safetensors"],
                           repo, anonymous=True)
    for name, args in jobs.items():
        # twice: peak RSS (with the page cache of memory-mapped shards) and peak anonymous memory
        t, rss = run_measured([sys.executable, "-m", "megaprolong.cli.convert", *args, "--force"], repo)
        _, anon = run_measured([sys.executable, "-m", "megaprolong.cli.convert", *args, "--force"], repo, anonymous=True)
        rows.append((name, t, rss / 2**30, anon / 2**30, (anon - base) / 2**30))
    shutil.rmtree(work, ignore_errors=True)
    print(f"\nLlama-3 {a.shape} shapes, {layers} layers: {params / 1e9:.2f}B parameters, {params * 2 / 2**30:.2f} GiB in bf16; largest tensor "
          f"{largest:.2f} GiB, one layer {layer:.2f} GiB (bf16); the imports alone: {base / 2**30:.2f} GiB anonymous")
    print(f"{'direction':<24} {'wall s':>7} {'peak RSS GiB':>13} {'peak anon GiB':>14} {'above imports':>14}")
    for name, t, rss, anon, above in rows:
        print(f"{name:<24} {t:>7.1f} {rss:>13.2f} {anon:>14.2f} {above:>14.2f}")


if __name__ == "__main__":
    main()
