"""Adapter for the full HELMET suite (github.com/princeton-nlp/HELMET): write its configs for our model, run
its ``eval.py`` (through :mod:`megaprolong.eval.helmet_launcher`, with HELMET's own interpreter), check that
every requested dataset produced its output, and report the scores as HELMET's ``scripts/collect_results.py``
does.

HELMET's configs (``configs/{category}.yaml`` for 128K, ``configs/{category}_short.yaml`` for 8K-64K) list
datasets, test files and lengths as parallel comma-separated fields. ``eval.py`` writes, per dataset, the file
named by :func:`output_name` (predictions and ``averaged_metrics``) and the same name plus ``.score`` (the
averaged metrics alone; ALCE's citation scores only appear there). It catches every per-dataset exception,
logs it ("Error in {dataset}, continuing...") and exits 0, and it skips a dataset whose output file exists,
whatever model wrote it: so each model gets its own output folder here, outputs written for another model are
refused, and a dataset without output is an error that shows HELMET's log lines for it.

Scores as HELMET reports them: a dataset is matched to its metrics by the first key of
:data:`DATASET_METRICS` that is a substring of its name (``kilt_nq`` -> ``nq``, ``icl_trec_coarse_400shot_balance``
-> ``trec_coarse``); each (dataset, metric) is a column; a category's average is the mean of its columns
(:data:`CATEGORY_COLUMNS`), and the overall figure is the mean of the category averages. These tables equal
``collect_results.py``'s ``dataset_to_metrics`` and ``custom_avgs`` at HELMET commit
4526dfbdc512bd9ff721da336bff4e3e75ecfd27 (2025-04-09).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megaprolong.config import ConfigError
from megaprolong.runtime.log import get_logger

CATEGORIES = ("recall", "rag", "rerank", "cite", "longqa", "summ", "icl")
LIST_FIELDS = ("datasets", "test_files", "demo_files", "input_max_length", "generation_max_length")
# HELMET's collect_results.py: the metrics of each dataset (first key contained in the dataset name wins)...
DATASET_METRICS: dict[str, list[str]] = {
    "json_kv": ["substring_exact_match"], "nq": ["substring_exact_match"], "popqa": ["substring_exact_match"],
    "triviaqa": ["substring_exact_match"], "hotpotqa": ["substring_exact_match"], "narrativeqa": ["gpt-4-score"],
    "msmarco_rerank_psg": ["NDCG@10"], "trec_coarse": ["exact_match"], "trec_fine": ["exact_match"],
    "banking77": ["exact_match"], "clinic150": ["exact_match"], "nlu": ["exact_match"], "qmsum": ["rougeL_recall"],
    "multi_lexsum": ["gpt-4-f1"],
    **{f"ruler_{t}": ["ruler_recall"] for t in ("niah_s_1", "niah_s_2", "niah_s_3", "niah_mk_1", "niah_mk_2",
                                                 "niah_mk_3", "niah_mq", "niah_mv", "fwe", "cwe", "vt")},
    "ruler_qa_1": ["substring_exact_match"], "ruler_qa_2": ["substring_exact_match"],
    "infbench_qa": ["rougeL_f1"], "infbench_choice": ["exact_match"], "infbench_sum": ["gpt-4-f1"],
    "alce_asqa": ["str_em", "citation_rec", "citation_prec"],
    "alce_qampari": ["qampari_rec_top5", "citation_rec", "citation_prec"],
}
# ... and the columns each category averages (its custom_avgs; the overall figure averages the categories).
CATEGORY_COLUMNS: dict[str, list[str]] = {
    "Recall": ["json_kv substring_exact_match", "ruler_niah_mk_2 ruler_recall", "ruler_niah_mk_3 ruler_recall",
               "ruler_niah_mv ruler_recall"],
    "RAG": ["nq substring_exact_match", "hotpotqa substring_exact_match", "popqa substring_exact_match",
            "triviaqa substring_exact_match"],
    "ICL": ["trec_coarse exact_match", "trec_fine exact_match", "banking77 exact_match", "clinic150 exact_match",
            "nlu exact_match"],
    "Cite": ["alce_asqa str_em", "alce_asqa citation_rec", "alce_asqa citation_prec",
             "alce_qampari qampari_rec_top5", "alce_qampari citation_rec", "alce_qampari citation_prec"],
    "Re-rank": ["msmarco_rerank_psg NDCG@10"],
    "LongQA": ["narrativeqa gpt-4-score", "infbench_qa rougeL_f1", "infbench_choice exact_match"],
    "Summ": ["infbench_sum gpt-4-f1", "multi_lexsum gpt-4-f1"],
}
# HELMET's scale for model-judged metrics (as collect_results.py reports them)
_SCALE = {"gpt-4-f1": 100.0, "gpt-4-score": 100 / 3}
# load_LLM sends a model whose path contains one of these to an API client instead of transformers
API_ROUTED = ("gpt", "claude", "gemini", "togetherapi")
# datasets HELMET's data.py loads from the Hugging Face Hub (not from its data/ folder)
HUB_DATASETS = ("narrativeqa", "infbench", "icl_", "multi_lexsum")
# what HELMET's modules import, and the pip package that provides each
HELMET_IMPORTS = {"torch": "torch", "transformers": "transformers", "datasets": "datasets", "accelerate": "accelerate",
                  "rouge_score": "rouge-score", "pytrec_eval": "pytrec-eval-terrier", "pkg_resources": "'setuptools<81'",
                  "yaml": "pyyaml", "tqdm": "tqdm", "numpy": "numpy"}
LAUNCHER = Path(__file__).with_name("helmet_launcher.py")


@dataclass
class Entry:
    """One dataset at one length of a HELMET config: the arguments ``eval.py`` runs it with."""

    source: str  # the config file it comes from, e.g. recall_short
    args: dict  # HELMET's argument values for this dataset (config-level keys + this dataset's list fields)

    @property
    def dataset(self) -> str:
        return self.args["datasets"]

    @property
    def length(self) -> int:
        return int(self.args["input_max_length"])


@dataclass
class Collected:
    """Scores as HELMET reports them, per length (str): per (dataset, metric) column, per category, overall."""

    columns: dict[str, dict[str, float]] = field(default_factory=dict)
    categories: dict[str, dict[str, float]] = field(default_factory=dict)
    overall: dict[str, float] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # dataset@length without an output


def _entries(config: dict, source: Path) -> list[Entry]:
    """One :class:`Entry` per dataset of a HELMET config (its comma lists split)."""
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
    return [Entry(source.stem, {**rest, **{k: v[i] for k, v in columns.items()}}) for i in range(n)]


def helmet_entries(helmet_dir: Path, lengths: list[int], categories=CATEGORIES) -> list[Entry]:
    """HELMET's dataset entries of ``categories`` at the requested lengths, from its configs."""
    if not (helmet_dir / "eval.py").exists() or not (helmet_dir / "configs").is_dir():
        raise ConfigError(f"--helmet-dir {helmet_dir}: not a HELMET checkout (no eval.py and configs/)")
    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown:
        raise ConfigError(f"--categories: unknown {', '.join(unknown)} (HELMET's are {', '.join(CATEGORIES)})")
    found = []
    for category in categories:
        for path in (helmet_dir / "configs" / f"{category}.yaml", helmet_dir / "configs" / f"{category}_short.yaml"):
            if path.exists():
                found += [e for e in _entries(yaml.safe_load(path.read_text()), path) if e.length in lengths]
    if not found:
        raise ConfigError(f"{helmet_dir}/configs: no config of {', '.join(categories)} has the lengths {lengths}")
    return found


def metric_of(dataset: str) -> tuple[str, list[str]] | None:
    """(HELMET's short dataset name, its metrics), matched as collect_results.py does."""
    return next(((d, m) for d, m in DATASET_METRICS.items() if d in dataset), None)


def output_name(args: dict) -> str:
    """The file ``eval.py`` writes for one dataset (its run_test), from the arguments it runs with."""
    a = {"tag": "eval", "max_test_samples": None, "shots": 2, "do_sample": False, "generation_min_length": 0,
         "temperature": 0.0, "top_p": 1.0, "use_chat_template": False, "seed": 42, "popularity_threshold": 3, **args}
    if not a["do_sample"] and a["temperature"] != 0.0:
        a["temperature"] = 0.0  # eval.py's arguments.py does the same
    tag = a["tag"] + (f"_pop{a['popularity_threshold']}" if a["datasets"] == "popqa" else "")
    test_name = os.path.splitext(os.path.basename(a["test_files"]))[0]
    return (f"{a['datasets']}_{tag}_{test_name}_in{a['input_max_length']}_size{a['max_test_samples']}"
            f"_shots{a['shots']}_samp{a['do_sample']}max{a['generation_max_length']}min{a['generation_min_length']}"
            f"t{a['temperature']}p{a['top_p']}_chat{a['use_chat_template']}_{a['seed']}.json")


def score_file(output_dir: Path, args: dict) -> Path:
    """Where HELMET's scores of a dataset are read from (collect_results.py's get_path)."""
    path = output_dir / output_name(args)
    judged = path.with_name(path.name.replace(".json", "-gpt4eval_o.json"))
    if judged.exists():
        return judged
    scored = path.with_name(path.name + ".score")
    return scored if "alce" in args["datasets"] or scored.exists() else path


def model_output_dir(out: Path, model: str) -> Path:
    """OUT/output/<model folder name>-<hash of its path>: HELMET's file names do not include the model."""
    resolved = os.path.abspath(model)  # symlinks kept: HELMET routes by the path it is given
    return out / "output" / f"{Path(resolved).name}-{hashlib.sha1(resolved.encode()).hexdigest()[:8]}"


def check_model_path(model: str) -> str:
    """The path HELMET is given; refused when HELMET would route it to an API client."""
    resolved = os.path.abspath(model)  # symlinks kept: HELMET routes by the path it is given
    routed = [w for w in API_ROUTED if w in resolved]
    if routed:
        raise ConfigError(f"--model {resolved}: HELMET sends a model whose path contains {routed[0]!r} to an API "
                          f"client (model_utils.load_LLM matches {', '.join(API_ROUTED)} anywhere in the path), not "
                          f"to transformers: give a path (e.g. a symlink) without it")
    if not (Path(resolved) / "config.json").exists():
        raise ConfigError(f"--model {resolved}: not an HF model folder (no config.json)")
    return resolved


def check_python(helmet_dir: Path, python: str) -> None:
    """HELMET's imports work under ``python`` (run in its checkout), or a message naming what is missing."""
    code = "import " + ", ".join(["arguments", "data", "utils", "model_utils", *HELMET_IMPORTS])
    try:
        proc = subprocess.run([python, "-c", code], cwd=helmet_dir, capture_output=True, text=True, timeout=600)
    except OSError as e:
        raise ConfigError(f"--python {python}: cannot run it ({e})")
    if proc.returncode:
        missing = re.findall(r"No module named '([^'.]+)", proc.stderr)
        if missing:
            pip = HELMET_IMPORTS.get(missing[-1], missing[-1])
            raise ConfigError(f"--python {python}: HELMET cannot import {missing[-1]!r} (install it into HELMET's "
                              f"environment: {python} -m pip install {pip}; or pass --python with HELMET's venv)")
        raise ConfigError(f"--python {python}: importing HELMET's modules failed:\n{proc.stderr[-2000:]}")


def write_configs(helmet_dir: Path, model: str, entries: list[Entry], out: Path, *, use_chat_template=None,
                  max_test_samples: int | None = None, cpu: bool = False, overwrite: bool = False) -> list[Path]:
    """One HELMET config per source config (its settings kept), for ``model``, in OUT/configs; outputs in
    :func:`model_output_dir`. ``cpu``: the keys HELMET needs without a GPU (no CUDA calls, no torch.compile,
    fp32)."""
    output_dir = model_output_dir(out, model)
    output_dir.mkdir(parents=True, exist_ok=True)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    written = []
    for source in dict.fromkeys(e.source for e in entries):
        group = [e for e in entries if e.source == source]
        config = {k: v for k, v in group[0].args.items() if k not in LIST_FIELDS}
        for key in LIST_FIELDS:
            if key in group[0].args:
                config[key] = ",".join(str(e.args[key]) for e in group)
        config.update(model_name_or_path=model, output_dir=str(output_dir.resolve()), tag="megaprolong")
        if use_chat_template is not None:
            config["use_chat_template"] = use_chat_template
        if max_test_samples is not None:
            config["max_test_samples"] = max_test_samples
        if cpu:
            config.update(no_cuda=True, no_torch_compile=True, no_bf16=True)
        if overwrite:
            config["overwrite"] = True
        path = out / "configs" / f"{source}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        written.append(path)
    return written


def configured_entries(configs: list[Path]) -> list[Entry]:
    """The entries of our written configs (what eval.py runs: the arguments its output names come from)."""
    return [e for path in configs for e in _entries(yaml.safe_load(path.read_text()), path)]


def error_lines(log: str, dataset: str, limit: int = 6) -> str:
    """HELMET's log lines about ``dataset``'s failure: of the traceback logged before "Error in {dataset}",
    the lines that are not stack frames (the logged message, the exception), then that marker line."""
    lines = log.splitlines()
    marker = f"Error in {dataset},"
    ends = [i for i, line in enumerate(lines) if marker in line]
    if not ends:
        return "\n".join(lines[-limit:])
    end = ends[-1]
    start = max((i for i in range(end) if " - ERROR - " in lines[i]), default=end)
    kept = [line for line in lines[start:end] if line.strip() and not line[:1].isspace()]
    return "\n".join(kept[-(limit - 1):] + [lines[end]])


def run(helmet_dir: Path, python: str, configs: list[Path], out: Path) -> list[str]:
    """HELMET's ``eval.py`` on each config, in its checkout, through our launcher; returns one message per
    requested dataset without output (with HELMET's error lines for it)."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    failures = []
    for config in configs:
        cmd = [python, str(LAUNCHER), "--config", str(config.resolve())]
        get_logger("eval").info(f"helmet: {' '.join(cmd)}  (in {helmet_dir})")
        log_path = out / "logs" / f"{config.stem}.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(cmd, cwd=helmet_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:  # shown as it runs, kept for the error report
                sys.stdout.write(line)
                log.write(line)
            proc.wait()
        text = log_path.read_text()
        output_dir = Path(yaml.safe_load(config.read_text())["output_dir"])
        for e in configured_entries([config]):
            if not score_file(output_dir, e.args).exists():
                failures.append(f"{e.dataset}@{e.length}: no output from HELMET (log {log_path}):\n"
                                f"{_indent(error_lines(text, e.dataset))}{_hub_advice(e.dataset)}")
        if proc.returncode and not failures:
            failures.append(f"{config.name}: HELMET exited {proc.returncode}:\n{_indent(error_lines(text, ''))}")
    return failures


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def _needs_hub(dataset: str) -> bool:
    """HELMET loads ``dataset`` from the Hub, and HF_HUB_OFFLINE is not set (so offline it waits on timeouts)."""
    return any(h in dataset for h in HUB_DATASETS) and os.environ.get("HF_HUB_OFFLINE") != "1"


def _hub_advice(dataset: str) -> str:
    if not _needs_hub(dataset):
        return ""
    return ("\n    (HELMET loads this dataset from the Hugging Face Hub: without network, run with HF_HUB_OFFLINE=1 "
            "and the dataset in the HF cache)")


def hub_note(entries: list[Entry]) -> str | None:
    """A note before running, when datasets come from the Hub and HF_HUB_OFFLINE is not set."""
    hub = sorted({e.dataset for e in entries if _needs_hub(e.dataset)})
    if not hub:
        return None
    return (f"HELMET loads {', '.join(hub)} from the Hugging Face Hub; offline, set HF_HUB_OFFLINE=1 (with them in the "
            f"HF cache), or each waits for network timeouts")


def _read_scores(path: Path, metrics: list[str]) -> dict[str, float] | None:
    data = json.loads(path.read_text())
    values = data if path.name.endswith(".score") else data.get("averaged_metrics", {})
    if any(m not in values for m in metrics):
        return None
    return {m: float(values[m]) * _SCALE.get(m, 1.0) for m in metrics}


def collect(entries: list[Entry], output_dir: Path, model: str | None = None) -> Collected:
    """HELMET's scores of ``entries`` from ``output_dir``: columns, category averages, overall (per length).
    ``model``: refuse an output that records another ``model_name_or_path``."""
    found = Collected()
    cells: dict[str, dict[str, list[float]]] = {}
    for e in entries:
        matched = metric_of(e.dataset)
        path = score_file(output_dir, e.args)
        if matched is None or not path.exists():
            found.missing.append(f"{e.dataset}@{e.length}")
            continue
        full = output_dir / output_name(e.args)
        if model is not None and full.exists():
            recorded = json.loads(full.read_text()).get("args", {}).get("model_name_or_path")
            if recorded not in (None, model):
                raise ConfigError(f"{full}: written for {recorded}, not {model}: use another --out")
        scores = _read_scores(path, matched[1])
        if scores is None:
            found.missing.append(f"{e.dataset}@{e.length}")
            continue
        for metric, value in scores.items():  # several datasets in one column: their mean (pivot_table)
            cells.setdefault(f"{matched[0]} {metric}", {}).setdefault(str(e.length), []).append(value)
    found.columns = {c: {n: sum(v) / len(v) for n, v in by_len.items()} for c, by_len in cells.items()}
    lengths = sorted({n for by_len in found.columns.values() for n in by_len}, key=int)
    for category, columns in CATEGORY_COLUMNS.items():
        for n in lengths:
            values = [found.columns[c][n] for c in columns if n in found.columns.get(c, {})]
            if len(values) == len(columns):  # a category is reported only with all its columns
                found.categories.setdefault(category, {})[n] = sum(values) / len(values)
    for n in lengths:
        values = [by_len[n] for by_len in found.categories.values() if n in by_len]
        if values:
            found.overall[n] = sum(values) / len(values)
    return found


def results_dict(found: Collected, model: str, partial: bool) -> dict:
    """Our results.json: per-dataset columns under ``scores`` (as our own tasks), HELMET's averages apart."""
    return {"model": model, "scores": {f"helmet:{c}": v for c, v in found.columns.items()}, "ppl": {},
            "categories": found.categories, "overall": found.overall,
            "overall_categories": sorted(found.categories), "missing": found.missing, "partial": partial}


def table(results: dict) -> str:
    """Per-dataset columns, then category averages, then the overall figure (mean of the categories)."""
    lengths = sorted({int(n) for rows in (results["scores"], results["categories"]) for s in rows.values() for n in s},
                     key=int)

    def rows(named: dict) -> list[str]:
        return [f"{name:<44}" + "".join(f"{v.get(str(n), float('nan')):>9.1f}" for n in lengths)
                for name, v in named.items()]

    head = "HELMET (PARTIAL: datasets missing)" if results["partial"] else "HELMET"
    lines = [f"{head:<44}" + "".join(f"{n:>9}" for n in lengths), *rows(results["scores"])]
    if results["categories"]:
        lines += ["", *rows({f"category {c}": v for c, v in results["categories"].items()})]
        k = len(results["overall_categories"])
        lines += rows({f"overall (mean of {k}/{len(CATEGORY_COLUMNS)} categories)": results["overall"]})
    return "\n".join(lines)
