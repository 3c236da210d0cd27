"""The short-context suite through lm-evaluation-harness, on a tiny random model and local tasks in lm_eval's
own YAML format: the accuracy it reports equals one computed here with transformers by lm_eval's documented
rule; a dataset that cannot be had stops the run naming the task; without lm_eval the command says which
extra to install, and nothing else imports it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

COLORS = ["red", "green", "blue", "yellow", "a very long answer about colors"]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    return d, write_tasks(d)


def write_tasks(d: Path) -> list[dict]:
    """In ``d``: a multiple-choice task (choices of unequal length, so acc and acc_norm favour different ones),
    a generate-until task, their data as local json, and a task whose dataset is on the Hub only. Returns the
    multiple-choice items."""
    d.mkdir(parents=True, exist_ok=True)
    mc = [{"question": f"Question {i}: the colour of object number {i} is", "choices": COLORS, "answer": i % 5}
          for i in range(20)]
    (d / "mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in mc))
    gen = [{"question": f"Repeat the word {w}.", "answer": w} for w in ("yes", "no", "red", "blue")]
    (d / "gen.jsonl").write_text("".join(json.dumps(x) + "\n" for x in gen))
    (d / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    (d / "tiny_gen.yaml").write_text(f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: answer
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    (d / "hub_only.yaml").write_text("""task: hub_only
dataset_path: megaprolong-test/not-on-this-machine
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    return mc


def short(*args, env=None):
    return subprocess.run([sys.executable, "-m", "megaprolong.eval", "short", *map(str, args)], capture_output=True,
                          text=True, timeout=600, cwd=REPO, env={**os.environ, **OFFLINE, **(env or {})})


def by_hand(model_dir: Path, items: list[dict]) -> tuple[float, float, int]:
    """acc and acc_norm as lm_eval defines them, computed with transformers: each choice's log-likelihood as a
    continuation (" " + choice) of the context, context and context + continuation tokenized apart (no special
    tokens), the continuation's tokens being what follows the context's; acc_norm divides by the choice's
    length in characters. Also: on how many items the two pick different choices."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    acc = acc_norm = differ = 0
    for item in items:
        context = item["question"]
        context_ids = tok(context, add_special_tokens=False)["input_ids"]
        lls = []
        for choice in item["choices"]:
            whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
            continuation = whole[len(context_ids):]
            ids = torch.tensor([(context_ids + continuation)[:-1]])
            with torch.no_grad():
                logp = model(ids).logits[0].double().log_softmax(-1)
            positions = range(len(context_ids) - 1, len(context_ids) - 1 + len(continuation))
            lls.append(sum(logp[p, t].item() for p, t in zip(positions, continuation)))
        best = max(range(len(lls)), key=lambda i: lls[i])
        normed = [ll / len(c) for ll, c in zip(lls, item["choices"])]
        best_normed = max(range(len(normed)), key=lambda i: normed[i])
        acc, acc_norm, differ = acc + (best == item["answer"]), acc_norm + (best_normed == item["answer"]), \
            differ + (best != best_normed)
    return acc / len(items), acc_norm / len(items), differ


def test_accuracy_equals_lm_evals_rule_computed_by_hand(tasks, tiny_chat_model, tmp_path):
    d, items = tasks
    out = short("--model", tiny_chat_model, "--out", tmp_path / "short", "--tasks", "tiny_mc,tiny_gen",
                "--include-path", d, "--shots", "tiny_mc=0,tiny_gen=0", "--batch-size", 4, "--device", "cpu",
                "--dtype", "float32")
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "short" / "results.json").read_text())
    mc = results["short"]["tiny_mc"]
    acc, acc_norm, differ = by_hand(Path(tiny_chat_model), items)
    assert mc["metrics"]["acc,none"] == acc and mc["metrics"]["acc_norm,none"] == acc_norm
    assert 0 < acc < 1 and 0 < acc_norm < 1 and differ > 0  # not trivial, and the normalization changes picks
    assert mc["metrics"]["acc_stderr,none"] > 0 and mc["primary"] == "acc_norm,none" and mc["samples"] == 20
    assert "exact_match,none" in results["short"]["tiny_gen"]["metrics"]
    used = results["config"]
    assert used["shots"] == {"tiny_mc": 0, "tiny_gen": 0} and used["batch_size"] == 4 and used["device"] == "cpu"
    assert used["lm_eval_version"] and used["include_path"] == str(d)
    assert (tmp_path / "short" / "short.png").exists()
    table = (tmp_path / "short" / "table.txt").read_text()
    assert f"{100 * acc_norm:.1f}" in table.splitlines()[1] and "acc_norm,none" in table


def test_a_dataset_that_cannot_be_had_is_named_and_nothing_is_written(tasks, tiny_chat_model, tmp_path):
    d, _ = tasks
    out = short("--model", tiny_chat_model, "--out", tmp_path / "short", "--tasks", "tiny_mc,hub_only",
                "--include-path", d, "--device", "cpu")
    lines = [line for line in out.stderr.splitlines() if line.startswith("megaprolong-eval short:")]
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    assert "task hub_only: its dataset cannot be loaded" in lines[0] and "--data-dir" in lines[0]
    assert not list(tmp_path.glob("*short*")), "neither the folder nor its temporary one"


def test_without_lm_eval_the_command_names_the_extra_and_nothing_else_imports_it(tmp_path, tiny_chat_model):
    blocked = tmp_path / "blocked" / "lm_eval"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('lm_eval is not installed here')\n")
    out = short("--model", tiny_chat_model, "--out", tmp_path / "x", env={"PYTHONPATH": str(blocked.parent)})
    assert out.returncode == 2 and "pip install -e '.[lmeval]'" in out.stderr, out.stderr[-2000:]
    probe = subprocess.run([sys.executable, "-c", "import sys, megaprolong.eval.cli, megaprolong.eval.run, "
                            "megaprolong.eval.report, megaprolong.eval.helmet, megaprolong.eval.short, megaprolong.train; "
                            "print('lm_eval' in sys.modules)"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert probe.stdout.strip() == "False", probe.stderr[-2000:]
