"""``make demo``: the whole pipeline at tiny scale on a CPU, as ``megaprolong-pipeline run --local
examples/pipeline_tiny.yaml`` runs it (the same steps a cluster gets from ``megaprolong-pipeline submit``):

1. generate a small multi-domain corpus, a byte-level BPE tokenizer (HF ``tokenizers``) and chat data;
2. preprocess each domain (books, code grouped by repository, web) into a Megatron indexed dataset;
3. stage 1: train a tiny Llama with tensor parallelism (TP=2 + sequence parallel) on 2 gloo ranks on
   ProLong's mix shape (long documents as single-document chunks, short documents packed);
4. stage 2: 4x longer sequences split over 2 context-parallel ranks with document-masked attention,
   RoPE base raised to 1.28e8, starting from stage 1's final checkpoint with a fresh LR schedule;
5. export stage 2's final checkpoint as an HF model, with the data's tokenizer;
6. SFT: fine-tune that HF model on the chats (Llama-3 chat template, assistant-only loss, packed
   conversations) with TRL on 2 gloo processes;
7. evaluate the fine-tuned model (needle-in-a-haystack and JSON KV prompts, perplexity by position) and
   write the report.
Each step's loss is printed; a summary table and a loss-curve PNG (WORKDIR/loss_curves.png) close the run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


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
    ap.add_argument("--workdir", default="runs/demo", help="the pipeline's root: corpus, data, checkpoints, results")
    ap.add_argument("--steps", type=int, default=None, help="stage 1's training steps (default: the recipe's)")
    args = ap.parse_args(argv)

    from megaprolong.pipeline.config import load_pipeline
    from megaprolong.pipeline.local import run_local
    from megaprolong.pipeline.steps import Pipeline

    work = Path(args.workdir).resolve()
    if work.exists():  # a demo runs every step: start from nothing
        print(f"demo: removing {work} (the previous demo)")
        shutil.rmtree(work)
    cfg = load_pipeline(REPO / "examples" / "pipeline_tiny.yaml", str(work))
    if args.steps:
        cfg.stages[0].overrides.append(f"train.steps={args.steps}")
    pipe = Pipeline(cfg, REPO / "examples" / "pipeline_tiny.yaml")
    t0 = time.time()
    run_local(pipe, say=lambda line: print(f"\n=== {line}" if line.startswith("== ") else line, flush=True))
    curves = {stage.name: _read_jsonl(pipe.stage_dir(stage.name) / "metrics.jsonl") for stage in cfg.stages}
    curves["sft"] = _read_jsonl(pipe.sft_dir / "metrics.jsonl")
    png = plot_losses(curves, work / "loss_curves.png")
    where = {**{s.name: pipe.stage_dir(s.name) for s in cfg.stages}, "sft": pipe.sft_dir / "model"}
    print(f"\n=== summary ({time.time() - t0:.0f} s)")
    print(f"{'stage':<12} {'steps':>5} {'first loss':>10} {'last loss':>10} {'tokens/s':>9}  output")
    for stage, rows in curves.items():
        tps = sum(r["tokens_per_s"] for r in rows) / len(rows)
        print(f"{stage:<12} {len(rows):>5} {rows[0]['loss']:>10.3f} {rows[-1]['loss']:>10.3f} {tps:>9,.0f}  {where[stage]}")
    print(f"evaluation: {pipe.eval_dir}/long (results.json, table.txt, scores.png, ppl.png), report "
          f"{pipe.eval_dir}/report; loss curves: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
