"""Attention of the HF-format stages at real lengths without flash-attn: the registered varlen implementation
on a packed SFT row equals transformers' sdpa path (loss and every gradient) and builds no mask; evaluation's
single long prompt goes through sdpa as a causal call without a mask."""

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megaprolong.sft.varlen_attention import NAME, register, segments

LENGTHS = [1500, 37, 2100, 459]  # 4,096 tokens, conversations of very different lengths


def tiny_llama(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    config._attn_implementation = attn
    return LlamaForCausalLM(config)


def packed_row() -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (1, sum(LENGTHS)), generator=g)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    labels = ids.clone()
    labels[0, torch.cumsum(torch.tensor(LENGTHS), 0)[:-1]] = -100  # as the collator: no loss across a boundary
    return {"input_ids": ids, "position_ids": positions, "labels": labels, "use_cache": False}  # as megaprolong-sft


def test_segments_restart_at_position_zero():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [3, 4, 0, 1, 2, 3]])
    assert segments(pos).tolist() == [0, 3, 5, 6, 8, 12]  # a row start counts as a start even mid-conversation


def test_registered_varlen_equals_sdpa_on_a_packed_row_and_builds_no_mask(monkeypatch):
    register()
    from megaprolong.sft import varlen_attention

    seen = []
    original = varlen_attention.varlen_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append(attention_mask)
        return original(module, query, key, value, attention_mask, **kwargs)

    from transformers import AttentionInterface

    AttentionInterface.register(NAME, spy)
    batch = packed_row()
    reference, varlen = tiny_llama("sdpa"), tiny_llama(NAME)
    varlen.load_state_dict(reference.state_dict())
    losses, logits = [], []
    for model in (reference, varlen):
        out = model(**batch)
        out.loss.backward()
        losses.append(out.loss.detach())
        logits.append(out.logits.detach())
    assert seen and all(m is None for m in seen)  # no [L, L] mask reached our attention
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert torch.allclose(logits[0], logits[1], rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(reference.named_parameters(), varlen.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name
    # The packing matters: the same row as one sequence gives other logits.
    whole = copy.deepcopy(batch)
    whole["position_ids"] = torch.arange(sum(LENGTHS))[None]
    with torch.no_grad():
        assert (varlen(**whole).logits - logits[1]).abs().max() > 0.05
    register()


def test_eval_long_prompt_is_causal_sdpa_without_a_mask(monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa_module

    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def record(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        calls.append((attn_mask, is_causal, q.shape[-2], k.shape[-2]))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(sdpa_module.torch.nn.functional, "scaled_dot_product_attention", record)
    model = tiny_llama("sdpa").eval()
    prompt = torch.randint(0, 128, (1, 4096), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False)
    prefill = [c for c in calls if c[2] == 4096]
    assert prefill and all(mask is None and causal for mask, causal, _, _ in prefill)
    decode = [c for c in calls if c[2] == 1]
    assert decode and all(mask is None for mask, _, _, _ in decode)


def test_no_host_transfer_inside_layers_with_the_varlen_implementation():
    """The packed row's layout is built once per micro-batch before the layers (a pre-hook on the model):
    forward and backward (gradient checkpointing: the layers run again) make no Tensor.cpu / .item /
    .tolist / .numpy call inside a decoder layer."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from megaprolong.sft.varlen_attention import prepare_per_batch

    register()
    model = tiny_llama(NAME)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23; the old name is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    prepare_per_batch(model)
    state = {"inside": 0, "calls": []}
    for layer in model.modules():
        if isinstance(layer, LlamaDecoderLayer):
            layer.register_forward_pre_hook(lambda *_: state.update(inside=state["inside"] + 1))
            layer.register_forward_hook(lambda *_: state.update(inside=state["inside"] - 1))
    real = {n: getattr(torch.Tensor, n) for n in ("cpu", "item", "tolist", "numpy")}

    def counting(name):
        def call(tensor, *args, **kwargs):
            if state["inside"]:
                state["calls"].append(name)
            return real[name](tensor, *args, **kwargs)
        return call

    try:
        for name in real:
            setattr(torch.Tensor, name, counting(name))
        model(**packed_row()).loss.backward()
    finally:
        for name, fn in real.items():
            setattr(torch.Tensor, name, fn)
    assert state["calls"] == []
