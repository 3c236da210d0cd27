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
