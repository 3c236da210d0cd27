import numpy as np
import pytest

from megaprolong.data.packing import balance_micro_batches, chunk_documents, make_sample, pack_documents


def docs_and_index(seed=1, n=60, seq=64, **kw):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, 1000, size=k) for k in rng.integers(1, 90, size=n)]
    order = rng.permutation(len(docs))
    index = pack_documents(np.array([len(d) for d in docs]), order, seq, **kw)
    return docs, order, index


def test_short_packing_keeps_every_token_once_and_boundaries():
    seq = 64
    docs, order, index = docs_and_index(seq=seq)
    samples = [make_sample(index.segments(i), lambda d, a, b: docs[d][a:b]) for i in range(len(index))]
    assert all(len(s.tokens) == seq for s in samples)
    # the sequences, concatenated, are the documents in order (the final partial sequence is dropped)
    stream = np.concatenate([docs[i] for i in order])
    packed = np.concatenate([s.tokens for s in samples])
    np.testing.assert_array_equal(packed, stream[:len(packed)])
    assert len(stream) - len(packed) < seq
    for i, s in enumerate(samples):
        segs = index.segments(i)
        assert s.cu_seqlens[0] == 0 and s.cu_seqlens[-1] == seq
        assert list(np.diff(s.cu_seqlens)) == [e - b for _, b, e in segs]
        starts = set(s.cu_seqlens[:-1].tolist())
        for t in range(seq):
            next_is_doc_start = (t + 1) in starts or t + 1 == seq
            assert s.loss_mask[t] == (0.0 if next_is_doc_start else 1.0)
            if s.loss_mask[t]:
                assert s.labels[t] == s.tokens[t + 1]


def test_long_document_spans_sequences():
    index = pack_documents(np.array([10, 150, 5]), np.array([0, 1, 2]), 64)
    assert index.segments(0) == [(0, 0, 10), (1, 0, 54)]
    assert index.segments(1) == [(1, 54, 118)]
    assert len(index) == 2  # the last 37 tokens cannot fill a sequence


def test_empty_documents_are_skipped():
    index = pack_documents(np.array([0, 40, 0, 30]), np.array([0, 1, 2, 3]), 32)
    assert index.segments(0) == [(1, 0, 32)]
    assert index.segments(1) == [(1, 32, 40), (3, 0, 24)]


@pytest.mark.parametrize("min_chunk", [None, 20])
def test_chunking_long_documents(min_chunk):
    lengths = np.array([100, 250, 30, 64])
    doc, start, length = chunk_documents(lengths, 64, min_chunk)
    expected = [(0, 0, 64), (1, 0, 64), (1, 64, 64), (1, 128, 64), (3, 0, 64)]
    if min_chunk:  # tails of 36, 58 and 30 tokens are kept
        expected = [(0, 0, 64), (0, 64, 36), (1, 0, 64), (1, 64, 64), (1, 128, 64), (1, 192, 58), (2, 0, 30), (3, 0, 64)]
    assert list(zip(doc.tolist(), start.tolist(), length.tolist())) == expected


def test_single_document_sequences_and_512k_style_units():
    lengths = np.array([300, 130, 70])
    rng = np.random.default_rng(0)
    index = pack_documents(lengths, None, 64, chunk=64, rng=rng)  # chunk == seq: one chunk per sequence
    assert len(index) == 4 + 2 + 1
    assert all(len(index.segments(i)) == 1 for i in range(len(index)))
    index = pack_documents(lengths, None, 128, chunk=32, rng=np.random.default_rng(0))  # 4 chunks a sequence
    seen = [seg for i in range(len(index)) for seg in index.segments(i)]
    assert all(e - b == 32 for _, b, e in seen) and all(len(index.segments(i)) == 4 for i in range(len(index)))
    assert len(set(seen)) == len(seen)  # no chunk twice


def test_balance_micro_batches_groups_equal_costs():
    docs, order, index = docs_and_index(n=200, seq=64)
    samples = [make_sample(index.segments(i), lambda d, a, b: docs[d][a:b]) for i in range(16)]
    out = balance_micro_batches(samples, dp_size=2, micro_batch_size=2)
    assert sorted(map(id, out)) == sorted(map(id, samples))
    costs = [s.attention_cost for s in out]
    per_rank = 8
    # micro-batch m on rank 0 and rank 1 hold consecutive ranks of the cost order
    for m in range(4):
        r0 = costs[m * 2:(m + 1) * 2]
        r1 = costs[per_rank + m * 2: per_rank + (m + 1) * 2]
        assert min(r0 + r1) >= max(costs[(m + 1) * 2:per_rank] + costs[per_rank + (m + 1) * 2:], default=0)
