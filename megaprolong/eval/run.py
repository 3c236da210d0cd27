"""An evaluation run: tasks x lengths on one model, results JSON, a table, plots; and run comparison."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from megaprolong.config import ConfigError
from megaprolong.runtime.files import out_folder_problem, whole_folder
from megaprolong.runtime.log import get_logger


@dataclass
class EvalConfig:
    model: str | None = None  # HF model folder
    tasks: list[str] = field(default_factory=lambda: ["json_kv", "niah_single", "niah_multikey", "niah_uuid",
                                                      "niah_multivalue", "variable_tracking"])
    lengths: list[int] = field(default_factory=lambda: [8192, 16384, 32768, 65536, 131072])
    out: str | None = None
    backend: Literal["transformers", "vllm"] = "transformers"
    tp: int = 1  # vLLM tensor parallel size
    samples: int = 10  # examples per task and length (needle depth swept over them)
    seed: int = 42
    chat_template: Literal["auto", "on", "off"] = "auto"  # auto: per task, as HELMET's configs
    ppl_data: str | None = None  # indexed dataset PREFIX of held-out long documents (task "ppl")
    ppl_documents: int = 8
    ppl_chunk: int = 4096  # tokens per forward when scoring long documents
    force: bool = False  # overwrite an existing --out


def validate(cfg: EvalConfig) -> None:
    from megaprolong.eval.tasks import TASKS

    problems = []
    if not cfg.model or not os.path.isdir(cfg.model):
        problems.append(f"--model {cfg.model}: not an HF model folder")
    if problem := out_folder_problem(cfg.out, cfg.force):
        problems.append(problem)
    unknown = [t for t in cfg.tasks if t not in TASKS and t != "ppl"]
    if unknown:
        problems.append(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}, ppl")
    if "ppl" in cfg.tasks and not cfg.ppl_data:
        problems.append("task ppl needs --ppl-data PREFIX (an indexed dataset of held-out long documents)")
    if any(n < 64 for n in cfg.lengths):
        problems.append("--lengths must be >= 64 tokens")
    if cfg.samples < 1:
        problems.append("--samples must be >= 1")
    if problems:
        raise ConfigError("; ".join(problems))


def run_eval(cfg: EvalConfig, progress: bool = True) -> dict:
    """Evaluate ``cfg.model``; writes OUT/results.json, OUT/predictions.jsonl, OUT/table.txt, OUT/*.png."""
    from tqdm import tqdm

    from megaprolong.eval.backends import load_backend
    from megaprolong.eval.metrics import METRICS
    from megaprolong.eval.perplexity import perplexity_by_position
    from megaprolong.eval.tasks import generate

    validate(cfg)
    t0 = time.time()
    backend = load_backend(cfg.backend, cfg.model, cfg.tp, max(cfg.lengths) + 512)
    tok = backend.tokenizer
    if backend.max_length and max(cfg.lengths) > backend.max_length:
        get_logger("eval").warning(f"lengths up to {max(cfg.lengths)} exceed the model's "
                                   f"max_position_embeddings {backend.max_length}")
    chat = {"auto": None, "on": True, "off": False}[cfg.chat_template]
    results: dict = {"model": os.path.abspath(cfg.model), "backend": cfg.backend, "config": asdict(cfg),
                     "scores": {}, "ppl": {}}
    predictions = []
    for task in (t for t in cfg.tasks if t != "ppl"):
        results["scores"][task] = {}
        for length in cfg.lengths:
            examples = generate(task, length, cfg.samples, tok, cfg.seed, chat)
            scores = []
            for ex in tqdm(examples, desc=f"{task} @ {length}", disable=not progress, leave=False):
                output = backend.generate(ex.prompt, ex.max_new_tokens)
                score = METRICS[ex.metric](output, ex.answers)
                scores.append(score)
                predictions.append({"task": task, "length": length, "index": ex.index, "depth": ex.depth,
                                    "tokens": ex.tokens, "answers": ex.answers, "output": output, "score": score})
            results["scores"][task][str(length)] = sum(scores) / len(scores)
    if "ppl" in cfg.tasks:
        for length in cfg.lengths:
            results["ppl"][str(length)] = perplexity_by_position(backend, cfg.ppl_data, length, cfg.ppl_documents,
                                                                 cfg.ppl_chunk, cfg.seed)
    results["seconds"] = time.time() - t0
    _write(Path(cfg.out), results, predictions, cfg.force)
    return results


def table(results: dict) -> str:
    """Task x length scores (and perplexity per length)."""
    lengths = sorted({int(n) for s in results["scores"].values() for n in s} | {int(n) for n in results["ppl"]})
    lines = [f"{'task':<20}" + "".join(f"{n:>10}" for n in lengths)]
    for task, by_len in results["scores"].items():
        lines.append(f"{task:<20}" + "".join(f"{by_len.get(str(n), float('nan')):>10.1f}" for n in lengths))
    if results["scores"]:
        avg = [sum(s[str(n)] for s in results["scores"].values() if str(n) in s) / len(results["scores"]) for n in lengths]
        lines.append(f"{'average':<20}" + "".join(f"{a:>10.1f}" for a in avg))
    if results["ppl"]:
        lines.append(f"{'ppl (loss)':<20}" + "".join(
            f"{results['ppl'][str(n)]['loss']:>10.3f}" if str(n) in results["ppl"] else f"{'':>10}" for n in lengths))
    return "\n".join(lines)


def length_label(n: float) -> str:
    """A context length as papers write it: 8K, 128K, 1M (512 and other odd lengths as they are)."""
    n = int(n)
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10}K"
    return f"{n:,}"


def _line_plot(path: Path, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, title: str,
               ylim: tuple | None = None, length_ticks: bool = False) -> Path:
    """One PNG of labelled lines over a log2 x axis; ``length_ticks``: one tick per plotted length, labelled
    8K, 16K, ... instead of powers of two."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, ylim=ylim)
    ax.set_xscale("log", base=2)
    if length_ticks:
        ticks = sorted({x for xs, _ in series.values() for x in xs})
        ax.set_xticks(ticks, [length_label(x) for x in ticks])
        ax.minorticks_off()
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plots(results: dict, out: Path) -> list[Path]:
    """scores.png (score vs length per task) and ppl.png (loss vs position per length)."""
    written = []
    if results["scores"]:
        series = {}
        for task, by_len in results["scores"].items():
            xs = sorted(int(n) for n in by_len)
            series[task] = (xs, [by_len[str(n)] for n in xs])
        written.append(_line_plot(out / "scores.png", series, "context length (tokens)", "score",
                                  "score vs length", ylim=(-5, 105), length_ticks=True))
    if results["ppl"]:
        series = {f"{length_label(n)} tokens": ([(b["start"] + b["end"]) / 2 for b in r["buckets"]],
                                         [b["loss"] for b in r["buckets"]])
                  for n, r in sorted(results["ppl"].items(), key=lambda x: int(x[0]))}
        written.append(_line_plot(out / "ppl.png", series, "token position", "loss (nats)", "loss vs position"))
    return written


def _write(out: Path, results: dict, predictions: list[dict], force: bool) -> None:
    with whole_folder(out, replace=force) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=2))
        (tmp / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
        (tmp / "table.txt").write_text(table(results) + "\n")
        _plots(results, tmp)


def load_results(run: str) -> dict:
    path = Path(run) / "results.json" if Path(run).is_dir() else Path(run)
    if not path.exists():
        raise ConfigError(f"{run}: no results.json (not a megaprolong-eval output folder)")
    return json.loads(path.read_text())


def compare(a: dict, b: dict, name_a: str = "A", name_b: str = "B") -> str:
    """Per task and length: A, B and B - A; perplexity loss the same way."""
    lines = [f"{'task':<20}{'length':>9}{name_a[-12:]:>14}{name_b[-12:]:>14}{'B - A':>9}"]
    for task in sorted(set(a["scores"]) | set(b["scores"])):
        sa, sb = a["scores"].get(task, {}), b["scores"].get(task, {})
        for n in sorted(set(sa) | set(sb), key=int):
            va, vb = sa.get(n), sb.get(n)
            diff = f"{vb - va:>+9.1f}" if va is not None and vb is not None else f"{'':>9}"
            lines.append(f"{task:<20}{int(n):>9}{_fmt(va, 1):>14}{_fmt(vb, 1):>14}{diff}")
    for n in sorted(set(a["ppl"]) | set(b["ppl"]), key=int):
        va, vb = (r["ppl"].get(n, {}).get("loss") for r in (a, b))
        diff = f"{vb - va:>+9.3f}" if va is not None and vb is not None else f"{'':>9}"
        lines.append(f"{'ppl (loss)':<20}{int(n):>9}{_fmt(va, 3):>14}{_fmt(vb, 3):>14}{diff}")
    return "\n".join(lines)


def _fmt(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"
