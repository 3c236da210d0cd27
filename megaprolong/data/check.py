"""Start-up checks of a recipe's files: every problem named (file and what was expected) before any
process group or model is built, so that a bad path costs a second, not a multi-node allocation.

An indexed dataset is ``PREFIX.idx`` + ``PREFIX.bin`` (megatron-core's format). The ``.idx`` holds a
header (the 9-byte magic ``MMIDIDX\\x00\\x00``, ``<Q`` version 1, ``<B`` dtype code, ``<Q`` sequence count
``S``, ``<Q`` document count ``D``), then ``S`` int32 sequence lengths, ``S`` int64 byte pointers into the
``.bin`` and ``D`` int64 document indices (plus ``S`` int8 modes in multimodal datasets). The ``.bin``
holds the tokens: its size is the last pointer plus the last length times the token size.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8
TOKEN_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron-core's dtype codes -> bytes


def check_indexed(prefix: str | Path) -> list[str]:
    """Problems of the indexed dataset ``prefix`` (empty when it is readable and consistent)."""
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    missing = [p for p in (idx, bin_) if not p.is_file()]
    if len(missing) == 2:
        return [f"{prefix}: no indexed dataset there ({idx.name} and {bin_.name} not found)"]
    if missing:
        return [f"{missing[0]}: not found (an indexed dataset is PREFIX.idx + PREFIX.bin)"]
    size = idx.stat().st_size
    if size < HEADER_BYTES:
        return [f"{idx}: {size} bytes, shorter than the {HEADER_BYTES}-byte header of a megatron index"]
    with open(idx, "rb") as f:
        magic, (version,), (code,), (seqs,), (docs,) = (f.read(9), struct.unpack("<Q", f.read(8)),
                                                        struct.unpack("<B", f.read(1)), struct.unpack("<Q", f.read(8)),
                                                        struct.unpack("<Q", f.read(8)))
    if magic != MAGIC:
        return [f"{idx}: not a megatron index (magic {magic!r}, expected {MAGIC!r})"]
    if version != 1:
        return [f"{idx}: index version {version}, expected 1"]
    if code not in TOKEN_BYTES:
        return [f"{idx}: dtype code {code}, expected one of {sorted(TOKEN_BYTES)}"]
    expected = HEADER_BYTES + 12 * seqs + 8 * docs
    if size not in (expected, expected + seqs):
        return [f"{idx}: {size:,} bytes, expected {expected:,} for its {seqs:,} sequences and {docs:,} document "
                f"indices (truncated or not an index?)"]
    if seqs == 0:
        return []
    table = np.memmap(idx, mode="r", dtype=np.uint8)
    last_length = int(table[HEADER_BYTES + 4 * (seqs - 1):HEADER_BYTES + 4 * seqs].view(np.int32)[0])
    last_pointer = int(table[HEADER_BYTES + 4 * seqs + 8 * (seqs - 1):HEADER_BYTES + 12 * seqs].view(np.int64)[0])
    want = last_pointer + last_length * TOKEN_BYTES[code]
    have = bin_.stat().st_size
    if have != want:
        return [f"{bin_}: {have:,} bytes, expected {want:,} as its index {idx.name} describes "
                f"({'truncated' if have < want else 'longer than indexed'})"]
    return []


def check_checkpoint_path(key: str, path: str) -> list[str]:
    """``checkpoint.load`` / ``checkpoint.resume``: a step_N checkpoint, or a run's folder holding some."""
    p = Path(path)
    if not p.exists():
        return [f"{key}={path}: not found"]
    if (p / "megaprolong.json").is_file() or any(p.glob("step_*/megaprolong.json")):
        return []
    return [f"{key}={path}: neither a checkpoint (no megaprolong.json) nor a folder of step_N checkpoints"]


def check_writable_dir(key: str, path: str) -> list[str]:
    """A folder that will be created if needed: its nearest existing ancestor must be a writable folder."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return [f"{key}={path}: {p} is not a folder"]
    if not os.access(p, os.W_OK):
        return [f"{key}={path}: {p} is not writable"]
    return []


def index_lengths(prefix: str | Path) -> np.ndarray:
    """The sequence (document) lengths of an indexed dataset that :func:`check_indexed` accepted, read from
    its ``.idx`` without loading the dataset."""
    idx = Path(f"{prefix}.idx")
    with open(idx, "rb") as f:
        f.seek(len(MAGIC) + 9)
        (seqs,) = struct.unpack("<Q", f.read(8))
    if seqs == 0:
        return np.zeros(0, dtype=np.int32)
    return np.memmap(idx, mode="r", dtype=np.int32, offset=HEADER_BYTES, shape=(seqs,))


def sequences_in(lengths: np.ndarray, seq_length: int, chunk: int | None, min_chunk: int | None) -> int:
    """How many ``seq_length``-token sequences a domain's documents pack into (as ``pack_documents`` does:
    whole documents for short data; chunks of ``chunk`` tokens, and tails of at least ``min_chunk``, for
    long data)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if chunk is None:
        return int(lengths.sum()) // seq_length
    full, tail = lengths // chunk, lengths % chunk
    kept_tails = tail[(tail > 0) & (tail >= min_chunk)] if min_chunk is not None else tail[:0]
    return (int(full.sum()) * chunk + int(kept_tails.sum())) // seq_length


def sidecar(prefix: str | Path) -> dict | None:
    """``PREFIX.json``, the statistics ``megaprolong-preprocess`` writes beside a dataset (None if absent)."""
    try:
        return json.loads(Path(f"{prefix}.json").read_text())
    except (OSError, ValueError):
        return None


def check_mix_data(spec, seq_length: int, vocab_size: int, datasets: bool = True) -> list[str]:
    """Problems of a mix (a :class:`~megaprolong.data.dataset.MixSpec` whose datasets passed
    :func:`check_indexed`) for a stage of ``seq_length`` tokens and a model of ``vocab_size`` tokens, one line
    each: a weight that is not positive, a sequence length other than the stage's, a domain with no
    document or too few tokens for one sequence, a dataset tokenized with a larger vocabulary than the
    model's or with another tokenizer than the stage's other domains. ``datasets=False``: the mix file
    only (its datasets do not exist yet)."""
    problems = []
    if spec.seq_length != seq_length:
        problems.append(f"the mix's seq_length is {spec.seq_length}, train.seq_length is {seq_length}")
    tokenizers: dict[str, list[str]] = {}
    for d in spec.domains:
        if not d.weight > 0:
            problems.append(f"domain {d.name}: weight {d.weight} must be > 0 (weights are normalized to sum to 1; "
                            f"leave a domain out of the mix instead of weighting it 0)")
        if not datasets:
            continue
        lengths = index_lengths(d.prefix)
        if len(lengths) == 0:
            problems.append(f"domain {d.name}: {d.prefix} holds no document")
        elif sequences_in(lengths, spec.seq_length, d.chunk, d.min_chunk) == 0:
            kept = f" in chunks of {d.chunk}" + (f" (tails >= {d.min_chunk})" if d.min_chunk else "") if d.chunk else ""
            problems.append(f"domain {d.name}: {d.prefix} ({len(lengths):,} documents, {int(lengths.sum()):,} tokens"
                            f"{kept}) is shorter than one sequence of {spec.seq_length:,} tokens")
        stats = sidecar(d.prefix) or {}
        if stats.get("vocab_size") and stats["vocab_size"] > vocab_size:
            problems.append(f"domain {d.name}: {d.prefix}.json says it was tokenized with a vocabulary of "
                            f"{stats['vocab_size']:,} tokens, more than the model's model.vocab_size={vocab_size:,} "
                            f"(token ids past the embedding would crash training)")
        if stats.get("tokenizer_sha256"):
            tokenizers.setdefault(stats["tokenizer_sha256"], []).append(d.name)
    if len(tokenizers) > 1:
        groups = "; ".join(f"{', '.join(names)}: tokenizer sha256 {digest[:12]}" for digest, names in tokenizers.items())
        problems.append(f"the mix's domains were tokenized with different tokenizers ({groups}); re-tokenize them "
                        f"with the model's tokenizer")
    return problems
