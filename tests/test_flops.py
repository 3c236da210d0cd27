import numpy as np

from megaprolong.model.config import ModelConfig
from megaprolong.training.flops import forward_flops


def test_attention_flops_counted_per_document():
    m = ModelConfig()  # Llama-3-8B
    one = forward_flops(m, np.array([65536]))
    eight = forward_flops(m, np.array([8192] * 8))
    attn_one = m.num_layers * 4 * m.num_attention_heads * m.head_dim * 65536 * 65537 / 2
    attn_eight = m.num_layers * 4 * m.num_attention_heads * m.head_dim * 8 * 8192 * 8193 / 2
    np.testing.assert_allclose(one - eight, attn_one - attn_eight, rtol=1e-12)
    # dense part: ~2 x (parameters) per token for Llama-3-8B (8.0e9 parameters incl. embeddings)
    dense_per_token = (eight - attn_eight) / 65536
    assert 2 * 6.9e9 < dense_per_token < 2 * 8.1e9
