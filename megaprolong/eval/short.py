"""Short-context evaluation through EleutherAI's lm-evaluation-harness: does a long-context stage cost
short-context ability? (ProLong reports HellaSwag, MMLU, ARC-Challenge, WinoGrande and GSM8K.)

lm_eval is an optional dependency (``pip install -e '.[lmeval]'``), imported here only. Its ``hf`` model (or
``vllm`` where installed) scores an HF model folder; any lm_eval task name works, the user's own YAML tasks
too (``--include-path DIR``, lm_eval's option). Every task's data is made ready first, so a task whose
dataset cannot be had fails the run before anything is evaluated or written: offline, ``--data-dir`` points
at an HF cache (``HF_HOME``: ``DIR/hub``, ``DIR/datasets``) that holds them. Results keep lm_eval's metric
names and standard errors (``acc,none``, ``acc_stderr,none``) and record what was used.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from megaprolong.config import ConfigError
from megaprolong.runtime.files import out_folder_problem, whole_folder

# ProLong's five short-context tasks with the Open LLM Leaderboard's shot counts (change with --shots).
PROLONG_TASKS = {"hellaswag": 10, "mmlu": 5, "arc_challenge": 25, "winogrande": 5, "gsm8k": 5}
# The metric each of them is reported by (others: acc_norm, acc, exact_match, the first one lm_eval gives).
PRIMARY_METRIC = {"hellaswag": "acc_norm,none", "mmlu": "acc,none", "arc_challenge": "acc_norm,none",
                  "winogrande": "acc,none", "gsm8k": "exact_match,strict-match"}
INSTALL = "pip install -e '.[lmeval]' (lm-evaluation-harness)"


@dataclass
class ShortConfig:
    model: str | None = None  # HF model folder
    out: str | None = None  # results folder (must not exist unless force)
    tasks: list[str] = field(default_factory=lambda: list(PROLONG_TASKS))  # lm_eval task or group names
    shots: dict[str, int] = field(default_factory=dict)  # task -> few-shot examples (default: PROLONG_TASKS, else the task's)
    include_path: str | None = None  # a folder of the user's own lm_eval task YAMLs
    data_dir: str | None = None  # an HF cache (HF_HOME) holding the tasks' datasets: no network is used
    backend: Literal["hf", "vllm"] = "hf"  # lm_eval's model type
    batch_size: int = 8
    dtype: str = "auto"  # torch dtype of the weights: auto (the checkpoint's), bfloat16, float32, ...
    device: str | None = None  # e.g. cuda:0, cpu (default: CUDA when present)
    tp: int = 1  # vLLM tensor parallel size
    limit: int | None = None  # at most this many examples per task (quick checks; not comparable numbers)
    seed: int = 1234
    force: bool = False


def lm_eval_module():
    try:
        import lm_eval
    except ImportError:
        raise ConfigError(f"megaprolong-eval short needs lm-evaluation-harness, which is not installed: {INSTALL}") \
            from None
    return lm_eval


def _offline(data_dir: str | None) -> None:
    """Point HF at a local cache and forbid the network (before datasets is imported)."""
    if data_dir:
        os.environ["HF_HOME"] = os.path.abspath(data_dir)
        os.environ["HF_DATASETS_CACHE"] = os.path.join(os.path.abspath(data_dir), "datasets")
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"


def validate(cfg: ShortConfig) -> None:
    problems = []
    if not cfg.model or not os.path.isdir(cfg.model):
        problems.append(f"--model {cfg.model}: not an HF model folder")
    if problem := out_folder_problem(cfg.out, cfg.force):
        problems.append(problem)
    if cfg.include_path and not os.path.isdir(cfg.include_path):
        problems.append(f"--include-path {cfg.include_path}: not a folder")
    if cfg.data_dir and not os.path.isdir(cfg.data_dir):
        problems.append(f"--data-dir {cfg.data_dir}: not a folder")
    if not cfg.tasks:
        problems.append("--tasks: none given")
    if problems:
        raise ConfigError("; ".join(problems))


def _prepare(cfg: ShortConfig):
    """The task manager, every task checked known and its data loaded (errors name the task and the fix)."""
    lm_eval_module()
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=cfg.include_path)
    known = set(manager.all_tasks)
    unknown = [t for t in cfg.tasks if t not in known]
    if unknown:
        import difflib

        hints = [f"{t} (did you mean {', '.join(difflib.get_close_matches(t, known, 3))}?)" if
                 difflib.get_close_matches(t, known, 3) else t for t in unknown]
        raise ConfigError(f"unknown lm_eval task(s): {'; '.join(hints)}; your own YAML tasks need --include-path DIR")
    for task in cfg.tasks:
        try:
            get_task_dict([task], manager)  # loads (or downloads) the task's dataset
        except Exception as e:  # noqa: BLE001  datasets' errors are of many kinds: name the task, the cause, the fix
            where = (f"the HF cache in --data-dir {cfg.data_dir} does not hold it" if cfg.data_dir else
                     "no network, or not in the HF cache: set --data-dir to an HF cache folder (HF_HOME) that holds it")
            raise ConfigError(f"task {task}: its dataset cannot be loaded ({type(e).__name__}: {str(e)[:200]}); "
                              f"{where}") from None
    return manager


def _model(cfg: ShortConfig):
    from lm_eval.api.registry import get_model

    if cfg.backend == "vllm":
        args = f"pretrained={cfg.model},dtype={cfg.dtype},tensor_parallel_size={cfg.tp}"
    else:
        args = f"pretrained={cfg.model},dtype={cfg.dtype}"
    device = cfg.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return get_model(cfg.backend).create_from_arg_string(args, {"batch_size": cfg.batch_size, "device": device}), device


def _number(v):
    return None if isinstance(v, float) and not math.isfinite(v) else float(v)


def primary_metric(task: str, metrics: dict) -> str | None:
    """The metric a task is reported by: ProLong's choice for its tasks, else acc_norm, acc, exact_match, or
    the first numeric metric lm_eval gives."""
    if PRIMARY_METRIC.get(task) in metrics:
        return PRIMARY_METRIC[task]
    for name in ("acc_norm,none", "acc,none", "exact_match,strict-match", "exact_match,none"):
        if name in metrics:
            return name
    return next((k for k, v in metrics.items() if "_stderr" not in k and isinstance(v, (int, float))), None)


def run_short(cfg: ShortConfig) -> dict:
    """Evaluate ``cfg.model`` on ``cfg.tasks``; writes OUT/results.json, OUT/table.txt, OUT/short.png."""
    validate(cfg)
    _offline(cfg.data_dir)
    t0 = time.time()
    manager = _prepare(cfg)
    import lm_eval

    lm, device = _model(cfg)
    used = asdict(cfg)
    used.update(device=device, lm_eval_version=lm_eval.__version__, shots={})
    results = {"model": os.path.abspath(cfg.model), "suite": "short", "backend": cfg.backend, "config": used,
               "short": {}, "scores": {}, "ppl": {}}
    for task in cfg.tasks:
        shots = cfg.shots.get(task, PROLONG_TASKS.get(task))
        out = lm_eval.simple_evaluate(model=lm, tasks=[task], num_fewshot=shots, limit=cfg.limit,
                                      task_manager=manager, random_seed=cfg.seed, numpy_random_seed=cfg.seed,
                                      torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
        metrics = {k: _number(v) for k, v in out["results"][task].items()
                   if isinstance(v, (int, float)) and k != "sample_len"}
        used["shots"][task] = out["n-shot"].get(task, shots)
        results["short"][task] = {"metrics": metrics, "primary": primary_metric(task, metrics),
                                  "num_fewshot": used["shots"][task],
                                  "samples": out["n-samples"].get(task, {}).get("effective")}
    results["seconds"] = time.time() - t0
    _write(Path(cfg.out), results, cfg.force)
    return results


def table(results: dict) -> str:
    """One row per task: its primary metric and standard error (x 100), the shots; the average."""
    lines = [f"{'task':<24}{'metric':<28}{'value':>8}{'stderr':>9}{'shots':>7}"]
    values = []
    for task, r in results["short"].items():
        m = r["primary"]
        value, err = r["metrics"].get(m), r["metrics"].get(m.replace(",", "_stderr,", 1)) if m else None
        values.append(value)
        lines.append(f"{task:<24}{m or '-':<28}{_pct(value):>8}{_pct(err):>9}{r['num_fewshot'] or 0:>7}")
    if values and all(v is not None for v in values):
        lines.append(f"{'average':<24}{'':<28}{_pct(sum(values) / len(values)):>8}")
    return "\n".join(lines)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["short"])
    values = [100 * (results["short"][t]["metrics"].get(results["short"][t]["primary"]) or 0) for t in tasks]
    errors = [100 * (results["short"][t]["metrics"].get((results["short"][t]["primary"] or "").replace(",", "_stderr,", 1))
                     or 0) for t in tasks]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(tasks)), 3.5))
    ax.bar(tasks, values, yerr=errors, capsize=3)
    ax.set(ylabel="score (primary metric, %)", title="short-context tasks (lm-evaluation-harness)", ylim=(0, 100))
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write(out: Path, results: dict, force: bool) -> None:
    with whole_folder(out, replace=force) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False))
        (tmp / "table.txt").write_text(table(results) + "\n")
        _plot(results, tmp / "short.png")
