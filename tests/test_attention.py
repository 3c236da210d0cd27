"""The attention kernels and the per-micro-batch layout, against a dense reference of varlen semantics.

The reference (test-only, small sizes) is a softmax over a dense mask built from the documented semantics
of a causal varlen flash-attention call: segment i's n queries see its m keys, bottom-right aligned
(query j sees keys 0 .. m - n + j). GPU-only kernels (torch's varlen_attn, flash-attn) are exercised
through stand-ins with their exact signatures and documented semantics, so that what surrounds the call
(cu_seqlens, the causal flag, GQA, scale) is checked here; the real kernels run in
benchmarks/device_check.sh on a GPU.
"""

import functools
import inspect
import sys
import types

import numpy as np
import pytest
import torch

from megaprolong.model.attention import kernels
from megaprolong.model.attention.blockwise import blockwise_causal_attention
from megaprolong.model.attention.layout import AttentionLayout
from megaprolong.model.context_parallel import gathered_positions, padded_lengths, partition_index, rank_major_row


def reference(q, k, v, cu_q, cu_k, scale, causal=True):
    """Dense varlen attention in float64 (bottom-right causal, or full when ``causal`` is False)."""
    outs, heads = [], q.shape[1]
    for qs, qe, ks, ke in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]):
        n, m = int(qe - qs), int(ke - ks)
        qq = q[qs:qe].double().transpose(0, 1)
        kk, vv = (x[ks:ke].double().repeat_interleave(heads // x.shape[1], 1).transpose(0, 1) for x in (k, v))
        scores = qq @ kk.transpose(1, 2) * scale
        if causal:
            visible = torch.arange(m)[None, :] <= (m - n + torch.arange(n))[:, None]
            scores = scores.masked_fill(~visible, float("-inf"))
        outs.append((scores.softmax(-1) @ vv).transpose(0, 1))
    return torch.cat(outs)


def segments(n_q, extra):
    """cu_q, cu_k for segments of n_q queries whose keys start ``extra`` positions earlier."""
    cu_q = np.concatenate([[0], np.cumsum(n_q)])
    cu_k = np.concatenate([[0], np.cumsum(np.add(n_q, extra))])
    return cu_q, cu_k


def qkv(cu_q, cu_k, heads=4, groups=2, dim=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda t, h: torch.randn(int(t), h, dim, generator=g).to(dtype).requires_grad_()  # noqa: E731
    return make(cu_q[-1], heads), make(cu_k[-1], groups), make(cu_k[-1], groups)


def grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad((out.double() * g).sum(), inputs)


@pytest.mark.parametrize("groups", [4, 2, 1])
def test_blockwise_equals_reference_forward_and_backward(groups):
    # offsets 0 and > 0, single-query segments, a prefix much longer than its queries
    cu_q, cu_k = segments([5, 17, 1, 9, 33, 1], [0, 3, 10, 0, 200, 64])
    q, k, v = qkv(cu_q, cu_k, groups=groups)
    out = blockwise_causal_attention(q, k, v, cu_q, cu_k, 0.3)
    ref = reference(q, k, v, cu_q, cu_k, 0.3)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)
    for got, want in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=5e-6)


def test_blockwise_bf16_within_bf16_tolerance():
    cu_q, cu_k = segments([64, 40], [0, 300])
    q, k, v = qkv(cu_q, cu_k, dtype=torch.bfloat16)
    out = blockwise_causal_attention(q, k, v, cu_q, cu_k, 0.25)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference(q, k, v, cu_q, cu_k, 0.25), rtol=0, atol=2e-2)


def test_reference_distinguishes_causal_from_full():
    """The stand-ins below rely on the reference telling causal from non-causal attention."""
    cu_q, cu_k = segments([8], [4])
    q, k, v = qkv(cu_q, cu_k)
    assert not torch.allclose(reference(q, k, v, cu_q, cu_k, 0.25), reference(q, k, v, cu_q, cu_k, 0.25, False))


def zigzag_case(lengths, cp, seed=0):
    """Global q/k/v of a packed sequence and its padded boundaries."""
    padded = padded_lengths(np.array(lengths), cp)
    cu = np.concatenate([[0], np.cumsum(padded)])
    q, k, v = qkv(cu, cu, seed=seed)
    return cu, q, k, v


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_layout_gives_each_rank_the_global_attention_of_its_rows(cp):
    """Every CP rank's varlen problem (its zigzag queries, the gathered K/V picked by kv_index) gives
    exactly the rows of the whole-sequence attention that it holds; > 4K tokens, offsets > 0."""
    cu, q, k, v = zigzag_case([3001, 17, 1, 650, 1200], cp)
    assert cu[-1] >= 4096
    whole = blockwise_causal_attention(q, k, v, cu, cu, 0.25)
    rows = [torch.from_numpy(partition_index(cu, cp, r)) for r in range(cp)]
    gathered = [x[torch.from_numpy(gathered_positions(cu, cp))] for x in (k, v)]  # what the CP all-gather returns
    for r in range(cp):
        layout = AttentionLayout.build(cu, cp, r, torch.device("cpu"))
        kr, vr = (x if layout.kv_index is None else x.index_select(0, layout.kv_index) for x in gathered)
        out = blockwise_causal_attention(q[rows[r]], kr, vr, layout.cu_q, layout.cu_k, 0.25)
        torch.testing.assert_close(out, whole[rows[r]], rtol=0, atol=2e-6)
    if cp > 1:  # offsets > 0: some query segment sees more keys than it has queries
        assert (np.diff(layout.cu_k) > np.diff(layout.cu_q)).any()


def test_rank_major_rows_invert_the_partition():
    cu = np.concatenate([[0], np.cumsum(padded_lengths(np.array([9, 1, 30, 4]), 4))])
    np.testing.assert_array_equal(gathered_positions(cu, 4)[rank_major_row(cu, 4)], np.arange(cu[-1]))


# ---- the GPU kernels' calling conventions, through stand-ins with their exact signatures ----------------

def check_max_lengths(cu_q, cu_k, max_q, max_k):
    """The kernels size their work by max_q / max_k: the longest query and key segments, exactly (a kernel
    given a max_k below a segment's keys reads past it or drops keys; the stand-ins refuse any other value)."""
    want_q, want_k = int(np.diff(cu_q.numpy()).max()), int(np.diff(cu_k.numpy()).max())
    assert (max_q, max_k) == (want_q, want_k), f"max_q, max_k = {max_q}, {max_k}; the segments need {want_q}, {want_k}"


def varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
    check_max_lengths(cu_seq_q, cu_seq_k, max_q, max_k)
    return reference(query, key, value, cu_seq_q.numpy(), cu_seq_k.numpy(), query.shape[-1] ** -0.5, is_causal)


def varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1)):
    check_max_lengths(cu_seq_q, cu_seq_k, max_q, max_k)
    is_causal = window_size == (-1, 0)  # as torch's source: a list [-1, 0] is not causal
    return reference(query, key, value, cu_seq_q.numpy(), cu_seq_k.numpy(), scale, is_causal)


def varlen_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False):
    if key.shape[1] != query.shape[1] and not enable_gqa:
        raise ValueError("Try setting enable_gqa=True for GQA.")  # as torch 2.12+
    return varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size)


def spy_with_signature_of(real, recorder):
    """A function with ``real``'s exact signature that records its keyword arguments and computes the
    documented semantics of that signature's torch version."""
    params = inspect.signature(real).parameters
    semantics = varlen_2_12 if "enable_gqa" in params else varlen_2_11 if "window_size" in params else varlen_2_10

    @functools.wraps(real)
    def spy(*args, **kwargs):
        recorder.append(kwargs)
        return semantics(*args, **kwargs)
    return spy


def run_layout(run, cp=2, rank=1, groups=2, scale=None):
    cu, q, k, v = zigzag_case([300, 5, 77], cp)
    layout = AttentionLayout.build(cu, cp, rank, torch.device("cpu"))
    rows = torch.from_numpy(partition_index(cu, cp, rank))
    gathered = [x[torch.from_numpy(gathered_positions(cu, cp))] for x in (k, v)]
    k, v = (x.index_select(0, layout.kv_index)[:, :groups] for x in gathered)
    scale = scale or q.shape[-1] ** -0.5
    return run(q[rows], k, v, layout, scale), blockwise_causal_attention(q[rows], k, v, layout.cu_q, layout.cu_k, scale)


@pytest.mark.parametrize("fake", [varlen_2_10, varlen_2_11, varlen_2_12])
def test_torch_varlen_call_is_causal_on_every_signature(fake, monkeypatch):
    import torch.nn.attention.varlen as varlen

    monkeypatch.setattr(varlen, "varlen_attn", fake)
    got, want = run_layout(kernels._torch_varlen)
    torch.testing.assert_close(got.float(), want, rtol=0, atol=2e-6)


def test_torch_varlen_call_on_the_installed_signature(monkeypatch):
    """The installed torch's own varlen_attn signature (the pin, 2.14; the GPU check's machine, 2.11): causal as
    the tuple (-1, 0), scale passed, GQA flagged where the signature has the flag (2.12+)."""
    import torch.nn.attention.varlen as varlen

    calls = []
    monkeypatch.setattr(varlen, "varlen_attn", spy_with_signature_of(varlen.varlen_attn, calls))
    got, want = run_layout(kernels._torch_varlen, scale=0.2)
    torch.testing.assert_close(got.float(), want, rtol=0, atol=2e-6)
    params = inspect.signature(varlen.varlen_attn).parameters
    assert "window_size" in params  # torch >= 2.11
    assert calls == [{"window_size": (-1, 0), "scale": 0.2, **({"enable_gqa": True} if "enable_gqa" in params else {})}]
    assert type(calls[0]["window_size"]) is tuple


def test_a_list_window_would_be_non_causal():
    """The stand-in keeps torch 2.11's pitfall, so the tests above would catch a list."""
    cu_q, cu_k = segments([6], [3])
    q, k, v = qkv(cu_q, cu_k, groups=4)
    args = (q, k, v, torch.from_numpy(cu_q), torch.from_numpy(cu_k), 6, 9)
    assert not torch.allclose(varlen_2_11(*args, scale=0.25, window_size=[-1, 0]),
                              varlen_2_11(*args, scale=0.25, window_size=(-1, 0)))


def test_flash_attn_call(monkeypatch):
    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, **_):
        check_max_lengths(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        return reference(q, k, v, cu_seqlens_q.numpy(), cu_seqlens_k.numpy(), softmax_scale, causal)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func,
                                                                         __version__="2.7.4"))
    got, want = run_layout(kernels._flash_attn, cp=4, rank=0, scale=0.3)
    torch.testing.assert_close(got.float(), want, rtol=0, atol=2e-6)


def test_sdpa_kernel_equals_blockwise():
    got, want = run_layout(kernels._sdpa, cp=2, rank=0)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


def test_kernel_selection():
    assert kernels.select_kernel("auto", "cpu", torch.float32).name == "cpu-blockwise"
    assert kernels.select_kernel("sdpa", "cpu", torch.float32).name == "sdpa"
    with pytest.raises(ValueError, match="needs CUDA"):
        kernels.select_kernel("torch-varlen", "cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="CPU only"):
        kernels.select_kernel("cpu-blockwise", "cuda", torch.bfloat16)
    with pytest.raises(ValueError, match="expected one of"):
        kernels.select_kernel("dense", "cpu", torch.float32)


def test_a_wrong_max_k_is_caught_by_the_stand_ins(monkeypatch):
    """Mutation: the chunk's length passed as max_k instead of its prefix's must fail."""
    import dataclasses

    import torch.nn.attention.varlen as varlen

    monkeypatch.setattr(varlen, "varlen_attn", varlen_2_12)
    wrong = lambda q, k, v, layout, scale: kernels._torch_varlen(  # noqa: E731
        q, k, v, dataclasses.replace(layout, max_k=layout.max_q), scale)
    with pytest.raises(AssertionError, match="max_q, max_k"):
        run_layout(wrong)


def test_auto_is_torch_varlen_on_gpus_even_with_flash_attn_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=None,
                                                                         __version__="2.7.4"))
    kernels.select_kernel.cache_clear()
    try:
        assert kernels.select_kernel("auto", "cuda", torch.bfloat16).name == "torch-varlen"
        assert kernels.select_kernel("flash-attn", "cuda", torch.bfloat16).name == "flash-attn"  # by name only
        monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=None,
                                                                             __version__="2.0.9"))
        kernels.select_kernel.cache_clear()
        with pytest.raises(ValueError, match="older than 2.1: its causal mask is aligned top-left"):
            kernels.select_kernel("flash-attn", "cuda", torch.bfloat16)
    finally:
        kernels.select_kernel.cache_clear()


def top_left(q, k, v, layout, scale):
    """A kernel that aligns the causal mask top-left (flash-attn < 2.1's convention)."""
    k, v = kernels.expand_kv(k, q.shape[1], 1), kernels.expand_kv(v, q.shape[1], 1)
    out = []
    for qs, qe, ks, ke in zip(layout.cu_q[:-1], layout.cu_q[1:], layout.cu_k[:-1], layout.cu_k[1:]):
        qc, kc, vc = (x.transpose(0, 1)[None] for x in (q[qs:qe], k[ks:ke], v[ks:ke]))
        n, m = qe - qs, ke - ks
        mask = torch.ones(n, m, dtype=torch.bool).tril()  # query i sees keys 0..i: top-left
        out.append(torch.nn.functional.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scale)[0]
                   .transpose(0, 1))
    return torch.cat(out)


def one_key_short(q, k, v, layout, scale):
    """The blockwise kernel with every segment's keys starting one position late (an off-by-one offset)."""
    cu_k = layout.cu_k.copy()
    cu_k[:-1] += np.where(np.diff(layout.cu_k) > np.diff(layout.cu_q), 1, 0)
    return blockwise_causal_attention(q, k, v, layout.cu_q, cu_k, scale)


def test_the_self_test_passes_real_kernels_and_refuses_wrong_ones():
    cpu = torch.device("cpu")
    for name in ("cpu-blockwise", "sdpa"):
        kernel = kernels.select_kernel(name, "cpu", torch.float32)
        assert kernels.self_test(kernel, cpu, torch.float32, heads=4, groups=2, dim=16) < 1e-5
    layout = kernels.self_test_layout(cpu)
    assert (np.diff(layout.cu_k) > np.diff(layout.cu_q)).any()  # it has offset segments
    for wrong in (top_left, one_key_short):
        with pytest.raises(kernels.KernelMismatch, match=r"fails its self-test .*\(out [0-9.e+-]+, dq [0-9.e+-]+"):
            kernels.self_test(kernels.Kernel("wrong", "a mutation", wrong), cpu, torch.float32, 4, 2, 16)
