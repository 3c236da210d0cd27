"""`megaprolong-eval report`: ProLong's table from the results each tool writes, the averages computed here by
hand. Inputs in the tools' own formats: HELMET's output files collected by the adapter (as `megaprolong-eval
helmet` writes results.json), the short suite's results.json, and our own tasks' results.json."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_helmet import ALL_CATEGORIES

REPO = Path(__file__).resolve().parent.parent
LENGTHS = (32768, 65536, 131072)


def helmet_results(folder: Path, offset: float, drop: set[str] = frozenset(), drop_at: dict | None = None) -> Path:
    """HELMET's raw output files for every dataset at the three lengths (values = the table's + offset, + 1
    per longer length), collected and written by the adapter; ``drop``: datasets without output,
    ``drop_at``: {dataset: length} outputs missing at one length."""
    from megaprolong.eval.helmet import Entry, collect, results_dict

    out = folder / "helmet" / "output"
    out.mkdir(parents=True)
    entries = []
    for dataset, (test_file, suffix, values) in ALL_CATEGORIES.items():
        for i, n in enumerate(LENGTHS):
            if dataset in drop or (drop_at or {}).get(dataset) == n:
                continue
            args = {"datasets": dataset, "test_files": test_file, "input_max_length": str(n),
                    "generation_max_length": "20", "tag": "megaprolong", "max_test_samples": 100, "shots": 2,
                    "use_chat_template": False}
            base = (f"{dataset}_megaprolong_{Path(test_file).stem if test_file else ''}_in{n}_size100_shots2_"
                    f"sampFalsemax20min0t0.0p1.0_chatFalse_42")
            raw = {m: v + offset + i if not m.startswith("gpt-4") else v for m, v in values.items()}
            (out / (base + suffix)).write_text(json.dumps(raw if suffix != "-gpt4eval_o.json"
                                                          else {"averaged_metrics": raw}))
            entries.append(Entry("all", args))
    found = collect(entries, out)
    (folder / "helmet" / "results.json").write_text(json.dumps(results_dict(found, "model", bool(found.missing))))
    return folder


def short_results(folder: Path, accs: dict[str, float]) -> None:
    """The short suite's results.json (lm_eval's metric names), as megaprolong-eval short writes it."""
    from megaprolong.eval.short import PRIMARY_METRIC, _write

    short = {}
    for task, value in accs.items():
        metric = PRIMARY_METRIC[task]
        short[task] = {"metrics": {metric: value, metric.replace(",", "_stderr,", 1): 0.01}, "primary": metric,
                       "num_fewshot": 5, "samples": 100}
    _write(folder / "short", {"model": str(folder), "suite": "short", "backend": "hf", "config": {}, "short": short,
                              "scores": {}, "ppl": {}, "seconds": 1.0}, force=False)


def category_means(offset: float, drop: set = frozenset(), drop_at: dict | None = None) -> dict[str, float]:
    """By hand: HELMET's arithmetic per length (gpt-4-score x 100/3, gpt-4-f1 x 100, a category only with all
    its columns), then the mean over the lengths a category has."""
    columns = {"Recall": [("json_kv", "substring_exact_match"), ("ruler_niah_mk_2", "ruler_recall"),
                          ("ruler_niah_mk_3", "ruler_recall"), ("ruler_niah_mv", "ruler_recall")],
               "RAG": [("kilt_nq", "substring_exact_match"), ("kilt_triviaqa", "substring_exact_match"),
                       ("kilt_hotpotqa", "substring_exact_match"), ("kilt_popqa_3", "substring_exact_match")],
               "Re-rank": [("msmarco_rerank_psg", "NDCG@10")],
               "Cite": [("alce_asqa_30", m) for m in ("str_em", "citation_rec", "citation_prec")] +
                       [("alce_qampari_30", m) for m in ("qampari_rec_top5", "citation_rec", "citation_prec")],
               "LongQA": [("narrativeqa_7892", "gpt-4-score"), ("infbench_qa_eng_7982", "rougeL_f1"),
                          ("infbench_choice_eng_7982", "exact_match")],
               "Summ": [("infbench_sum_eng_6792", "gpt-4-f1"), ("multi_lexsum_7492", "gpt-4-f1")],
               "ICL": [(d, "exact_match") for d in ("icl_trec_coarse_400shot_balance", "icl_trec_fine_400shot_balance",
                                                    "icl_banking77_360shot_balance", "icl_clinic150_440shot_balance",
                                                    "icl_nlu_510shot_balance")]}
    scale = {"gpt-4-score": 100 / 3, "gpt-4-f1": 100}
    means = {}
    for category, cols in columns.items():
        per_length = []
        for i, n in enumerate(LENGTHS):
            if any(d in drop or (drop_at or {}).get(d) == n for d, _ in cols):
                continue
            vals = [ALL_CATEGORIES[d][2][m] * scale[m] if m in scale else ALL_CATEGORIES[d][2][m] + offset + i
                    for d, m in cols]
            per_length.append(sum(vals) / len(vals))
        if per_length:
            means[category] = sum(per_length) / len(per_length)
    return means


def test_report_averages_helmet_over_lengths_and_the_short_tasks_and_marks_what_is_missing(tmp_path):
    from megaprolong.eval.report import report, text

    a = helmet_results(tmp_path / "prolong", offset=2.0)
    short_results(a, {"hellaswag": 0.80, "mmlu": 0.65, "arc_challenge": 0.55, "winogrande": 0.75, "gsm8k": 0.50})
    b = helmet_results(tmp_path / "other", offset=0.0, drop={"multi_lexsum_7492"},
                       drop_at={"infbench_qa_eng_7982": 131072})
    short_results(b, {"hellaswag": 0.78, "mmlu": 0.60, "arc_challenge": 0.50, "winogrande": 0.70})  # no gsm8k
    base = tmp_path / "base"
    from megaprolong.eval.run import _write

    _write(base / "long", {"model": "base", "backend": "transformers", "config": {}, "ppl": {}, "seconds": 1.0,
                           "scores": {"json_kv": {"32768": 40.0, "65536": 30.0, "131072": 20.0},
                                      "niah_multikey": {"32768": 60.0, "65536": 50.0}}}, [], force=False)
    rep = report([a, b], base=base)
    rows = {r["model"]: r for r in rep["rows"]}
    want_a, want_b = category_means(2.0), category_means(0.0, {"multi_lexsum_7492"}, {"infbench_qa_eng_7982": 131072})
    cells_a, cells_b = rows["prolong"]["cells"], rows["other"]["cells"]
    for category, value in want_a.items():
        assert cells_a[category].value == pytest.approx(value) and not cells_a[category].partial
    assert cells_a["HELMET avg"].value == pytest.approx(sum(want_a.values()) / 7)
    assert cells_a["short avg"].value == pytest.approx(100 * (0.80 + 0.65 + 0.55 + 0.75 + 0.50) / 5)
    # model B: Summ missing (a dataset with no output), LongQA from 2 of 3 lengths, no gsm8k
    assert cells_b["Summ"].value is None and cells_b["Summ"].text() == "-"
    assert cells_b["LongQA"].value == pytest.approx(want_b["LongQA"]) and cells_b["LongQA"].partial
    assert cells_b["HELMET avg"].value == pytest.approx(sum(want_b.values()) / 6) and cells_b["HELMET avg"].partial
    assert cells_b["gsm8k"].value is None and cells_b["short avg"].partial
    assert cells_b["short avg"].value == pytest.approx(100 * (0.78 + 0.60 + 0.50 + 0.70) / 4)
    # the base ran only our recall tasks: Recall from them (marked), the rest missing; differences where both exist
    base_recall = ((40 + 30 + 20) / 3 + (60 + 50) / 2) / 2
    assert rep["base"]["cells"]["Recall"].value == pytest.approx(base_recall)
    assert rep["base"]["cells"]["Recall"].text().endswith("~*")  # partial (niah_multikey lacks 128K), ours
    assert rows["prolong"]["vs_base"]["Recall"] == pytest.approx(want_a["Recall"] - base_recall)
    assert rows["prolong"]["vs_base"]["RAG"] is None
    table = text(rep)
    assert "LongQA" in table.splitlines()[1] and f"{want_b['LongQA']:.1f}~" in table and "  vs base" in table


def test_report_command_writes_its_table(tmp_path):
    a = helmet_results(tmp_path / "prolong", offset=2.0)
    short_results(a, {"hellaswag": 0.80, "mmlu": 0.65, "arc_challenge": 0.55, "winogrande": 0.75, "gsm8k": 0.50})
    out = subprocess.run([sys.executable, "-m", "megaprolong.eval", "report", str(a), "--out", str(tmp_path / "rep")],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert {p.name for p in (tmp_path / "rep").iterdir()} == {"report.json", "report.txt", "report.png"}
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert saved["rows"][0]["cells"]["short avg"]["value"] == pytest.approx(65.0)
    missing = subprocess.run([sys.executable, "-m", "megaprolong.eval", "report", str(tmp_path / "none")],
                             capture_output=True, text=True, timeout=120, cwd=REPO)
    assert missing.returncode == 2 and "no results.json" in missing.stderr
