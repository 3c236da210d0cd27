"""Raw text to a Megatron indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``), one sequence per document.

Streaming: documents are read, tokenized in batches and appended to the output, so memory stays bounded
whatever the input size (``--group-by`` holds one group's text per key until the end, by its nature).
Atomic: everything is written under temporary names and renamed at the end, ``.idx`` last, so an
interrupted run never leaves a pair that opens as a dataset. Inputs are only read.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megaprolong.data.readers import DataError, read_records

BATCH_DOCS = 512


@dataclass
class PreprocessConfig:
    inputs: list[str]
    tokenizer: str
    output_prefix: str
    text_key: str = "text"
    add_bos: bool = False
    add_eos: bool = False
    min_tokens: int = 0
    group_by: str | None = None
    group_separator: str = "\n\n"
    workers: int = 1
    skip_bad: bool = False
    quiet: bool = False


@dataclass
class Stats:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer.json of an HF tokenizer directory (or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise DataError(str(path), "tokenizer not found (expected an HF tokenizer directory or tokenizer.json)")
    return p


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_file(path)))


def _special_id(tok, names: tuple[str, ...]) -> int:
    for name in names:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    raise DataError("tokenizer", f"has none of the special tokens {names}")


def _texts(cfg: PreprocessConfig, stats: Stats) -> Iterator[tuple[str, str]]:
    """(where, text) of every document, in input order; grouped documents joined per key."""
    groups: dict[str, list[str]] = {}
    for path in cfg.inputs:
        for where, rec in read_records(path):
            if isinstance(rec, DataError):
                if not cfg.skip_bad:
                    raise rec
                stats.drop("bad_record")
                continue
            text = rec.get(cfg.text_key)
            if not isinstance(text, str):
                err = DataError(where, f"missing text key {cfg.text_key!r}" if text is None
                                else f"{cfg.text_key!r} is {type(text).__name__}, expected a string")
                if not cfg.skip_bad:
                    raise err
                stats.drop("bad_record")
                continue
            if cfg.group_by is None:
                yield where, text
            else:
                key = rec.get(cfg.group_by)
                if key is None:
                    err = DataError(where, f"missing group key {cfg.group_by!r}")
                    if not cfg.skip_bad:
                        raise err
                    stats.drop("bad_record")
                    continue
                groups.setdefault(str(key), []).append(text)
    for key, texts in groups.items():  # dicts keep first-appearance order: stable
        yield f"group {key}", cfg.group_separator.join(texts)


def _batches(it: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in it:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def preprocess(cfg: PreprocessConfig) -> dict:
    """Tokenize ``cfg.inputs`` into ``cfg.output_prefix``.{bin,idx,json}; returns the stats written."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, cfg.workers)))
    start = time.time()
    tok = load_tokenizer(cfg.tokenizer)
    bos = _special_id(tok, ("<|begin_of_text|>", "<s>", "<bos>")) if cfg.add_bos else None
    eos = _special_id(tok, ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")) if cfg.add_eos else None
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = DType.optimal_dtype(vocab)

    prefix = Path(cfg.output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(f".{prefix.name}.tmp{os.getpid()}")
    stats = Stats()
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
    bar = tqdm(disable=cfg.quiet, unit=" docs", file=sys.stderr, desc=f"preprocess {prefix.name}")
    try:
        for batch in _batches(_texts(cfg, stats), BATCH_DOCS):
            encodings = tok.encode_batch([text for _, text in batch], add_special_tokens=False)
            for (_, text), enc in zip(batch, encodings):
                ids = enc.ids
                if bos is not None:
                    ids = [bos] + ids
                if eos is not None:
                    ids = ids + [eos]
                if len(ids) < max(cfg.min_tokens, 1):
                    stats.drop("empty" if not ids else "min_tokens")
                    continue
                builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
                stats.documents += 1
                stats.tokens += len(ids)
                stats.bytes += len(text.encode("utf-8"))
            elapsed = max(time.time() - start, 1e-9)
            bar.update(len(batch))
            bar.set_postfix_str(f"{stats.tokens / elapsed:,.0f} tok/s, {stats.bytes / elapsed / 1e6:.1f} MB/s")
        builder.finalize(f"{tmp}.idx")
        report = {
            "documents": stats.documents,
            "tokens": stats.tokens,
            "dropped": stats.dropped,
            "tokenizer": str(tokenizer_file(cfg.tokenizer)),
            "tokenizer_sha256": hashlib.sha256(tokenizer_file(cfg.tokenizer).read_bytes()).hexdigest(),
            "vocab_size": vocab,
            "dtype": np.dtype(dtype).name,
            "inputs": [str(p) for p in cfg.inputs],
            "settings": {k: v for k, v in vars(cfg).items() if k not in ("inputs", "tokenizer", "output_prefix")},
            "elapsed_s": round(time.time() - start, 3),
        }
        Path(f"{tmp}.json").write_text(json.dumps(report, indent=2) + "\n")
        # .idx last: until it is in place, no (old or new) pair under PREFIX opens as a dataset
        Path(f"{prefix}.idx").unlink(missing_ok=True)
        os.replace(f"{tmp}.bin", f"{prefix}.bin")
        os.replace(f"{tmp}.json", f"{prefix}.json")
        os.replace(f"{tmp}.idx", f"{prefix}.idx")
        return report
    finally:
        bar.close()
        for suffix in (".bin", ".idx", ".json"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
