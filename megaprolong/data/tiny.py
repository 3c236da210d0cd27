"""Tiny, deterministic assets for the demo and the tests: a multi-domain corpus and a BPE tokenizer.

Nothing can be downloaded here, so the end-to-end pipeline runs on text generated from a seed: documents
with learnable structure (so a tiny model's loss visibly falls) in three domains with uneven lengths, and
a byte-level BPE tokenizer trained on them with HF ``tokenizers`` (Llama-3 style special tokens).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megaprolong.runtime.files import replace_text

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
# Llama-3's chat tokens, so the SFT stage's chat template works on the tiny tokenizer as on the real one.
CHAT_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
_SUBJECTS = ["the model", "a reader", "the long context", "every document", "our cluster", "the optimizer",
             "a packed sequence", "the tokenizer", "each rank", "the checkpoint"]
_VERBS = ["reads", "packs", "trains", "remembers", "splits", "gathers", "saves", "loads", "masks", "averages"]
_OBJECTS = ["the tokens", "a book", "the gradients", "every boundary", "the schedule", "a repository",
            "the attention", "its shards", "the loss", "a long story"]
_NAMES = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


def _prose(rng: random.Random, sentences: int) -> str:
    return " ".join(f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
                    for _ in range(sentences))


def _code(rng: random.Random, functions: int) -> str:
    out = []
    for _ in range(functions):
        name, arg = rng.choice(_NAMES), rng.choice(_NAMES)
        out.append(f"def {name}_{rng.randint(0, 9)}({arg}):\n    return {arg} + {rng.randint(1, 99)}\n")
    return "\n".join(out)


def synthetic_corpus(n_docs: int = 400, seed: int = 0) -> list[dict]:
    """Documents ``{"text", "domain", "repo"}`` in domains books (long), code (grouped by repo), web (short)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        kind = rng.choices(["books", "code", "web"], weights=[2, 3, 5])[0]
        if kind == "books":
            text = _prose(rng, rng.randint(40, 120))
        elif kind == "code":
            text = _code(rng, rng.randint(2, 12))
        else:
            text = _prose(rng, rng.randint(1, 12))
        docs.append({"text": text, "domain": kind, "repo": f"repo{rng.randint(0, 19)}" if kind == "code" else ""})
    return docs


def synthetic_chats(n: int = 200, seed: int = 0) -> list[dict]:
    """Conversations in UltraChat's layout (``{"prompt", "messages": [{"role", "content"}, ...]}``) whose
    answers follow from the questions, so a tiny model's SFT loss visibly falls."""
    rng = random.Random(seed)
    chats = []
    for i in range(n):
        messages = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            subject, obj = rng.choice(_SUBJECTS), rng.choice(_OBJECTS)
            verb = rng.choice(_VERBS)
            messages.append({"role": "user", "content": f"What does {subject} do with {obj}?"})
            messages.append({"role": "assistant", "content": f"{subject.capitalize()} {verb} {obj}."})
        chats.append({"prompt": messages[-2]["content"], "prompt_id": f"chat{i}", "messages": messages})
    return chats


def write_jsonl(docs: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_text(path, "".join(json.dumps(d) + "\n" for d in docs))
    return path


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 512) -> Path:
    """A byte-level BPE tokenizer (``out_dir/tokenizer.json``) trained on ``texts``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, *CHAT_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.json"
    tmp = out_dir / "tokenizer.json.tmp"
    tok.save(str(tmp))
    tmp.replace(path)
    # What transformers' AutoTokenizer needs to know the special tokens (as in Llama-3's own directory).
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
              "model_max_length": 1 << 20, "clean_up_tokenization_spaces": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return path


def prepare_tiny_data(root: str | Path) -> Path:
    """The tiny recipes' data, built on first use and cached: corpus, tokenizer, and one indexed dataset
    per domain (books, code grouped by repository, web) under ``root``."""
    from megaprolong.data.preprocess import PreprocessConfig, preprocess

    root = Path(root)
    if all((root / f"{d}.idx").exists() for d in ("books", "code", "web")):
        return root
    docs = synthetic_corpus(n_docs=600, seed=0)
    tok = train_tokenizer([d["text"] for d in docs], root / "tokenizer", vocab_size=512)
    for domain in ("books", "code", "web"):
        src = write_jsonl([d for d in docs if d["domain"] == domain], root / "raw" / f"{domain}.jsonl")
        preprocess(PreprocessConfig(inputs=[str(src)], tokenizer=str(tok.parent), output_prefix=str(root / domain),
                                    add_eos=True, quiet=True, group_by="repo" if domain == "code" else None))
    return root
