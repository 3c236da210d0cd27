"""``make demo``: the whole pipeline at tiny scale on a CPU.

1. build a small multi-domain corpus and a byte-level BPE tokenizer (HF ``tokenizers``);
2. preprocess the corpus into a Megatron indexed dataset (``megaprolong-preprocess``);
3. train a tiny Llama with tensor parallelism (TP=2 + sequence parallel) on 2 gloo ranks under torchrun
   (``megaprolong-train --config examples/tiny_stage1.yaml``), printing each step's loss.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megaprolong.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/demo", help="where corpus, tokenizer, data and metrics go")
    ap.add_argument("--steps", type=int, default=30, help="training steps")
    args = ap.parse_args(argv)

    from megaprolong.data.preprocess import PreprocessConfig, preprocess
    from megaprolong.data.tiny import synthetic_corpus, train_tokenizer, write_jsonl

    work = Path(args.workdir)
    t0 = time.time()
    _step("1/3 corpus and tokenizer")
    docs = synthetic_corpus(n_docs=600, seed=0)
    corpus = write_jsonl(docs, work / "corpus.jsonl")
    tok = train_tokenizer([d["text"] for d in docs], work / "tokenizer", vocab_size=512)
    print(f"{len(docs)} documents -> {corpus}; tokenizer -> {tok}")

    _step("2/3 preprocess to a Megatron indexed dataset")
    report = preprocess(PreprocessConfig(inputs=[str(corpus)], tokenizer=str(tok.parent),
                                         output_prefix=str(work / "data" / "corpus"), add_eos=True, quiet=True))
    print(f"{report['documents']} documents, {report['tokens']:,} tokens -> {work / 'data' / 'corpus'}.bin/.idx")

    _step("3/3 train a tiny Llama, TP=2 + sequence parallel, 2 gloo ranks")
    metrics = work / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "megaprolong.train", "--config", str(REPO / "examples" / "tiny_stage1.yaml"),
           f"data.prefix={work / 'data' / 'corpus'}", f"train.steps={args.steps}",
           f"logging.metrics_file={metrics}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        print(f"demo: training failed (exit {proc.returncode})", file=sys.stderr)
        return proc.returncode
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    print(f"\n=== summary ({time.time() - t0:.0f} s)")
    print(f"loss: first step {losses[0]:.3f} -> last step {losses[-1]:.3f} over {len(losses)} steps")
    print(f"metrics: {metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
