import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    config.addinivalue_line("markers", "multirank: launches several gloo ranks with torchrun (slow, runs in CI)")


import pytest


@pytest.fixture(scope="session")
def tiny_corpus():
    from megaprolong.data.tiny import synthetic_corpus

    return synthetic_corpus(n_docs=120, seed=3)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, tiny_corpus):
    """A byte-level BPE tokenizer directory trained on the tiny corpus (no downloads)."""
    from megaprolong.data.tiny import train_tokenizer

    return train_tokenizer([d["text"] for d in tiny_corpus], tmp_path_factory.mktemp("tok"), vocab_size=400).parent


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, tiny_tokenizer):
    """A tiny random HF Llama with the tiny tokenizer (RoPE base of a 512K-stage model), as a folder."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_chat_model")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                 rope_theta=1.28e8, tie_word_embeddings=False)).save_pretrained(out)
    for f in Path(tiny_tokenizer).iterdir():
        shutil.copy(f, out / f.name)
    return out
