"""``make demo``: the whole pipeline at tiny scale on a CPU.

1. build a small multi-domain corpus and a byte-level BPE tokenizer (HF ``tokenizers``);
2. preprocess each domain (books, code grouped by repository, web) into a Megatron indexed dataset;
3. stage 1: train a tiny Llama with tensor parallelism (TP=2 + sequence parallel) on 2 gloo ranks on
   ProLong's mix shape (long documents as single-document chunks, short documents packed);
4. stage 2: 4x longer sequences split over 2 context-parallel ranks with document-masked attention,
   RoPE base raised to 1.28e8, starting from the stage-1 checkpoint with a fresh LR schedule;
5. convert the stage-2 checkpoint to an HF model (``megaprolong-convert mcore-to-hf``);
6. SFT: fine-tune that HF model on synthetic chat data (Llama-3 chat template, assistant-only loss,
   packed conversations) with TRL on 2 gloo processes (``examples/tiny_sft.yaml``);
7. evaluate the fine-tuned model: needle-in-a-haystack and JSON KV prompts, perplexity by position.
Each step's loss is printed; a summary table and a loss-curve PNG (WORKDIR/loss_curves.png) close the run.
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


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        raise SystemExit(f"demo: {what} failed (exit {proc.returncode})")


def _torchrun(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", module, *args]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def smoothed(values: list[float | None], weight: float = 0.8) -> list[float | None]:
    """An exponential moving average (TensorBoard's smoothing), bias-corrected at the start; gaps stay gaps."""
    out, avg, n = [], 0.0, 0
    for v in values:
        if v is None:
            out.append(None)
            continue
        avg, n = weight * avg + (1 - weight) * v, n + 1
        out.append(avg / (1 - weight ** n))
    return out


def plot_losses(curves: dict[str, list[dict]], out: Path) -> Path:
    """One panel per stage: loss against tokens seen, raw (faint) and smoothed, and each domain's smoothed
    loss (with a few sequences per step, which domains a step drew moves the raw loss: that is not
    instability)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.4))
    for ax, (name, rows) in zip(axes, curves.items()):
        tokens = [r.get("tokens_seen", r.get("num_tokens", r["step"])) for r in rows]
        line, = ax.plot(tokens, [r["loss"] for r in rows], alpha=0.25)
        ax.plot(tokens, smoothed([r["loss"] for r in rows]), color=line.get_color(), label="all")
        for domain in (rows[0].get("domain_loss") or {}) if rows else {}:
            ax.plot(tokens, smoothed([r["domain_loss"].get(domain) for r in rows]), linewidth=1, label=domain)
        ax.set(title=name, xlabel="tokens", ylabel="loss (smoothed)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megaprolong.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/demo", help="where corpus, tokenizer, data and metrics go")
    ap.add_argument("--steps", type=int, default=30, help="training steps")
    args = ap.parse_args(argv)

    from megaprolong.data.preprocess import PreprocessConfig, preprocess
    from megaprolong.data.tiny import synthetic_chats, synthetic_corpus, train_tokenizer, write_jsonl

    work = Path(args.workdir)
    t0 = time.time()
    _step("1/7 corpus and tokenizer")
    docs = synthetic_corpus(n_docs=600, seed=0)
    corpus = write_jsonl(docs, work / "corpus.jsonl")
    tok = train_tokenizer([d["text"] for d in docs], work / "tokenizer", vocab_size=512)
    print(f"{len(docs)} documents -> {corpus}; tokenizer -> {tok}")

    _step("2/7 preprocess each domain to a Megatron indexed dataset")
    for domain, extra in (("books", {}), ("code", {"group_by": "repo"}), ("web", {})):
        src = write_jsonl([d for d in docs if d["domain"] == domain], work / f"{domain}.jsonl")
        report = preprocess(PreprocessConfig(inputs=[str(src)], tokenizer=str(tok.parent), quiet=True,
                                             output_prefix=str(work / "data" / domain), add_eos=True, **extra))
        print(f"{domain:>5}: {report['documents']:>4} documents, {report['tokens']:>7,} tokens -> "
              f"{work / 'data' / domain}.bin/.idx" + (" (files grouped by repository)" if extra else ""))

    write_jsonl(synthetic_chats(200, seed=0), work / "chats.jsonl")
    summary, curves = [], {}
    for n, (stage, title) in enumerate((("tiny_stage1", "stage 1: TP=2 + sequence parallel, 128-token sequences"),
                                        ("tiny_stage2", "stage 2: CP=2, 512-token sequences, RoPE base 1.28e8")),
                                       start=3):
        _step(f"{n}/7 {title}")
        out = work / stage
        metrics = out / "metrics.jsonl"
        metrics.unlink(missing_ok=True)
        overrides = [f"data.root={work / 'data'}", f"run.dir={out}", "checkpoint.resume=none"]
        if stage == "tiny_stage1":
            overrides.append(f"train.steps={args.steps}")
        else:
            overrides.append(f"checkpoint.load={work / 'tiny_stage1' / 'ckpt'}")
        _run(_torchrun("megaprolong.train", "--config", str(REPO / "examples" / f"{stage}.yaml"), *overrides), stage)
        curves[stage] = _read_jsonl(metrics)
        summary.append((stage, curves[stage], out / "ckpt"))
    _step("5/7 convert the stage-2 checkpoint to HF (transformers) format")
    from megaprolong.convert.jobs import mcore_to_hf

    hf_dir = mcore_to_hf(str(work / "tiny_stage2" / "ckpt"), str(work / "hf"), tokenizer=str(tok.parent), force=True)
    print(f"HF model -> {hf_dir} (AutoModelForCausalLM.from_pretrained loads it)")

    _step("6/7 SFT: Llama-3 chat format, loss on assistant replies, packed conversations (TRL, 2 processes)")
    sft = work / "sft"
    _run(_torchrun("megaprolong.sft", "--config", str(REPO / "examples" / "tiny_sft.yaml"), f"model={hf_dir}",
                   f"output_dir={sft}", f"data.path={work / 'chats.jsonl'}"), "SFT")
    curves["tiny_sft"] = _read_jsonl(sft / "metrics.jsonl")
    summary.append(("tiny_sft", curves["tiny_sft"], sft / "model"))

    _step("7/7 evaluate the fine-tuned model: RULER needles, JSON KV, perplexity by position")
    _run([sys.executable, "-m", "megaprolong.eval", "--model", str(sft / "model"), "--tasks",
          "niah_single,niah_multikey,json_kv,ppl", "--lengths", "448,512", "--samples", "4", "--out",
          str(work / "eval"), "--ppl-data", str(work / "data" / "books"), "--ppl-documents", "4", "--force"], "eval")
    png = plot_losses(curves, work / "loss_curves.png")
    print(f"\n=== summary ({time.time() - t0:.0f} s)")
    print(f"{'stage':<12} {'steps':>5} {'first loss':>10} {'last loss':>10} {'tokens/s':>9}  output")
    for stage, rows, where in summary:
        tps = sum(r["tokens_per_s"] for r in rows) / len(rows)
        print(f"{stage:<12} {len(rows):>5} {rows[0]['loss']:>10.3f} {rows[-1]['loss']:>10.3f} {tps:>9,.0f}  {where}")
    print(f"evaluation: {work / 'eval'}/results.json, table.txt, scores.png, ppl.png; loss curves: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
