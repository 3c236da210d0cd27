"""The HELMET adapter: on a fake checkout that behaves as HELMET's eval.py does (its real config and dataset
names, its output naming, its swallowed per-dataset errors, its skipping of existing outputs), HELMET's
collect_results.py arithmetic on score files of all seven categories, and a run against a real HELMET
checkout when MEGAPROLONG_HELMET_DIR (and MEGAPROLONG_HELMET_PYTHON, its venv's interpreter) are set."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helmet_data import write_recall_data

REPO = Path(__file__).resolve().parent.parent

RECALL_SHORT = """input_max_length: 8192,16384,8192,8192,8192,16384
datasets: ruler_niah_mk_2,ruler_niah_mk_2,ruler_niah_mk_3,ruler_niah_mv,json_kv,json_kv
generation_max_length: 50,50,100,50,100,100
test_files: data/ruler/niah_multikey_2/validation_8192.jsonl,data/ruler/niah_multikey_2/validation_16384.jsonl,data/ruler/niah_multikey_3/validation_8192.jsonl,data/ruler/niah_multivalue/validation_8192.jsonl,data/json_kv/test_k105_dep6.jsonl,data/json_kv/test_k220_dep6.jsonl
demo_files: ',,,,,'
use_chat_template: false
max_test_samples: 100
shots: 2
stop_new_line: false
model_name_or_path: meta-llama/Llama-3.1-8B-Instruct
"""
RAG_SHORT = """input_max_length: 8192,8192
datasets: kilt_nq,kilt_popqa_3
generation_max_length: 20,20
test_files: data/kilt/nq-dev-multikilt_1000_k50_dep6.jsonl,data/kilt/popqa_test_1000_k50_dep6.jsonl
demo_files: data/kilt/nq-train-multikilt_1000_k3_dep6.jsonl,data/kilt/popqa_test_1000_k3_dep6.jsonl
use_chat_template: false
max_test_samples: 100
shots: 2
stop_new_line: true
model_name_or_path: meta-llama/Llama-3.1-8B-Instruct
"""
# The fake eval.py: HELMET's argument defaults, output naming, skip-if-exists and per-dataset error handling,
# written from reading HELMET's eval.py and arguments.py. Scores are a known function of model and dataset;
# datasets named in FAKE_HELMET_FAIL raise inside the loop, which HELMET logs and survives (exit 0).
FAKE_EVAL = r'''
import json, logging, os, sys, zlib
import yaml
import model_utils
logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s")
log = logging.getLogger(__name__)
c = {"tag": "eval", "shots": 2, "do_sample": False, "generation_min_length": 0, "temperature": 0.0, "top_p": 1.0,
     "use_chat_template": False, "seed": 42, "max_test_samples": None}
c.update(yaml.safe_load(open(sys.argv[sys.argv.index("--config") + 1])))
model = model_utils.HFModel(c["model_name_or_path"])
os.makedirs(c["output_dir"], exist_ok=True)
lengths = str(c["input_max_length"]).split(",")
gens = str(c["generation_max_length"]).split(",")
for d, t, n, g in zip(c["datasets"].split(","), c["test_files"].split(","), lengths, gens):
    name = "{}_{}_{}_in{}_size{}_shots{}_samp{}max{}min{}t{}p{}_chat{}_{}.json".format(
        d, c["tag"], os.path.splitext(os.path.basename(t))[0], n, c["max_test_samples"], c["shots"], c["do_sample"],
        g, c["generation_min_length"], c["temperature"], c["top_p"], c["use_chat_template"], c["seed"])
    path = os.path.join(c["output_dir"], name)
    if os.path.exists(path) and not c.get("overwrite"):
        log.warning(f"{path} already exists, skipping...")
        continue
    try:
        if d in os.environ.get("FAKE_HELMET_FAIL", "").split(","):
            raise FileNotFoundError(f"Unable to find '{t}'")
        metric = "ruler_recall" if d.startswith("ruler") else "substring_exact_match"
        score = zlib.crc32(f"{c['model_name_or_path']}|{d}|{n}".encode()) % 1000 / 10
        averaged = {metric: score, "input_len": int(n)}
        args = {**c, "datasets": d, "model_name_or_path": c["model_name_or_path"]}
        json.dump({"args": args, "data": [], "averaged_metrics": averaged, "attn": model.attn}, open(path, "w"))
        json.dump(averaged, open(path + ".score", "w"))
    except Exception as e:
        log.exception(e)
        log.error(f"Error in {d}, continuing...")
'''


def fake_score(model: str, dataset: str, length: int) -> float:
    import zlib

    return zlib.crc32(f"{model}|{dataset}|{length}".encode()) % 1000 / 10


def fake_helmet(root: Path) -> Path:
    helmet = root / "HELMET"
    (helmet / "configs").mkdir(parents=True)
    (helmet / "configs" / "recall_short.yaml").write_text(RECALL_SHORT)
    (helmet / "configs" / "rag_short.yaml").write_text(RAG_SHORT)
    (helmet / "eval.py").write_text(FAKE_EVAL)
    (helmet / "model_utils.py").write_text(
        "class HFModel:\n    def __init__(self, name, **kwargs):\n"
        "        self.attn = kwargs.get('attn_implementation', 'flash_attention_2')\n")
    for module in ("arguments", "data", "utils"):
        (helmet / f"{module}.py").write_text("")
    return helmet


def helmet_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "megaprolong.eval", "helmet", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


@pytest.fixture()
def helmet_python(tmp_path):
    """An interpreter with HELMET's imports: this one plus stand-ins for the packages it lacks."""
    stand_ins = tmp_path / "stand_ins"
    stand_ins.mkdir()
    for module in ("rouge_score", "pytrec_eval", "pkg_resources"):
        try:
            __import__(module)
        except ImportError:
            (stand_ins / f"{module}.py").write_text("")
    script = tmp_path / "helmet-python"
    script.write_text(f"#!/bin/sh\nPYTHONPATH={stand_ins}${{PYTHONPATH:+:$PYTHONPATH}} exec {sys.executable} \"$@\"\n")
    script.chmod(0o755)
    return script


def second_model(model_dir: Path, root: Path) -> Path:
    other = root / "other_model"
    shutil.copytree(model_dir, other)
    return other


def test_fake_helmet_scores_categories_and_per_model_outputs(tmp_path, tiny_chat_model, helmet_python):
    helmet, out = fake_helmet(tmp_path), tmp_path / "run"
    args = ["--helmet-dir", helmet, "--python", helmet_python, "--categories", "recall,rag", "--lengths", "8192,16384",
            "--out", out, "--run"]
    run = helmet_cli("--model", tiny_chat_model, *args)
    assert run.returncode == 0, run.stderr[-3000:]
    model = os.path.abspath(tiny_chat_model)
    results = json.loads((out / "results.json").read_text())
    expected = {"helmet:ruler_niah_mk_2 ruler_recall": {str(n): fake_score(model, "ruler_niah_mk_2", n)
                                                         for n in (8192, 16384)},
                "helmet:ruler_niah_mk_3 ruler_recall": {"8192": fake_score(model, "ruler_niah_mk_3", 8192)},
                "helmet:ruler_niah_mv ruler_recall": {"8192": fake_score(model, "ruler_niah_mv", 8192)},
                "helmet:json_kv substring_exact_match": {str(n): fake_score(model, "json_kv", n) for n in (8192, 16384)},
                "helmet:nq substring_exact_match": {"8192": fake_score(model, "kilt_nq", 8192)},
                "helmet:popqa substring_exact_match": {"8192": fake_score(model, "kilt_popqa_3", 8192)}}
    assert results["scores"] == expected  # one division by 10: the same float on both sides
    # Recall has its four columns at 8192 only; RAG two of its four: one category average, the overall figure.
    recall = sum(expected[f"helmet:{c}"]["8192"] for c in ("ruler_niah_mk_2 ruler_recall", "ruler_niah_mk_3 ruler_recall",
                                                         "ruler_niah_mv ruler_recall", "json_kv substring_exact_match"))
    assert results["categories"] == {"Recall": {"8192": pytest.approx(recall / 4)}}
    assert results["overall"] == {"8192": pytest.approx(recall / 4)} and not results["partial"]
    written = {p.stem: p.read_text() for p in (out / "configs").glob("*.yaml")}
    assert set(written) == {"recall_short", "rag_short"}
    assert "no_cuda: true" in written["recall_short"] and "stop_new_line: true" in written["rag_short"]
    outputs = list((out / "output").iterdir())
    assert len(outputs) == 1 and outputs[0].name.startswith(Path(model).name + "-")
    sample = json.loads(next(outputs[0].glob("json_kv_*_in8192_*.json")).read_text())
    assert sample["attn"] == "sdpa"  # our launcher's choice without flash-attn, in HELMET's own constructor

    # Another model, the same --out: its own folder, its own scores (HELMET would have skipped every dataset).
    other = os.path.abspath(second_model(Path(tiny_chat_model), tmp_path))
    run = helmet_cli("--model", other, *args)
    assert run.returncode == 0, run.stderr[-3000:]
    again = json.loads((out / "results.json").read_text())
    assert again["scores"]["helmet:json_kv substring_exact_match"]["8192"] == pytest.approx(
        fake_score(other, "json_kv", 8192))
    assert fake_score(other, "json_kv", 8192) != fake_score(model, "json_kv", 8192)
    assert len(list((out / "output").iterdir())) == 2


def test_fake_helmet_failures_are_named_and_stop_the_run(tmp_path, tiny_chat_model, helmet_python):
    helmet, out = fake_helmet(tmp_path), tmp_path / "run"
    args = ["--helmet-dir", helmet, "--python", helmet_python, "--model", tiny_chat_model, "--categories", "recall,rag",
            "--lengths", "8192", "--out", out, "--run"]
    run = helmet_cli(*args, env={"FAKE_HELMET_FAIL": "kilt_popqa_3"})
    assert run.returncode == 1
    assert "kilt_popqa_3@8192: no output from HELMET" in run.stderr
    assert "Unable to find 'data/kilt/popqa_test_1000_k50_dep6.jsonl'" in run.stderr
    assert "kilt_nq@8192" not in run.stderr and "--allow-partial" in run.stderr
    partial = helmet_cli(*args, "--allow-partial", env={"FAKE_HELMET_FAIL": "kilt_popqa_3"})
    assert partial.returncode == 0 and "PARTIAL" in partial.stdout
    assert json.loads((out / "results.json").read_text())["partial"] is True


def test_refused_before_running(tmp_path, tiny_chat_model, helmet_python):
    helmet = fake_helmet(tmp_path)
    routed = tmp_path / "my-gpt-finetune"
    shutil.copytree(tiny_chat_model, routed)
    common = ["--helmet-dir", helmet, "--lengths", "8192", "--categories", "recall", "--out", tmp_path / "o", "--run"]
    run = helmet_cli("--model", routed, "--python", helmet_python, *common)
    assert run.returncode == 2 and "'gpt'" in run.stderr and "API" in run.stderr
    run = helmet_cli("--model", tiny_chat_model, "--python", helmet_python, *common, "--categories", "nosuch")
    assert run.returncode == 2 and "unknown nosuch" in run.stderr
    # an interpreter without rouge_score: a package in front of the installed one that fails as a missing one does
    hidden = tmp_path / "hidden" / "rouge_score"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'rouge_score'\", name='rouge_score')\n")
    without = tmp_path / "python-without-rouge"
    without.write_text(f"#!/bin/sh\nPYTHONPATH={hidden.parent}${{PYTHONPATH:+:$PYTHONPATH}} exec {sys.executable} \"$@\"\n")
    without.chmod(0o755)
    run = helmet_cli("--model", tiny_chat_model, "--python", without, *common)
    assert run.returncode == 2 and "cannot import 'rouge_score'" in run.stderr and "pip install rouge-score" in run.stderr


# Score files for all seven categories at 8192, named as HELMET's eval.py names them for its real configs, with
# the raw values HELMET writes (model-judged metrics unscaled, in their -gpt4eval_o.json files).
ALL_CATEGORIES = {  # dataset: (test file, file suffix, {metric: raw value})
    "json_kv": ("data/json_kv/test_k105_dep6.jsonl", ".json.score", {"substring_exact_match": 91.0}),
    "ruler_niah_mk_2": ("data/ruler/niah_multikey_2/validation_8192.jsonl", ".json.score", {"ruler_recall": 80.0}),
    "ruler_niah_mk_3": ("data/ruler/niah_multikey_3/validation_8192.jsonl", ".json.score", {"ruler_recall": 61.0}),
    "ruler_niah_mv": ("data/ruler/niah_multivalue/validation_8192.jsonl", ".json.score", {"ruler_recall": 77.5}),
    "kilt_nq": ("data/kilt/nq-dev-multikilt_1000_k50_dep6.jsonl", ".json.score", {"substring_exact_match": 50.0}),
    "kilt_triviaqa": ("data/kilt/triviaqa-dev-multikilt_1000_k50_dep6.jsonl", ".json.score",
                      {"substring_exact_match": 70.0}),
    "kilt_hotpotqa": ("data/kilt/hotpotqa-dev-multikilt_1000_k50_dep3.jsonl", ".json.score",
                      {"substring_exact_match": 40.0}),
    "kilt_popqa_3": ("data/kilt/popqa_test_1000_k50_dep6.jsonl", ".json.score", {"substring_exact_match": 45.0}),
    "msmarco_rerank_psg": ("data/msmarco/test_reranking_data_k50_dep3.jsonl", ".json.score", {"NDCG@10": 33.3}),
    "alce_asqa_30": ("data/alce/asqa_eval_gtr_top2000.json", ".json.score",
                     {"str_em": 30.0, "citation_rec": 10.0, "citation_prec": 20.0}),
    "alce_qampari_30": ("data/alce/qampari_eval_gtr_top2000.json", ".json.score",
                        {"qampari_rec_top5": 12.0, "citation_rec": 6.0, "citation_prec": 9.0}),
    "narrativeqa_7892": ("", "-gpt4eval_o.json", {"gpt-4-score": 1.5}),
    "infbench_qa_eng_7982": ("", ".json.score", {"rougeL_f1": 25.0}),
    "infbench_choice_eng_7982": ("", ".json.score", {"exact_match": 60.0}),
    "infbench_sum_eng_6792": ("", "-gpt4eval_o.json", {"gpt-4-f1": 0.21}),
    "multi_lexsum_7492": ("", "-gpt4eval_o.json", {"gpt-4-f1": 0.43}),
    "icl_trec_coarse_400shot_balance": ("", ".json.score", {"exact_match": 64.0}),
    "icl_trec_fine_400shot_balance": ("", ".json.score", {"exact_match": 38.0}),
    "icl_banking77_360shot_balance": ("", ".json.score", {"exact_match": 71.0}),
    "icl_clinic150_440shot_balance": ("", ".json.score", {"exact_match": 80.0}),
    "icl_nlu_510shot_balance": ("", ".json.score", {"exact_match": 76.0}),
}


def test_category_and_overall_averages_are_helmets_arithmetic(tmp_path):
    from megaprolong.eval.helmet import Entry, collect

    out = tmp_path / "output"
    out.mkdir()
    entries = []
    for dataset, (test_file, suffix, values) in ALL_CATEGORIES.items():
        args = {"datasets": dataset, "test_files": test_file, "input_max_length": "8192", "generation_max_length": "20",
                "tag": "megaprolong", "max_test_samples": 100, "shots": 2, "use_chat_template": False}
        test_name = Path(test_file).stem if test_file else ""
        base = (f"{dataset}_megaprolong_{test_name}_in8192_size100_shots2_sampFalsemax20min0t0.0p1.0"
                f"_chatFalse_42")
        (out / (base + suffix)).write_text(json.dumps(values if suffix != "-gpt4eval_o.json"
                                                      else {"averaged_metrics": values}))
        entries.append(Entry("all", args))
    found = collect(entries, out)
    assert found.missing == []
    # HELMET's custom_avgs by hand: gpt-4-score x 100/3, gpt-4-f1 x 100; each category the mean of its columns.
    expected = {
        "Recall": (91.0 + 80.0 + 61.0 + 77.5) / 4,
        "RAG": (50.0 + 40.0 + 45.0 + 70.0) / 4,
        "ICL": (64.0 + 38.0 + 71.0 + 80.0 + 76.0) / 5,
        "Cite": (30.0 + 10.0 + 20.0 + 12.0 + 6.0 + 9.0) / 6,
        "Re-rank": 33.3,
        "LongQA": (1.5 * 100 / 3 + 25.0 + 60.0) / 3,
        "Summ": (21.0 + 43.0) / 2,
    }
    assert {c: v["8192"] for c, v in found.categories.items()} == pytest.approx(expected)
    assert found.overall["8192"] == pytest.approx(sum(expected.values()) / 7)
    assert found.columns["narrativeqa gpt-4-score"]["8192"] == pytest.approx(50.0)


@pytest.mark.skipif(not os.environ.get("MEGAPROLONG_HELMET_DIR"),
                    reason="set MEGAPROLONG_HELMET_DIR to a princeton-nlp/HELMET checkout (and MEGAPROLONG_HELMET_PYTHON "
                           "to an interpreter with its requirements) to run the adapter against the real HELMET")
def test_real_helmet_recall_offline_on_cpu(tmp_path, tiny_chat_model):
    """The real HELMET, offline, on CPU, with our tiny model and generated recall data at 8K: the adapter's scores
    are HELMET's own .json.score values; a category without data fails naming its datasets; another model in
    the same --out gets its own scores."""
    helmet = tmp_path / "HELMET"
    shutil.copytree(os.environ["MEGAPROLONG_HELMET_DIR"], helmet, ignore=shutil.ignore_patterns("data", ".git"))
    write_recall_data(helmet, 8192, samples=6)
    python = os.environ.get("MEGAPROLONG_HELMET_PYTHON", sys.executable)
    out = tmp_path / "run"
    common = ["--helmet-dir", helmet, "--python", python, "--lengths", "8192", "--max-test-samples", 6, "--out", out,
              "--run"]
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = helmet_cli("--model", tiny_chat_model, "--categories", "recall", *common, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    folder = next((out / "output").iterdir())
    for column, by_len in results["scores"].items():
        dataset, metric = column.removeprefix("helmet:").split(" ")
        [score_file] = folder.glob(f"{dataset}_megaprolong_*_in8192_*.json.score")
        assert by_len["8192"] == json.loads(score_file.read_text())[metric], column
    assert len(results["scores"]) == 4 and "Recall" in results["categories"]

    failed = helmet_cli("--model", tiny_chat_model, "--categories", "recall,rag", *common, env=env)
    assert failed.returncode == 1 and "kilt_nq@8192: no output from HELMET" in failed.stderr
    assert "nq-dev-multikilt_1000_k50_dep6.jsonl" in failed.stderr

    other = second_model(Path(tiny_chat_model), tmp_path)
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    weights = load_file(other / "model.safetensors")
    save_file({k: v + 0.5 * torch.randn_like(v) for k, v in weights.items()}, other / "model.safetensors",
              metadata={"format": "pt"})
    run = helmet_cli("--model", other, "--categories", "recall", *common, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    second = json.loads((out / "results.json").read_text())
    assert second["model"] == os.path.abspath(other) and len(list((out / "output").iterdir())) == 2
    other_folder = next(p for p in (out / "output").iterdir() if p.name.startswith("other_model-"))
    for column, by_len in second["scores"].items():
        dataset, metric = column.removeprefix("helmet:").split(" ")
        [score_file] = other_folder.glob(f"{dataset}_megaprolong_*_in8192_*.json.score")
        assert by_len["8192"] == json.loads(score_file.read_text())[metric], column
