"""The data mix: exact proportions over time, determinism, resume without replay, epochs."""

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megaprolong.data.dataset import DomainSpec, MixDataset, MixSchedule, MixSpec, load_mix

PROLONG_STAGE1 = [0.30, 0.30, 0.10, 0.10, 0.04, 0.04, 0.03, 0.03, 0.03, 0.03]


def make_indexed(prefix, lengths, seed):
    rng = np.random.default_rng(seed)
    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for n in lengths:
        b.add_document(rng.integers(0, 500, size=n).astype(np.uint16), [n])
    b.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.mark.parametrize("weights", [PROLONG_STAGE1, [0.15, 0.15, 0.05, 0.25, 0.37, 0.03], [0.5, 0.5], [1.0]])
def test_schedule_within_one_sequence_of_weights_at_every_point(weights):
    total = 1000 * 16
    s = MixSchedule(weights, total)
    w = np.asarray(weights) / sum(weights)
    counts = np.zeros(len(w))
    for n, d in enumerate(s.domains, start=1):
        counts[d] += 1
        assert np.all(np.abs(counts - w * n) < 1.0), (n, counts, w * n)


@pytest.fixture
def mix(tmp_path):
    rng = np.random.default_rng(0)
    domains = [
        DomainSpec("books", make_indexed(tmp_path / "books", rng.integers(100, 400, size=30), 1), 0.3, chunk=64),
        DomainSpec("code", make_indexed(tmp_path / "code", rng.integers(64, 200, size=40), 2), 0.3, chunk=64, min_chunk=16),
        DomainSpec("web", make_indexed(tmp_path / "web", rng.integers(1, 60, size=300), 3), 0.4),
    ]
    return MixSpec(seq_length=64, domains=domains)


def test_mix_proportions_over_1000_steps_and_resume(tmp_path, mix):
    steps, gbs = 1000, 4
    ds = MixDataset(mix, steps * gbs, seed=7, cache_dir=str(tmp_path / "cache"))
    per_step = []
    counts = np.zeros(3)
    for step in range(steps):
        batch = ds.global_batch(step, gbs)
        for s in batch:
            counts[s.domains[0]] += 1
        assert np.all(np.abs(counts - np.array([0.3, 0.3, 0.4]) * (step + 1) * gbs) < 1.0)
        if step in (0, 417, 999):
            per_step.append([s.tokens.copy() for s in batch])
    # a fresh dataset (a resumed run, cache warm) jumps straight to any step and gives the same data
    resumed = MixDataset(mix, steps * gbs, seed=7, cache_dir=str(tmp_path / "cache"))
    for step, want in zip((0, 417, 999), per_step):
        got = [s.tokens for s in resumed.global_batch(step, gbs)]
        assert all(np.array_equal(a, b) for a, b in zip(got, want))
    other_seed = MixDataset(mix, steps * gbs, seed=8)
    assert not all(np.array_equal(a, b.tokens) for a, b in zip(per_step[1], other_seed.global_batch(417, gbs)))


def test_no_repeat_within_an_epoch_then_fresh_shuffle(mix):
    ds = MixDataset(mix, 4000, seed=1)
    web = ds.domains[2]
    n = len(web.epoch(0))
    first = [tuple(web.sample(k).tokens) for k in range(n)]
    assert len(set(first)) == n  # each sequence once
    second = [tuple(web.sample(k).tokens) for k in range(n, 2 * n)]
    assert second != first  # new epoch, new shuffle
    tokens = lambda seqs: sorted(t for s in seqs for t in s)
    assert abs(len(tokens(first)) - len(tokens(second))) == 0


def test_load_mix_resolves_relative_prefixes(tmp_path):
    (tmp_path / "mix.yaml").write_text("seq_length: 64\ndomains:\n  - {name: web, prefix: data/web, weight: 1.0}\n")
    spec = load_mix(str(tmp_path / "mix.yaml"))
    assert spec.domains[0].prefix == str(tmp_path / "data" / "web")
    assert load_mix(str(tmp_path / "mix.yaml"), "/data").domains[0].prefix == "/data/data/web"


def test_shipped_prolong_mixes_have_reference_weights():
    from pathlib import Path

    from megaprolong.config import load_config

    ex = Path(__file__).resolve().parent.parent / "examples" / "mixes"
    s1 = load_config(MixSpec, ex / "prolong_stage1.yaml")
    assert s1.seq_length == 65536 and abs(sum(d.weight for d in s1.domains) - 1) < 1e-9
    w1 = {d.name: d.weight for d in s1.domains}
    assert w1["code_repos"] == 0.30 and w1["books"] == 0.30 and w1["fineweb_edu"] == 0.10
    s2 = load_config(MixSpec, ex / "prolong_stage2.yaml")
    assert s2.seq_length == 524288 and abs(sum(d.weight for d in s2.domains) - 1) < 1e-9
    w2 = {d.name: (d.weight, d.chunk) for d in s2.domains}
    assert w2["code_repos_512k"] == (0.15, 524288) and w2["code_repos_64k"] == (0.15, 65536)
    assert w2["books_512k"] == (0.05, 524288) and w2["books_64k"] == (0.25, 65536)
    short = [d.weight for d in s2.domains if d.chunk is None and d.name != "textbooks"]
    assert abs(sum(short) - 0.37) < 1e-9


def test_exhausted_domain_loads_each_epoch_index_once_and_resumes_across_epochs(tmp_path):
    """A domain exhausted 3 times in a run: one index load per epoch (not one per sample), and a run
    resumed past an epoch boundary reads the same sequences as the uninterrupted run."""
    small = DomainSpec("small", make_indexed(tmp_path / "small", [40] * 20, 5), 0.5)  # 12 sequences/epoch
    big = DomainSpec("big", make_indexed(tmp_path / "big", [50] * 400, 6), 0.5)
    spec = MixSpec(seq_length=64, domains=[small, big])
    steps, gbs = 24, 4  # 48 sequences of "small": 4 epochs
    ds = MixDataset(spec, steps * gbs, seed=3, cache_dir=str(tmp_path / "cache"))
    per_epoch = ds.domains[0].sequences_per_epoch
    assert per_epoch == 12
    run = [[s.tokens.copy() for s in ds.global_batch(step, gbs)] for step in range(steps)]
    epochs_used = -(-steps * gbs // 2 // per_epoch)
    assert epochs_used == 4 and ds.domains[0].index_loads == epochs_used
    assert ds.domains[1].index_loads == 1
    resumed = MixDataset(spec, steps * gbs, seed=3, cache_dir=str(tmp_path / "cache"))
    for step in range(7, steps):  # step 7 is in the small domain's 2nd epoch
        got = [s.tokens for s in resumed.global_batch(step, gbs)]
        assert all(np.array_equal(a, b) for a, b in zip(got, run[step])), step
    assert resumed.domains[0].index_loads == 4  # epoch 0 (its size) + epochs 1, 2, 3


def test_prefetcher_returns_each_steps_batch():
    from megaprolong.data.prefetch import BatchPrefetcher

    class Steps:
        calls = []

        def global_batch(self, step, size):
            self.calls.append(step)
            return [step] * size

    data = Steps()
    prefetch = BatchPrefetcher(data, 2, last_step=4)
    got = [prefetch.get(step)[0] for step in (1, 2, 3)]  # a resumed run starts at step 1
    prefetch.close()
    assert got == [[1, 1], [2, 2], [3, 3]] and data.calls == [1, 2, 3]  # each read once, none past the end
