"""``make demo``: the whole pipeline at tiny scale on a CPU.

1. build a small multi-domain corpus and a byte-level BPE tokenizer (HF ``tokenizers``);
2. preprocess each domain (books, code grouped by repository, web) into a Megatron indexed dataset;
3. train a tiny Llama with tensor parallelism (TP=2 + sequence parallel) on 2 gloo ranks under torchrun
   (``megaprolong-train --config examples/tiny_stage1.yaml``) on ProLong's mix shape (long documents as
   single-document chunks, short documents packed), printing each step's loss.
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

    _step("2/3 preprocess each domain to a Megatron indexed dataset")
    for domain, extra in (("books", {}), ("code", {"group_by": "repo"}), ("web", {})):
        src = write_jsonl([d for d in docs if d["domain"] == domain], work / f"{domain}.jsonl")
        report = preprocess(PreprocessConfig(inputs=[str(src)], tokenizer=str(tok.parent), quiet=True,
                                             output_prefix=str(work / "data" / domain), add_eos=True, **extra))
        print(f"{domain:>5}: {report['documents']:>4} documents, {report['tokens']:>7,} tokens -> "
              f"{work / 'data' / domain}.bin/.idx" + (" (files grouped by repository)" if extra else ""))

    _step("3/3 train a tiny Llama, TP=2 + sequence parallel, 2 gloo ranks")
    metrics = work / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "megaprolong.train", "--config", str(REPO / "examples" / "tiny_stage1.yaml"),
           f"data.mix={REPO / 'examples' / 'mixes' / 'tiny_stage1.yaml'}", f"data.root={work / 'data'}",
           f"train.steps={args.steps}",
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
