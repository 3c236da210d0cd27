"""Recall test files in the layout and fields HELMET's data.py reads (data/ruler/<task>/validation_<L>.jsonl,
data/json_kv/test_k<N>_dep6.jsonl), generated locally: short haystacks and values that are common words or
rare ones, so that a tiny random model's output contains some answers (scores neither all 0 nor all 100)."""

from __future__ import annotations

import json
import random
from pathlib import Path

RULER = {"ruler_niah_mk_2": "niah_multikey_2", "ruler_niah_mk_3": "niah_multikey_3",
         "ruler_niah_mv": "niah_multivalue"}
JSON_KV_FILES = {8192: "test_k105_dep6.jsonl", 16384: "test_k220_dep6.jsonl"}


def _values(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(["1", "7", "42", "the", "and", "of", "zebra", "quartz"]) for _ in range(n)]


def write_recall_data(helmet_dir: Path, length: int, samples: int = 4, seed: int = 0) -> None:
    rng = random.Random(seed)
    for dataset, folder in RULER.items():
        path = helmet_dir / "data" / "ruler" / folder / f"validation_{length}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for i in range(samples):
                values = _values(rng, 2 if dataset == "ruler_niah_mv" else 1)
                needles = " ".join(f"One of the special magic numbers for item{i} is: {v}." for v in values)
                context = f"The grass is green. {needles} The sky is blue."
                f.write(json.dumps({"index": i, "context": context, "query": f"item{i}", "type_needle_v": "numbers",
                                    "outputs": values, "length": length}) + "\n")
    path = helmet_dir / "data" / "json_kv" / JSON_KV_FILES[length]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(samples):
            pairs = {f"item{i}{j}": _values(rng, 1)[0] for j in range(3)}
            key = rng.choice(sorted(pairs))
            f.write(json.dumps({"context": "JSON data:\n" + json.dumps(pairs), "question": key, "answer": pairs[key],
                                "demos": [["item0", "7"], ["item1", "of"]], "num_kvs": len(pairs)}) + "\n")
