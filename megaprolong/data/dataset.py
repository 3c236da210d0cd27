"""Packed training sequences from Megatron indexed datasets: one domain, or a weighted mix of domains.

Each domain's sequences are packed per epoch from a fresh shuffle (seeded by seed, domain, epoch) and
cached on disk as numpy arrays keyed by a hash of the inputs and settings, so that start-up costs seconds
even for millions of documents and every rank of a node reuses one build. The mix decides which domain
each sequence of the run comes from (:class:`MixSchedule`); a domain's k-th sequence is sequence
``k mod n`` of epoch ``k div n``: no sequence repeats before its domain is exhausted, and any step can
be produced directly (resume replays no data).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megaprolong.data.packing import PackedIndex, Sample, make_sample, pack_documents

log = logging.getLogger(__name__)
_INDEX_VERSION = 1


@dataclass
class DomainSpec:
    name: str
    prefix: str  # indexed dataset prefix (relative to the mix file's data root)
    weight: float
    chunk: int | None = None  # long domains: cut documents into single-document chunks of this many tokens
    min_chunk: int | None = None  # keep a document's final shorter chunk when at least this long


@dataclass
class MixSpec:
    seq_length: int
    domains: list[DomainSpec] = field(default_factory=list)


class MixSchedule:
    """Which domain each sequence of the run comes from, following the weights exactly over time.

    Sequence ``n`` goes to the domain furthest behind its quota (largest ``w_d * (n + 1) - count_d``), so
    every domain's cumulative count stays within one sequence of ``w_d * n`` at every point of the run.
    Deterministic: no randomness, the same on every rank.
    """

    def __init__(self, weights: list[float], total: int):
        w = np.asarray(weights, dtype=np.float64)
        if len(w) == 0 or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"mix weights must be non-negative with a positive sum, got {weights}")
        self.weights = w / w.sum()
        counts = np.zeros(len(w), dtype=np.int64)
        domains = np.empty(total, dtype=np.int16)
        for n in range(total):
            d = int(np.argmax(self.weights * (n + 1) - counts))
            domains[n] = d
            counts[d] += 1
        self.domains = domains
        # draw[n]: how many sequences of domain domains[n] came before position n
        self.draw = np.empty(total, dtype=np.int64)
        for d in range(len(w)):
            where = np.flatnonzero(domains == d)
            self.draw[where] = np.arange(len(where))


def _index_key(prefix: str, seq_length: int, chunk, min_chunk, seed: int, epoch: int) -> str:
    idx = Path(f"{prefix}.idx")
    st = idx.stat()
    raw = json.dumps([_INDEX_VERSION, str(idx.resolve()), st.st_size, st.st_mtime_ns, seq_length, chunk,
                      min_chunk, seed, epoch])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


class DomainData:
    """One domain: its indexed dataset and its packed sequences per epoch (cached on disk)."""

    def __init__(self, spec: DomainSpec, domain_id: int, seq_length: int, seed: int, cache_dir: str | None):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.spec, self.id, self.seq_length, self.seed = spec, domain_id, seq_length, seed
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.indexed = IndexedDataset(spec.prefix)
        self.lengths = self.indexed.sequence_lengths
        self._epochs: dict[int, PackedIndex] = {}
        self.index_loads = 0  # epoch indexes loaded or built: one per epoch when samples come in order
        # sequences per epoch: the same every epoch (packing keeps every token, only the order changes)
        self.sequences_per_epoch = len(self.epoch(0))
        if self.sequences_per_epoch == 0:
            raise ValueError(f"domain {spec.name} ({spec.prefix}): {int(self.lengths.sum())} tokens make no "
                             f"sequence of {seq_length} tokens")

    def epoch(self, e: int) -> PackedIndex:
        if e not in self._epochs:
            self.index_loads += 1
            self._epochs = {e: self._load_or_build(e)}  # one epoch in memory: samples come in epoch order
            if e > 0:
                log.info("domain %s: epoch %d begins (data exhausted, reshuffled)", self.spec.name, e)
        return self._epochs[e]

    def _build(self, e: int) -> PackedIndex:
        rng = np.random.default_rng([self.seed, self.id, e])
        if self.spec.chunk is None:
            return pack_documents(self.lengths, rng.permutation(len(self.lengths)), self.seq_length)
        return pack_documents(self.lengths, None, self.seq_length, chunk=self.spec.chunk,
                              min_chunk=self.spec.min_chunk, rng=rng)

    def _load_or_build(self, e: int) -> PackedIndex:
        if self.cache_dir is None:
            return self._build(e)
        s = self.spec
        path = self.cache_dir / f"{Path(s.prefix).name}-{_index_key(s.prefix, self.seq_length, s.chunk, s.min_chunk, self.seed, e)}.npz"
        if path.exists():
            with np.load(path) as z:
                return PackedIndex(**{k: z[k] for k in ("offsets", "doc", "start", "length")})
        index = self._build(e)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **index.arrays())
        os.replace(tmp, path)  # concurrent builders write identical content: last rename wins
        return index

    def sample(self, k: int) -> Sample:
        """The domain's k-th sequence of the run."""
        n = self.sequences_per_epoch
        segments = self.epoch(k // n).segments(k % n)
        return make_sample(segments, self._read, domain=self.id)

    def _read(self, doc: int, start: int, end: int) -> np.ndarray:
        return self.indexed.get(doc, offset=start, length=end - start)


class MixDataset:
    """Global batches drawn from weighted domains (``global_batch(step, size)``)."""

    def __init__(self, spec: MixSpec, total_sequences: int, seed: int, cache_dir: str | None = None):
        self.spec = spec
        self.domains = [DomainData(d, i, spec.seq_length, seed, cache_dir) for i, d in enumerate(spec.domains)]
        self.schedule = MixSchedule([d.weight for d in spec.domains], total_sequences)

    @property
    def domain_names(self) -> list[str]:
        return [d.name for d in self.spec.domains]

    def global_batch(self, step: int, size: int) -> list[Sample]:
        positions = range(step * size, (step + 1) * size)
        if positions.stop > len(self.schedule.domains):
            raise IndexError(f"step {step} is past the {len(self.schedule.domains) // size} steps planned")
        return [self.domains[self.schedule.domains[n]].sample(int(self.schedule.draw[n])) for n in positions]


def single_domain(prefix: str, seq_length: int, total_sequences: int, seed: int,
                  cache_dir: str | None = None) -> MixDataset:
    """A "mix" of one short-data domain: documents of ``prefix`` packed into ``seq_length`` sequences."""
    spec = MixSpec(seq_length=seq_length, domains=[DomainSpec(name=Path(prefix).name, prefix=prefix, weight=1.0)])
    return MixDataset(spec, total_sequences, seed, cache_dir)


def load_mix(path: str, data_root: str | None = None) -> MixSpec:
    """A mix YAML; relative domain prefixes are taken relative to ``data_root`` (default: the file's folder)."""
    from megaprolong.config import load_config

    spec = load_config(MixSpec, path)
    root = Path(data_root) if data_root else Path(path).parent
    for d in spec.domains:
        if not os.path.isabs(d.prefix):
            d.prefix = str(root / d.prefix)
    return spec


HELDOUT_SEED = 0  # the held-out sequences do not change with train.seed


def heldout_samples(spec: MixSpec, per_domain: int, cache_dir: str | None = None) -> list[Sample]:
    """The first ``per_domain`` packed sequences of each domain of ``spec`` (fewer if a domain has fewer),
    their ``domain`` the domain's index in ``spec``: fixed held-out sequences at the stage's length."""
    samples = []
    for i, d in enumerate(spec.domains):
        domain = DomainData(d, i, spec.seq_length, HELDOUT_SEED, cache_dir)
        samples += [domain.sample(k) for k in range(min(per_domain, domain.sequences_per_epoch))]
    return samples
