"""Evaluation: task generators (length, answer placement), metrics, the transformers backend end to end,
chunked perplexity, perplexity after training, and run comparison (the HELMET adapter: test_helmet.py)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
FINE = ["niah_single", "niah_multikey", "niah_multivalue", "variable_tracking"]  # haystack of short sentences
ALL = FINE + ["json_kv", "niah_uuid"]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer)


@pytest.fixture(scope="module")
def model_dir(tiny_chat_model):
    return tiny_chat_model


@pytest.fixture(scope="module")
def long_docs(tmp_path_factory, tiny_corpus, tiny_tokenizer):
    """An indexed dataset of 6 documents of >= 2048 tokens (books of the tiny corpus joined)."""
    from megaprolong.data.preprocess import PreprocessConfig, preprocess
    from megaprolong.data.tiny import write_jsonl

    d = tmp_path_factory.mktemp("ppl")
    books = [x["text"] for x in tiny_corpus if x["domain"] == "books"]
    docs = [{"text": "\n\n".join(books[i::6] * 2)} for i in range(6)]
    src = write_jsonl(docs, d / "long.jsonl")
    preprocess(PreprocessConfig(inputs=[str(src)], tokenizer=str(tiny_tokenizer), output_prefix=str(d / "long"),
                                quiet=True))
    return d / "long"


@pytest.mark.parametrize("length", [4096, 8192])
def test_generators_hit_the_target_length_within_2_percent(tokenizer, length):
    from megaprolong.eval.tasks import count_tokens, generate

    for task in ALL:
        for ex in generate(task, length, 3, tokenizer):
            assert 0.98 * length <= ex.tokens <= length, (task, ex.tokens)
            assert ex.tokens == count_tokens(tokenizer, ex.prompt)
    for task in FINE:  # short haystack sentences: 2% even at 1K
        assert all(0.98 * 1024 <= ex.tokens <= 1024 for ex in generate(task, 1024, 2, tokenizer))


def _haystack_fraction(prompt: str, marker: str, start: str, end: str) -> float:
    a, b = prompt.index(start) + len(start), prompt.rindex(end)
    return (prompt.index(marker) - a) / (b - a)


def test_answers_sit_where_the_generators_say(tokenizer):
    from megaprolong.eval.tasks import generate

    for task in ("niah_single", "niah_multikey", "niah_multivalue", "niah_uuid"):
        examples = generate(task, 4096, 5, tokenizer)
        assert [ex.depth for ex in examples] == [0, 0.25, 0.5, 0.75, 1.0]
        for ex in examples:
            key = re.search(r"for (\S+) mentioned in the provided text\?", ex.prompt).group(1)
            needle = f"for {key} is: {ex.answers[0]}."
            assert ex.prompt.count(needle) == 1 and all(a in ex.prompt for a in ex.answers)
            frac = _haystack_fraction(ex.prompt, needle, "afterwards.\n", "\nWhat are all")
            assert abs(frac - ex.depth) < 0.05, (task, frac, ex.depth)
            if task == "niah_multikey":  # three distractor needles with other keys
                assert len(re.findall(r"One of the special magic numbers for (\S+) is", ex.prompt)) == 4
    for ex in generate("json_kv", 4096, 5, tokenizer):
        obj = json.loads(ex.prompt[ex.prompt.index("{"):ex.prompt.index("}") + 1])
        key = re.search(r'Key: "([0-9a-f-]+)"\nCorresponding value:$', ex.prompt).group(1)
        assert obj[key] == ex.answers[0]
        assert abs(list(obj).index(key) / (len(obj) - 1) - ex.depth) < 0.02
    for ex in generate("variable_tracking", 2048, 2, tokenizer):
        value = re.search(r"assigned the value (\d+) in the text above", ex.prompt).group(1)
        chain, name = [], next(n for n in ex.answers if f"VAR {n} = {value}." in ex.prompt)
        while name:
            chain.append(name)
            name = next((n for n in ex.answers if f"VAR {n} = VAR {name}." in ex.prompt), None)
        assert sorted(chain) == sorted(ex.answers) and len(chain) == 5
    a, b = generate("niah_single", 1024, 2, tokenizer), generate("niah_single", 1024, 2, tokenizer)
    assert [x.prompt for x in a] == [x.prompt for x in b]  # fixed seed: the same tasks every run
    assert generate("niah_single", 1024, 2, tokenizer, seed=7)[0].prompt != a[0].prompt


def test_chat_template_wraps_prompts_when_asked(tokenizer, tiny_tokenizer):
    from transformers import AutoTokenizer

    from megaprolong.eval.tasks import generate
    from megaprolong.sft.chat import prepare_tokenizer

    chat_tok = prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_tokenizer))
    ex = generate("niah_single", 1024, 1, chat_tok, use_chat_template=True)[0]
    assert ex.prompt.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")
    assert ex.prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n"
                              + ex.prompt.rsplit("\n\n", 1)[1])
    plain = generate("niah_single", 1024, 1, tokenizer)[0]
    assert "<|start_header_id|>" not in plain.prompt and plain.prompt.startswith("<|begin_of_text|>")


def test_metrics_score_gold_100_and_wrong_0():
    from megaprolong.eval.metrics import recall, substring_exact_match

    gold = "3f2b6c1e-8d4a-4e7b-9c2d-1a5e6f7b8c9d"
    assert substring_exact_match(f' "{gold}".', [gold]) == 100
    assert substring_exact_match("4f2b6c1e-8d4a-4e7b-9c2d-1a5e6f7b8c9d", [gold]) == 0
    assert recall("1234567, 7654321, 1111111 and 2222222", ["1234567", "7654321", "1111111", "2222222"]) == 100
    assert recall("1234567 and 9999999", ["1234567", "7654321"]) == 50
    assert recall("nothing", ["1234567"]) == 0


def test_chunked_nll_equals_one_pass(model_dir):
    from megaprolong.eval.backends import TransformersBackend

    backend = TransformersBackend(str(model_dir))
    ids = torch.randint(0, 400, (700,), generator=torch.Generator().manual_seed(0)).tolist()
    whole = backend.token_nll(ids, chunk=4096)
    with torch.no_grad():
        logits = backend.model(torch.tensor([ids])).logits[0, :-1]
    direct = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").numpy()
    np.testing.assert_allclose(whole, direct, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(backend.token_nll(ids, chunk=128), whole, rtol=1e-4, atol=1e-5)


class _CachelessModel(torch.nn.Module):
    """A model whose forward takes no cache under any name (as transformers' catch-all keyword arguments do
    with a name they do not know)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, input_ids, **unused):
        return self.inner(input_ids)


def test_chunked_nll_refuses_a_model_that_ignores_the_cache(model_dir):
    """Chunks scored without their context would look like a model that forgets: refused, not scored. (The
    cache's keyword under an older transformers: tests/test_oldest_stack.py.)"""
    from megaprolong.eval.backends import TransformersBackend

    backend = TransformersBackend(str(model_dir))
    ids = torch.randint(0, 400, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    backend.model = _CachelessModel(backend.model)
    with pytest.raises(RuntimeError, match="did not use it"):
        backend.token_nll(ids, chunk=128)


def _eval(*args):
    return subprocess.run([sys.executable, "-m", "megaprolong.eval", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


def test_end_to_end_on_a_tiny_model_and_compare(tmp_path, model_dir, long_docs):
    out = _eval("--model", model_dir, "--tasks", "json_kv,niah_single,ppl", "--lengths", "1024,2048",
                "--out", tmp_path / "run", "--samples", 2, "--ppl-data", long_docs, "--ppl-documents", 2)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["scores"]) == {"json_kv", "niah_single"}
    assert set(results["scores"]["json_kv"]) == {"1024", "2048"}
    assert all(0 <= s <= 100 for t in results["scores"].values() for s in t.values())
    buckets = results["ppl"]["2048"]["buckets"]
    assert [(b["start"], b["end"]) for b in buckets] == [(1, 128), (128, 256), (256, 512), (512, 1024), (1024, 2048)]
    preds = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 2 * 2 * 2 and all(p["tokens"] <= p["length"] for p in preds)
    for png in ("scores.png", "ppl.png"):
        assert (tmp_path / "run" / png).read_bytes()[:4] == b"\x89PNG"
    assert "json_kv" in out.stdout and "ppl (loss)" in out.stdout
    # A second run with other lengths, and the comparison of the two.
    assert _eval("--model", model_dir, "--tasks", "niah_single", "--lengths", "1024", "--out", tmp_path / "run",
                 "--samples", 1).returncode == 2  # --out exists
    assert _eval("--model", model_dir, "--tasks", "niah_single", "--lengths", "1024", "--out", tmp_path / "run2",
                 "--samples", 1, "--seed", 3).returncode == 0
    cmp = _eval("compare", tmp_path / "run", tmp_path / "run2")
    assert cmp.returncode == 0, cmp.stderr
    row = next(line for line in cmp.stdout.splitlines() if line.startswith("niah_single") and " 1024 " in line)
    a, b = (json.loads((tmp_path / r / "results.json").read_text())["scores"]["niah_single"]["1024"]
            for r in ("run", "run2"))
    assert row.split()[-1] == f"{b - a:+.1f}"
    bad = _eval("--model", model_dir, "--tasks", "nope", "--lengths", "1024", "--out", tmp_path / "x")
    assert bad.returncode == 2 and "unknown task(s) nope" in bad.stderr


def test_perplexity_falls_after_training_on_the_text(tmp_path, model_dir, long_docs):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoModelForCausalLM

    from megaprolong.eval.backends import TransformersBackend
    from megaprolong.eval.perplexity import perplexity_by_position

    before = perplexity_by_position(TransformersBackend(str(model_dir)), str(long_docs), 1024, documents=3)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ds = IndexedDataset(str(long_docs))
    docs = [torch.tensor(ds.get(i, 0, 1024).astype(np.int64))[None] for i in before["documents"]]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(30):
        ids = docs[step % len(docs)]
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    trained = tmp_path / "trained"
    model.save_pretrained(trained)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / f, trained / f)
    after = perplexity_by_position(TransformersBackend(str(trained)), str(long_docs), 1024, documents=3)
    assert after["documents"] == before["documents"]
    assert after["loss"] < before["loss"] - 0.5
    assert all(a["loss"] < b["loss"] for a, b in zip(after["buckets"], before["buckets"]))


def test_scores_follow_known_answers(tmp_path, model_dir, monkeypatch):
    """The pipeline end to end with a backend whose answers are known: every gold answer on even-numbered
    samples, nothing right on odd ones, and only the first of several values for the multi-value task.
    The scores must be exactly what those answers earn (50, and 25 for one value of four)."""
    from megaprolong.eval import backends
    from megaprolong.eval.run import EvalConfig, run_eval
    from megaprolong.eval.tasks import generate

    real = backends.TransformersBackend(str(model_dir))
    chat = None  # the config's chat_template "auto"
    key = {}
    for task in ("json_kv", "niah_single", "niah_multivalue"):
        for ex in generate(task, 1024, 4, real.tokenizer, 7, chat):
            key[ex.prompt] = (ex.index, ex.answers)

    class AnswerKey:
        tokenizer, max_length = real.tokenizer, real.max_length

        def generate(self, prompt, max_new_tokens):
            index, answers = key[prompt]
            if len(answers) > 1:
                return f"The values are: {answers[0]}."
            return f"The answer is {answers[0]}." if index % 2 == 0 else "I do not know."

    monkeypatch.setattr(backends, "load_backend", lambda *a, **k: AnswerKey())
    results = run_eval(EvalConfig(model=str(model_dir), tasks=["json_kv", "niah_single", "niah_multivalue"],
                                  lengths=[1024], out=str(tmp_path / "run"), samples=4, seed=7), progress=False)
    assert results["scores"] == {"json_kv": {"1024": 50.0}, "niah_single": {"1024": 50.0},
                                 "niah_multivalue": {"1024": 25.0}}
