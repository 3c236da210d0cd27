import numpy as np

from megaprolong.data.packing import make_sample, pack_documents


def test_short_packing_keeps_every_token_once_and_boundaries():
    rng = np.random.default_rng(1)
    docs = [rng.integers(1, 1000, size=n) for n in rng.integers(1, 90, size=60)]
    order = rng.permutation(len(docs))
    seq = 64
    sequences = pack_documents(np.array([len(d) for d in docs]), order, seq)
    samples = [make_sample(s, lambda d, a, b: docs[d][a:b]) for s in sequences]
    assert all(len(s.tokens) == seq for s in samples)
    # concatenation of all sequences == documents in order (the final partial sequence is dropped)
    stream = np.concatenate([docs[i] for i in order])
    packed = np.concatenate([s.tokens for s in samples])
    np.testing.assert_array_equal(packed, stream[:len(packed)])
    assert len(stream) - len(packed) < seq
    for s, segs in zip(samples, sequences):
        assert s.cu_seqlens[0] == 0 and s.cu_seqlens[-1] == seq
        assert list(np.diff(s.cu_seqlens)) == [e - b for _, b, e in segs]
        starts = set(s.cu_seqlens[:-1].tolist())
        for i in range(seq):
            target_is_doc_start = (i + 1) in starts or i + 1 == seq
            assert s.loss_mask[i] == (0.0 if target_is_doc_start else 1.0)
            if s.loss_mask[i]:
                assert s.labels[i] == s.tokens[i + 1]


def test_long_document_spans_sequences():
    sequences = pack_documents(np.array([10, 150, 5]), np.array([0, 1, 2]), 64)
    assert sequences[0] == [(0, 0, 10), (1, 0, 54)]
    assert sequences[1] == [(1, 54, 118)]
    assert len(sequences) == 2  # the last 37 tokens cannot fill a sequence
