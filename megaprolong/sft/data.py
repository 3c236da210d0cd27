"""SFT data: chat conversations (jsonl, parquet, a saved HF dataset) or ProLong's tokenized MDS shards,
turned into packed sequences with per-conversation boundaries.

A packed row is ``{"input_ids", "labels", "seq_lengths"}``; TRL's padding-free collator turns
``seq_lengths`` into position ids that restart per conversation, which is what makes transformers'
attention block-diagonal (flash-attn varlen on GPU, the masked sdpa path on CPU).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megaprolong.data.mds import read_mds, split_documents
from megaprolong.data.readers import DataError, read_records
from megaprolong.sft.chat import IGNORE, ConversationError, check_messages, tokenize_conversation
from megaprolong.sft.config import SFTConfig


@dataclass
class Conversation:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss


@dataclass
class DataReport:
    conversations: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    truncated: int = 0
    sequences: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    split: str | None = None  # the split of a folder of several that was read

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({**self.__dict__, "skipped": dict(self.skipped)}, indent=2))

    @classmethod
    def load(cls, path: Path) -> DataReport:
        data = json.loads(path.read_text())
        return cls(**{**data, "skipped": Counter(data["skipped"])})

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        split = f"split {self.split}: " if self.split else ""
        return (f"{split}{self.conversations} conversations -> {self.sequences} packed sequences, {self.tokens:,} tokens "
                f"({self.trained_tokens:,} trained); skipped: {skipped}; truncated: {self.truncated}")


CHAT_SUFFIXES = (".jsonl", ".json", ".parquet", ".gz", ".zst")
# A split's name: HF's shard files (SPLIT-00000-of-00003-HASH.parquet), a folder per split, or SPLIT.jsonl
_SHARD = re.compile(r"^(?P<split>[^-.]+)-\d{5}-of-\d{5}")
_SPLIT_WORD = re.compile(r"^(train|test|validation|valid|val|dev|eval)([_-]\w+)?$")
PREFERRED_SPLITS = ("train_sft", "train")  # UltraChat's SFT split, then the usual training split


def split_of(file: Path, root: Path) -> str | None:
    """The split a chat file of folder ``root`` belongs to (None: a plain part of the data)."""
    shard = _SHARD.match(file.name)
    rel = file.relative_to(root).parts
    for name in (shard["split"] if shard else None, rel[0] if len(rel) > 1 else None, file.name.split(".")[0]):
        if name and _SPLIT_WORD.match(name):
            return name
    return None


def choose_split(splits: list[str], wanted: str | None, where: str) -> str | None:
    """The split to train on among ``splits`` (``data.split`` if named, else the only one, else UltraChat's
    train_sft or a plain train); a folder of several splits without one of those is refused."""
    if wanted:
        if wanted not in splits:
            raise DataError(where, f"data.split={wanted!r}: no such split here (found: {', '.join(splits) or 'none'})")
        return wanted
    if len(splits) <= 1:
        return splits[0] if splits else None
    for name in PREFERRED_SPLITS:
        if name in splits:
            return name
    raise DataError(where, f"holds several splits ({', '.join(splits)}): name the one to train on with data.split")


def chat_files(path: str | Path, split: str | None = None) -> tuple[list[Path], str | None]:
    """The chat files to read under ``path`` (a file, or a folder) and the split they are (None: no splits).
    A folder holding several splits (UltraChat's data/ has train_sft, test_sft, train_gen, test_gen) gives
    one split's files only: never test data by accident."""
    path = Path(path)
    if not path.is_dir():
        return [path], None
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in CHAT_SUFFIXES)
    by_split: dict[str | None, list[Path]] = {}
    for f in files:
        by_split.setdefault(split_of(f, path), []).append(f)
    chosen = choose_split(sorted(s for s in by_split if s is not None), split, str(path))
    if chosen is None:
        return files, None
    return by_split[chosen], chosen


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists())


def _saved_dataset(path: Path, split: str | None):
    """A folder written by ``datasets`` ``save_to_disk`` (one Dataset, or a DatasetDict of splits)."""
    import datasets

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        name = choose_split(sorted(data), split, str(path))
        return data[name], name
    return data, None


def read_conversations(path: str | Path, tokenizer: Any, messages_key: str = "messages", strict: bool = False,
                       report: DataReport | None = None, split: str | None = None) -> Iterator[Conversation]:
    """Tokenized conversations from chat data in the HF ``messages`` layout: a jsonl/parquet file, a folder
    of them, or a folder written by ``datasets`` ``save_to_disk``; of a folder holding several splits, one
    (:func:`chat_files`). Bad records are counted in ``report.skipped`` by reason, or raise
    :class:`DataError` (file:line) with ``strict``."""
    path = Path(path)
    report = report if report is not None else DataReport()
    if not path.exists():
        raise DataError(str(path), "SFT data does not exist")
    if is_saved_dataset(path):
        data, report.split = _saved_dataset(path, split)
        records: Iterator = ((f"{path}:row {i}", r) for i, r in enumerate(data))
    else:
        files, report.split = chat_files(path, split)
        records = (record for f in files for record in read_records(f))
    for where, record in records:
        try:
            if isinstance(record, DataError):
                raise ConversationError("malformed", record.what)
            if messages_key not in record:
                raise ConversationError("malformed", f"no {messages_key!r} field")
            messages = check_messages(record[messages_key])
        except ConversationError as e:
            if strict:
                raise DataError(where, str(e)) from None
            report.skipped[e.reason] += 1
            continue
        ids, labels = tokenize_conversation(tokenizer, messages)
        report.conversations += 1
        yield Conversation(ids, labels)


def read_mds_conversations(path: str | Path, report: DataReport | None = None) -> Iterator[Conversation]:
    """ProLong's tokenized SFT shards (``prolong-ultrachat-64K``: ``input_ids``, ``indices``, ``mask`` with 1
    on trained tokens), split back into conversations without re-tokenizing."""
    report = report if report is not None else DataReport()
    for where, sample in read_mds(path):
        mask = sample.get("mask")
        if mask is None:
            raise DataError(where, "MDS sample has no mask column (expected ProLong's SFT layout)")
        if len(mask) != len(sample["input_ids"]):
            raise DataError(where, f"mask has {len(mask)} entries for {len(sample['input_ids'])} tokens")
        # Split token ids and mask together: rows of (id, mask) cut at the sample's document bounds.
        columns = dict(sample, input_ids=np.stack([sample["input_ids"].astype(np.int64), mask.astype(np.int64)], 1))
        for rows in split_documents(where, columns):
            ids, trained = rows[:, 0], rows[:, 1] != 0
            report.conversations += 1
            yield Conversation(ids.tolist(), np.where(trained, ids, IGNORE).tolist())


def truncate(conv: Conversation, seq_length: int, report: DataReport) -> Conversation | None:
    """``conv`` cut to ``seq_length`` tokens (counted), or None when no trained token is left (counted)."""
    if len(conv.input_ids) > seq_length:
        report.truncated += 1
        conv = Conversation(conv.input_ids[:seq_length], conv.labels[:seq_length])
    if all(label == IGNORE for label in conv.labels[1:]):  # a conversation's first token is never a target
        report.skipped["no trained tokens after truncation"] += 1
        return None
    return conv


def plan_packing(lengths: list[int] | np.ndarray, seq_length: int) -> list[list[int]]:
    """Greedy packing in the given order: a conversation that does not fit in what is left of the current
    sequence starts the next one. Returns the conversation indices of each sequence."""
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if n > seq_length:
            raise ValueError(f"conversation {i} has {n} tokens > seq_length {seq_length}: truncate first")
        if used + n > seq_length:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        groups.append(current)
    return groups


def _packed_rows(arrays: str, groups: list[list[int]]) -> Iterator[dict]:
    """The rows ``{"input_ids", "labels", "seq_lengths"}`` of a packing plan over the flat arrays saved in
    folder ``arrays`` (ids.npy, labels.npy, offsets.npy; memory-mapped)."""
    ids, labels, offsets = (np.load(Path(arrays) / f"{n}.npy", mmap_mode="r") for n in ("ids", "labels", "offsets"))
    for group in groups:
        spans = [(int(offsets[i]), int(offsets[i + 1])) for i in group]
        yield {"input_ids": np.concatenate([ids[a:b] for a, b in spans]).tolist(),
               "labels": np.concatenate([labels[a:b] for a, b in spans]).tolist(),
               "seq_lengths": [b - a for a, b in spans]}


def _source_fingerprint(cfg: SFTConfig, tokenizer: Any) -> str:
    """A key of everything the packed data depends on: input files (size, mtime), settings, tokenizer."""
    source = Path(cfg.data.mds or cfg.data.path)
    files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    key = {"files": [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files],
           "split": cfg.data.split, "mds": bool(cfg.data.mds), "messages_key": cfg.data.messages_key,
           "seq_length": cfg.train.seq_length,
           "seed": cfg.train.seed, "vocab": hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest(),
           "template": tokenizer.chat_template, "version": 2}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def build_sft_dataset(cfg: SFTConfig, tokenizer: Any, cache_root: str | Path, progress: bool = True):
    """The packed training rows as a ``datasets.Dataset`` (memory-mapped Arrow, cached under ``cache_root``
    by a key of the inputs and settings) and its :class:`DataReport`. Conversations are shuffled with
    ``train.seed`` and packed greedily into ``train.seq_length`` tokens. Call on one process first (the
    others then load the cache)."""
    import datasets
    from tqdm import tqdm

    cache_root = Path(cache_root)
    final = cache_root / _source_fingerprint(cfg, tokenizer)
    if (final / "report.json").exists():
        return datasets.load_from_disk(str(final / "packed")), DataReport.load(final / "report.json")
    report = DataReport()
    source = read_mds_conversations(cfg.data.mds, report) if cfg.data.mds else read_conversations(
        cfg.data.path, tokenizer, cfg.data.messages_key, cfg.data.strict, report, cfg.data.split)
    ids, labels, lengths = [], [], []
    for conv in tqdm(source, desc="tokenizing conversations", unit=" conv", disable=not progress, mininterval=2):
        conv = truncate(conv, cfg.train.seq_length, report)
        if conv is not None:
            ids.append(np.asarray(conv.input_ids, np.int32))
            labels.append(np.asarray(conv.labels, np.int32))
            lengths.append(len(conv.input_ids))
    if not lengths:
        raise DataError(str(cfg.data.mds or cfg.data.path), f"no trainable conversations ({report.summary()})")
    tmp = cache_root / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "arrays").mkdir(parents=True)
    np.save(tmp / "arrays" / "ids.npy", np.concatenate(ids))
    np.save(tmp / "arrays" / "labels.npy", np.concatenate(labels))
    np.save(tmp / "arrays" / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    order = np.random.default_rng(cfg.train.seed).permutation(len(lengths))
    groups = [[int(order[j]) for j in g] for g in plan_packing(np.asarray(lengths)[order], cfg.train.seq_length)]
    packed = datasets.Dataset.from_generator(_packed_rows, gen_kwargs={"arrays": str(tmp / "arrays"), "groups": groups},
                                             cache_dir=str(tmp / "hf_cache"))
    packed.save_to_disk(str(tmp / "packed"))
    report.sequences = len(groups)
    report.tokens = int(sum(lengths))
    report.trained_tokens = int(sum(int((l[1:] != IGNORE).sum()) for l in labels))
    report.save(tmp / "report.json")
    shutil.rmtree(tmp / "arrays")
    shutil.rmtree(tmp / "hf_cache", ignore_errors=True)
    try:
        tmp.rename(final)
    except OSError:  # another job published the same data first
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(final / "packed")), report
