"""Adapter for the full HELMET suite (github.com/princeton-nlp/HELMET): write its configs for our model,
run its ``eval.py``, and collect its scores into our results format and table.

HELMET's configs (``configs/{category}.yaml`` for 128K, ``configs/{category}_short.yaml`` for 8K-64K) list
datasets, test files and lengths as parallel comma-separated fields; we keep the entries at the requested
lengths. Its outputs are ``{dataset}_{tag}_{test}_in{length}_size..._{seed}.json`` with
``averaged_metrics``, or a ``.json.score`` file next to it (model-judged tasks).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from megaprolong.config import ConfigError

CATEGORIES = ("recall", "rag", "rerank", "cite", "longqa", "summ", "icl")
LIST_FIELDS = ("datasets", "test_files", "demo_files", "input_max_length", "generation_max_length")
# HELMET's headline metric per dataset (its scripts/collect_results.py) and its category averages.
DATASET_METRICS = {
    "json_kv": "substring_exact_match", "nq": "substring_exact_match", "popqa": "substring_exact_match",
    "triviaqa": "substring_exact_match", "hotpotqa": "substring_exact_match", "narrativeqa": "gpt-4-score",
    "msmarco_rerank_psg": "NDCG@10", "trec_coarse": "exact_match", "trec_fine": "exact_match",
    "banking77": "exact_match", "clinic150": "exact_match", "nlu": "exact_match", "qmsum": "rougeL_recall",
    "multi_lexsum": "gpt-4-f1", "ruler_niah_mk_2": "ruler_recall", "ruler_niah_mk_3": "ruler_recall",
    "ruler_niah_mv": "ruler_recall", "infbench_qa": "rougeL_f1", "infbench_choice": "exact_match",
    "infbench_sum": "gpt-4-f1", "alce_asqa": "str_em", "alce_qampari": "qampari_rec_top5",
}
CATEGORY_DATASETS = {
    "Recall": ["json_kv", "ruler_niah_mk_2", "ruler_niah_mk_3", "ruler_niah_mv"],
    "RAG": ["nq", "hotpotqa", "popqa", "triviaqa"],
    "Re-rank": ["msmarco_rerank_psg"],
    "Cite": ["alce_asqa", "alce_qampari"],
    "LongQA": ["narrativeqa", "infbench_qa", "infbench_choice"],
    "Summ": ["infbench_sum", "multi_lexsum"],
    "ICL": ["trec_coarse", "trec_fine", "banking77", "clinic150", "nlu"],
}


def _entries(config: dict, source: Path) -> list[dict]:
    """One dict per dataset of a HELMET config (its comma lists split)."""
    n = len(str(config["datasets"]).split(","))
    columns = {}
    for key in LIST_FIELDS:
        if key not in config:
            continue
        values = str(config[key]).split(",")
        if len(values) == 1:
            values = values * n
        if len(values) != n:
            raise ConfigError(f"{source}: {key} has {len(values)} entries for {n} datasets")
        columns[key] = values
    rest = {k: v for k, v in config.items() if k not in LIST_FIELDS}
    return [{**rest, **{k: v[i] for k, v in columns.items()}} for i in range(n)]


def helmet_entries(helmet_dir: Path, lengths: list[int], categories=CATEGORIES) -> dict[str, list[dict]]:
    """HELMET's dataset entries per category at the requested lengths."""
    if not (helmet_dir / "eval.py").exists() or not (helmet_dir / "configs").is_dir():
        raise ConfigError(f"--helmet-dir {helmet_dir}: not a HELMET checkout (no eval.py and configs/)")
    found: dict[str, list[dict]] = {}
    for category in categories:
        for path in (helmet_dir / "configs" / f"{category}.yaml", helmet_dir / "configs" / f"{category}_short.yaml"):
            if path.exists():
                for e in _entries(yaml.safe_load(path.read_text()), path):
                    if int(e["input_max_length"]) in lengths:
                        found.setdefault(category, []).append(e)
    if not found:
        raise ConfigError(f"{helmet_dir}/configs: no HELMET config has the lengths {lengths}")
    return found


def write_configs(helmet_dir: Path, model: str, lengths: list[int], out: Path, use_chat_template: bool | None = None
                  ) -> list[Path]:
    """HELMET configs for ``model`` at ``lengths``, one per category, in OUT/configs; outputs go to OUT/output."""
    written = []
    (out / "configs").mkdir(parents=True, exist_ok=True)
    for category, entries in helmet_entries(helmet_dir, lengths).items():
        config = {k: v for k, v in entries[0].items() if k not in LIST_FIELDS}
        for key in LIST_FIELDS:
            if key in entries[0]:
                config[key] = ",".join(str(e[key]) for e in entries)
        config.update(model_name_or_path=str(Path(model).resolve()), output_dir=str((out / "output").resolve()),
                      tag="megaprolong")
        if use_chat_template is not None:
            config["use_chat_template"] = use_chat_template
        path = out / "configs" / f"{category}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        written.append(path)
    return written


def run(helmet_dir: Path, configs: list[Path]) -> None:
    """HELMET's own ``eval.py`` on each config, in its checkout (it finds its data there)."""
    for config in configs:
        cmd = [sys.executable, "eval.py", "--config", str(config.resolve())]
        print(f"megaprolong-eval helmet: {' '.join(cmd)}  (in {helmet_dir})", flush=True)
        if subprocess.run(cmd, cwd=helmet_dir).returncode != 0:
            raise SystemExit(f"megaprolong-eval helmet: HELMET failed on {config}")


def _score(output_dir: Path, dataset: str, length: int) -> float | None:
    metric = DATASET_METRICS.get(dataset) or next((m for d, m in DATASET_METRICS.items() if d in dataset), None)
    for path in sorted(output_dir.glob(f"{dataset}_*_in{length}_*.json*")):
        data = json.loads(path.read_text())
        values = data if path.name.endswith(".score") else data.get("averaged_metrics", {})
        if metric in values:
            scale = 100 if metric == "gpt-4-f1" else 100 / 3 if metric == "gpt-4-score" else 1  # as HELMET reports
            return float(values[metric]) * scale
    return None


def collect(configs_dir: Path, output_dir: Path) -> dict:
    """Scores found for every dataset and length in our HELMET configs, plus HELMET's category averages."""
    scores: dict[str, dict[str, float]] = {}
    missing = []
    for path in sorted(configs_dir.glob("*.yaml")):
        for e in _entries(yaml.safe_load(path.read_text()), path):
            length = int(e["input_max_length"])
            value = _score(output_dir, e["datasets"], length)
            if value is None:
                missing.append(f"{e['datasets']}@{length}")
            else:
                scores.setdefault(f"helmet:{e['datasets']}", {})[str(length)] = value
    for category, datasets in CATEGORY_DATASETS.items():
        lengths = {n for d in datasets for n in scores.get(f"helmet:{d}", {})}
        for n in lengths:
            vals = [scores[f"helmet:{d}"][n] for d in datasets if n in scores.get(f"helmet:{d}", {})]
            if len(vals) == len([d for d in datasets if f"helmet:{d}" in scores]):
                scores.setdefault(f"HELMET {category}", {})[n] = sum(vals) / len(vals)
    return {"scores": scores, "ppl": {}, "missing": missing}
