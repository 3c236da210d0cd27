"""65,536-token sequences under context parallelism equal the 1-rank run (fp32, CPU, gloo).

A tiny model (1 layer, hidden 32, GQA 2:1) so that attention over the long sequence dominates: per step one
sequence that is a single 64K document and one of many uneven documents (up to 26K tokens each). Losses,
grad norms, gradients and the updated parameters must equal the 1-rank run's; CP=2 and CP=4 ranks each
compute only their zigzag share.
"""

import pytest
import torch

from launch import torchrun
from test_parallel_parity import assert_matches

pytestmark = pytest.mark.multirank

SEQ_64K = ["data=long", "train.seq_length=65536", "train.global_batch_size=2", "train.steps=1",
           "model.num_layers=1", "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_attention_heads=2",
           "model.num_query_groups=1"]


@pytest.fixture(scope="module")
def reference_64k(tmp_path_factory):
    d = tmp_path_factory.mktemp("long_context")
    torchrun("parity.py", 1, str(d / "ref.pt"), str(d / "init.pt"), *SEQ_64K, timeout=300)
    return d, torch.load(d / "ref.pt")


@pytest.mark.parametrize("cp", [2, 4])
def test_64k_under_context_parallelism_matches_single_rank(reference_64k, cp):
    d, ref = reference_64k
    torchrun("parity.py", cp, str(d / f"cp{cp}.pt"), str(d / "init.pt"), *SEQ_64K, f"parallel.cp={cp}", timeout=300)
    assert_matches(torch.load(d / f"cp{cp}.pt"), ref, torch.load(d / "init.pt"))


def test_one_rope_table_and_no_host_transfer_inside_layers():
    """40 micro-batches whose largest documents all differ: one RoPE table alive (megatron's per-length cache
    empty); a packed forward makes no host transfer inside a layer (see tests/workers/rope_and_syncs.py)."""
    assert "ROPE_AND_SYNCS_OK" in torchrun("rope_and_syncs.py", 1, timeout=300)
