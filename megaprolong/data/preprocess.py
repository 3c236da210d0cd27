"""Raw text (or ProLong's MDS shards) to a Megatron indexed dataset, one sequence per document.

- Streaming: documents are read, tokenized in batches and appended to the output; memory stays bounded
  whatever the input size (``--group-by`` spills records to disk by key and joins one bucket at a time).
- Exact: token ids equal HF ``tokenizers``' ``encode(text, add_special_tokens=False)``. gigatoken, much
  faster, is used when installed and only after it agreed with ``tokenizers`` on a sample of the input;
  otherwise (or on disagreement, said on stderr; or with MEGAPROLONG_DISABLE_FAST_TOKENIZER=1)
  ``tokenizers`` does the work. As in both libraries, a
  special-token string inside a text (e.g. ``<|end_of_text|>``) becomes that special token.
- Atomic: everything is written under temporary names and renamed at the end, ``.idx`` last, so an
  interrupted run never leaves a pair that opens as a dataset. Inputs are only read.
- MDS (ProLong's released data): token ids are kept, each packed sample is split back into its original
  documents by its ``indices``; ``domain`` filters by the ``domain`` column.
"""

from __future__ import annotations

import array
import ctypes
import gc
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megaprolong.data.grouping import bucket_count, grouped
from megaprolong.data.mds import is_mds, read_mds, split_documents
from megaprolong.data.readers import DataError, read_records

BATCH_BYTES = 8 << 20  # tokenize ~8 MB of text at a time: fast, and memory stays flat
CHECK_DOCS = 256  # documents checked against HF tokenizers before trusting the fast tokenizer
FAST_RENEW_BYTES = 2 << 30  # gigatoken's per-tokenizer cache grows without bound: renew it this often


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
    domain: str | None = None  # MDS inputs: keep only samples of this domain
    workers: int = 1
    skip_bad: bool = False
    quiet: bool = False


@dataclass
class Stats:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n


# ---- tokenizers ---------------------------------------------------------------------------------------
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


class Encoder:
    """Batch encoder returning (flat ids, lengths); gigatoken when it agrees with HF tokenizers."""

    def __init__(self, path: str | Path, workers: int):
        self.hf = load_tokenizer(path)
        self.fast = None
        self.name = "tokenizers"
        self._path = tokenizer_file(path)
        self._checked = False
        self._fast_bytes = 0
        os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, workers)))  # read by both at first use

    def _hf(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch_fast(texts, add_special_tokens=False)]

    def _first_batch(self, texts: list[str]) -> None:
        self._checked = True
        if os.environ.get("MEGAPROLONG_DISABLE_FAST_TOKENIZER"):
            return
        try:
            import gigatoken
        except ImportError:
            return
        try:
            fast = gigatoken.Tokenizer(str(self._path))
            sample = texts[:CHECK_DOCS]
            got = fast.encode_batch_list(sample)
        except Exception as e:
            print(f"megaprolong-preprocess: gigatoken unusable ({e}); using HF tokenizers", file=sys.stderr)
            return
        if [list(g) for g in got] != self._hf(sample):
            print("megaprolong-preprocess: gigatoken disagrees with HF tokenizers on this input; "
                  "using HF tokenizers (exact, slower)", file=sys.stderr)
            return
        self.fast, self.name = fast, "gigatoken"

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if not self._checked:
            self._first_batch(texts)
        if self.fast is not None:
            self._fast_bytes += sum(map(len, texts))
            if self._fast_bytes > FAST_RENEW_BYTES:
                import gigatoken

                self.fast, self._fast_bytes = gigatoken.Tokenizer(str(self._path)), 0
            out = self.fast.encode_batch(texts)
            layout = out.layout
            offsets = np.asarray(layout.offsets.data)
            ids = np.asarray(layout.content.data)[offsets[0]:offsets[-1]]
            return ids, np.diff(offsets)
        lists = self._hf(texts)
        lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        flat = np.fromiter((i for ids in lists for i in ids), dtype=np.int64, count=int(lengths.sum()))
        return flat, lengths

    def special_id(self, names: tuple[str, ...]) -> int:
        for name in names:
            i = self.hf.token_to_id(name)
            if i is not None:
                return i
        raise DataError(str(self._path), f"tokenizer has none of the special tokens {names}")


# ---- the output ---------------------------------------------------------------------------------------
def token_dtype(vocab_size: int) -> np.dtype:
    """megatron-core's choice (``DType.optimal_dtype``): uint16 below 65,500 tokens, else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


class _Writer:
    """Streams token ids to ``TMP.bin`` and has megatron-core's IndexedDatasetBuilder write ``TMP.idx``.

    importing megatron-core costs ~5 s and ~700 MiB (torch with CUDA libraries) on every run: the .bin is
    plain token ids, written here in one write per batch, and the .idx is written at the end by the
    builder in a short child process (:mod:`megaprolong.data.write_index`), so this process stays small.
    """

    def __init__(self, bin_path: str, dtype: np.dtype):
        self.bin_path, self.dtype = bin_path, dtype
        self.file = open(bin_path, "wb")
        self.lengths = array.array("q")

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        self.lengths.extend(lengths.tolist())

    def finalize(self, idx_path: str) -> None:
        self.file.close()
        lengths = np.frombuffer(self.lengths, dtype=np.int64)
        if "megatron.core.datasets.indexed_dataset" in sys.modules:  # already paid for: write it here
            from megaprolong.data.write_index import write_index

            write_index(lengths, self.dtype.name, idx_path)
            return
        lengths_path = f"{idx_path}.lengths.npy"
        np.save(lengths_path, lengths)
        try:
            subprocess.run([sys.executable, "-m", "megaprolong.data.write_index", lengths_path, self.dtype.name,
                            idx_path], check=True)
        finally:
            Path(lengths_path).unlink(missing_ok=True)


# ---- reading ------------------------------------------------------------------------------------------
def _bad(cfg: PreprocessConfig, stats: Stats, err: DataError) -> None:
    if not cfg.skip_bad:
        raise err
    stats.drop("bad_record")


def _texts(cfg: PreprocessConfig, path: str, stats: Stats) -> Iterator[tuple[str, str]]:
    """(where, text) of one text input, records in file order."""
    for where, rec in read_records(path):
        if isinstance(rec, DataError):
            _bad(cfg, stats, rec)
            continue
        text = rec.get(cfg.text_key)
        if not isinstance(text, str):
            _bad(cfg, stats, DataError(where, f"missing text key {cfg.text_key!r}" if text is None
                                       else f"{cfg.text_key!r} is {type(text).__name__}, expected a string"))
            continue
        if cfg.group_by is None:
            yield where, text
            continue
        key = rec.get(cfg.group_by)
        if key is None:
            _bad(cfg, stats, DataError(where, f"missing group key {cfg.group_by!r}"))
            continue
        yield f"group {key}", (str(key), text)


def _text_batches(cfg: PreprocessConfig, stats: Stats) -> Iterator[list[tuple[str, str]]]:
    """Batches of ~BATCH_BYTES of (where, text), documents in input order (groups: first appearance)."""
    def flat():
        records = ((where, item) for path in cfg.inputs for where, item in _texts(cfg, path, stats))
        if cfg.group_by is None:
            yield from records
            return
        prefix = Path(cfg.output_prefix)
        spill = prefix.with_name(f".{prefix.name}.groups{os.getpid()}")  # removed when done, also on errors
        buckets = bucket_count(sum(os.path.getsize(p) for p in cfg.inputs))
        for key, text in grouped((item for _, item in records), cfg.group_separator, spill, buckets):
            yield f"group {key}", text

    batch, size = [], 0
    for where, text in flat():
        batch.append((where, text))
        size += len(text)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode_checked(encoder: Encoder, cfg: PreprocessConfig, stats: Stats, batch):
    """Encode a batch; if the batch fails (e.g. a lone surrogate), find and report the bad record."""
    try:
        return batch, *encoder.encode([t for _, t in batch])
    except (TypeError, ValueError, UnicodeError):
        good = []
        for where, text in batch:
            try:
                text.encode("utf-8")
                encoder.hf.encode(text, add_special_tokens=False)
                good.append((where, text))
            except (TypeError, ValueError, UnicodeError) as e:
                _bad(cfg, stats, DataError(where, f"text cannot be tokenized ({type(e).__name__}: {e})"))
        if not good:
            return good, np.zeros(0, np.int64), np.zeros(0, np.int64)
        return good, *encoder.encode([t for _, t in good])


def _token_batches(cfg, encoder, stats) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """(flat ids, lengths, input bytes) per batch, for text and MDS inputs alike, in input order."""
    text_inputs = [p for p in cfg.inputs if not is_mds(p)]
    mds_inputs = [p for p in cfg.inputs if is_mds(p)]
    if text_inputs and mds_inputs:
        raise DataError(", ".join(cfg.inputs), "mix of text and MDS inputs: preprocess them separately")
    if mds_inputs:
        pieces, total = [], 0
        for path in mds_inputs:
            for where, sample in read_mds(path):
                if cfg.domain is not None and sample.get("domain") != cfg.domain:
                    continue
                for doc in split_documents(where, sample):
                    pieces.append(doc)
                    total += len(doc)
                if total >= BATCH_BYTES // 4:
                    yield np.concatenate(pieces), np.array([len(p) for p in pieces]), total * 4
                    pieces, total = [], 0
        if pieces:
            yield np.concatenate(pieces), np.array([len(p) for p in pieces]), total * 4
        return
    if cfg.domain is not None:
        raise DataError(", ".join(cfg.inputs), "--domain filters MDS inputs only")
    for batch in _text_batches(cfg, stats):
        batch, ids, lengths = _encode_checked(encoder, cfg, stats, batch)
        yield ids, lengths, sum(len(t) for _, t in batch)


def _add_special(ids, lengths, bos, eos):
    """Insert BOS before / EOS after every document of a flat batch."""
    new_lengths = lengths + (bos is not None) + (eos is not None)
    out = np.empty(int(new_lengths.sum()), dtype=np.int64)
    starts = np.cumsum(new_lengths) - new_lengths
    body = np.ones(len(out), dtype=bool)
    if bos is not None:
        out[starts], body[starts] = bos, False
    if eos is not None:
        out[starts + new_lengths - 1], body[starts + new_lengths - 1] = eos, False
    out[body] = ids
    return out, new_lengths


def _filter(ids, lengths, min_tokens, stats):
    """Drop empty documents and those shorter than ``min_tokens``, counting them by reason."""
    keep = lengths >= max(min_tokens, 1)
    if keep.all():
        return ids, lengths
    empty = int(np.sum(lengths == 0))
    if empty:
        stats.drop("empty", empty)
    if int(np.sum(~keep)) > empty:
        stats.drop("min_tokens", int(np.sum(~keep)) - empty)
    return ids[np.repeat(keep, lengths)], lengths[keep]


# ---- the job ------------------------------------------------------------------------------------------
def preprocess(cfg: PreprocessConfig, progress_position: int = 0) -> dict:
    """Tokenize ``cfg.inputs`` into ``cfg.output_prefix``.{bin,idx,json}; returns the stats written."""
    start = time.time()
    if not cfg.inputs:
        raise DataError("--input", "no input files")
    for p in cfg.inputs:
        if not Path(p).exists():
            raise DataError(str(p), "input file does not exist")
    encoder = Encoder(cfg.tokenizer, cfg.workers)
    bos = encoder.special_id(("<|begin_of_text|>", "<s>", "<bos>")) if cfg.add_bos else None
    eos = encoder.special_id(("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")) if cfg.add_eos else None
    vocab = encoder.hf.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab)

    prefix = Path(cfg.output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(f".{prefix.name}.tmp{os.getpid()}")
    stats = Stats()
    writer = _Writer(f"{tmp}.bin", dtype)
    bar = tqdm(disable=cfg.quiet, unit=" docs", file=sys.stderr, desc=f"preprocess {prefix.name}",
               position=progress_position, mininterval=1.0)
    try:
        for ids, lengths, nbytes in _token_batches(cfg, encoder, stats):
            if len(ids) and int(ids.max()) >= vocab:
                raise DataError(", ".join(cfg.inputs), f"token id {int(ids.max())} >= the tokenizer's vocabulary "
                                                       f"size {vocab}: wrong tokenizer for this data?")
            if bos is not None or eos is not None:
                ids, lengths = _add_special(ids, lengths, bos, eos)
            ids, lengths = _filter(ids, lengths, cfg.min_tokens, stats)
            writer.add(ids, lengths)
            stats.documents += len(lengths)
            stats.tokens += int(lengths.sum())
            stats.bytes += nbytes
            elapsed = max(time.time() - start, 1e-9)
            bar.update(len(lengths))
            bar.set_postfix_str(f"{stats.tokens / elapsed / 1e6:.2f} M tok/s, {stats.bytes / elapsed / 1e6:.1f} MB/s")
        backend = encoder.name
        del encoder  # the tokenizers' caches: freed before the index writer starts
        _release_memory()
        writer.finalize(f"{tmp}.idx")
        report = {
            "documents": stats.documents,
            "tokens": stats.tokens,
            "dropped": stats.dropped,
            "tokenizer": str(tokenizer_file(cfg.tokenizer)),
            "tokenizer_sha256": hashlib.sha256(tokenizer_file(cfg.tokenizer).read_bytes()).hexdigest(),
            "tokenizer_backend": backend,
            "vocab_size": vocab,
            "dtype": dtype.name,
            "inputs": [str(p) for p in cfg.inputs],
            "settings": {k: v for k, v in vars(cfg).items() if k not in ("inputs", "tokenizer", "output_prefix")},
            "elapsed_s": round(time.time() - start, 3),
        }
        Path(f"{tmp}.json").write_text(json.dumps(report, indent=2) + "\n")
        publish(tmp, prefix)
        return report
    finally:
        bar.close()
        writer.file.close()
        for suffix in (".bin", ".idx", ".json"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)


def _release_memory() -> None:
    gc.collect()
    try:  # hand freed heap pages back to the OS (glibc keeps them otherwise)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def publish(tmp: Path | str, prefix: Path | str) -> None:
    """Rename TMP.{bin,json,idx} to PREFIX.*, .idx last (and any old PREFIX.idx removed first)."""
    Path(f"{prefix}.idx").unlink(missing_ok=True)
    os.replace(f"{tmp}.bin", f"{prefix}.bin")
    os.replace(f"{tmp}.json", f"{prefix}.json")
    os.replace(f"{tmp}.idx", f"{prefix}.idx")


# ---- many nodes ---------------------------------------------------------------------------------------
def mpi_world_size() -> int:
    """Ranks of the MPI job this process was started in (1 when not under mpirun/srun --mpi)."""
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        if var in os.environ:
            return int(os.environ[var])
    return 1


def split_contiguous(items: list, parts: int, index: int) -> list:
    """Part ``index`` of ``items`` cut into ``parts`` contiguous runs (sizes differ by at most one)."""
    q, r = divmod(len(items), parts)
    start = index * q + min(index, r)
    return items[start:start + q + (index < r)]


def preprocess_mpi(cfg: PreprocessConfig) -> dict | None:
    """``mpirun -n K megaprolong-preprocess ...``: each rank tokenizes a contiguous run of the input files
    into a partial dataset; rank 0 merges them in rank order (megatron-core's builder) into PREFIX.

    Documents keep input order. ``--group-by`` groups within a rank's files only: keep a group (e.g. a
    repository) in one input file. Returns the stats on rank 0, None elsewhere.
    """
    from mpi4py import MPI

    # imported up front: rank 0 merges with it, and no rank then forks a child under MPI
    import megatron.core.datasets.indexed_dataset  # noqa: F401

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    prefix = Path(cfg.output_prefix)
    job = comm.bcast(f"{os.getpid()}" if rank == 0 else None, root=0)
    part = prefix.with_name(f".{prefix.name}.job{job}.part{rank:05d}")
    mine = split_contiguous(cfg.inputs, size, rank)
    error = None
    report = None
    try:
        if mine:
            report = preprocess(PreprocessConfig(**{**vars(cfg), "inputs": mine, "output_prefix": str(part),
                                                    "quiet": cfg.quiet or rank != 0}))
    except Exception as e:  # report on every rank instead of leaving the others waiting forever
        error = f"rank {rank}: {e}"
    errors = comm.allgather(error)
    reports = comm.gather(report, root=0)
    result, merge_error = None, None
    if rank == 0 and not any(errors):
        try:
            result = _merge_parts(cfg, reports, [prefix.with_name(f".{prefix.name}.job{job}.part{r:05d}")
                                                 for r in range(size)])
        except Exception as e:  # every rank must reach the barrier below, whatever happens here
            merge_error = f"merging the ranks' parts failed: {e}"
    merge_error = comm.bcast(merge_error, root=0)
    comm.Barrier()
    for suffix in (".bin", ".idx", ".json"):
        Path(f"{part}{suffix}").unlink(missing_ok=True)
    if any(errors) or merge_error:
        raise DataError(cfg.output_prefix, "; ".join(e for e in [*errors, merge_error] if e))
    return result


def _merge_parts(cfg: PreprocessConfig, reports: list[dict | None], parts: list[Path]) -> dict:
    """Concatenate the ranks' partial datasets in rank order into PREFIX (atomically), merging stats."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    start = time.time()
    prefix = Path(cfg.output_prefix)
    done = [r for r in reports if r]
    tmp = prefix.with_name(f".{prefix.name}.tmp{os.getpid()}")
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=np.dtype(done[0]["dtype"]).type)
    for rep, part in zip(reports, parts):
        if rep is not None:
            builder.add_index(str(part))
    builder.finalize(f"{tmp}.idx")
    dropped: dict[str, int] = {}
    for r in done:
        for k, v in r["dropped"].items():
            dropped[k] = dropped.get(k, 0) + v
    result = {**done[0], "documents": sum(r["documents"] for r in done), "tokens": sum(r["tokens"] for r in done),
              "dropped": dropped, "inputs": list(cfg.inputs), "ranks": len(reports),
              "elapsed_s": round(max(r["elapsed_s"] for r in done) + time.time() - start, 3)}
    Path(f"{tmp}.json").write_text(json.dumps(result, indent=2) + "\n")
    publish(tmp, prefix)
    return result
