import subprocess
import sys
from pathlib import Path

import pytest

from megaprolong.config import load_config
from megaprolong.training.config import Config
from megaprolong.training.plan import calibrated_mfu, plan

REPO = Path(__file__).resolve().parent.parent


def test_512k_recipe_fits_8_nodes_of_h100_and_matches_prolong_throughput():
    cfg = load_config(Config, REPO / "examples" / "prolong_512k.yaml")
    own, options = plan(cfg, nodes=8, gpus_per_node=8, gpu_mem_gib=80)
    assert own.total_gib < 0.92 * 80
    # ProLong's stage 2: 12.2K H100-hours for 20B tokens, ~0.48K tokens/s/GPU (ProLong's report)
    assert abs(own.tokens_per_s_per_gpu - 480) / 480 < 0.25
    assert options and all(o.total_gib < 0.92 * 80 and o.tp * o.pp * o.cp * o.dp == 64 for o in options)
    assert 0.1 < calibrated_mfu() < 0.6


def test_layout_that_cannot_fit_is_reported():
    out = subprocess.run([sys.executable, "-m", "megaprolong.cli.plan", "--recipe", str(REPO / "examples/prolong_512k.yaml"),
                          "--nodes", "2", "parallel.tp=1", "parallel.cp=1", "parallel.sequence_parallel=false"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0
    assert "recipe layout: TP1 PP1 CP1 DP16" in out.stdout and "DOES NOT FIT" in out.stdout
    assert "suggested (fastest that fits" in out.stdout


def test_chunked_loss_bounds_the_logits_estimate():
    chunked = load_config(Config, REPO / "examples" / "prolong_512k.yaml")
    whole = load_config(Config, REPO / "examples" / "prolong_512k.yaml", ["train.loss_chunk_tokens=0"])
    a, _ = plan(chunked, nodes=8, gpus_per_node=8, gpu_mem_gib=80)
    b, _ = plan(whole, nodes=8, gpus_per_node=8, gpu_mem_gib=80)
    # TP8 x CP8 with sequence parallelism: 1,024 local positions gather to 8,192 of the 65,536 local tokens
    assert b.memory_gib["logits"] == 8 * a.memory_gib["logits"]


@pytest.mark.parametrize("family,tied", [("llama", False), ("llama", True), ("qwen2", True), ("qwen3", False)])
def test_the_plans_parameter_count_is_the_models(family, tied):
    """Without pipelining one rank holds the embedding and the LM head (two matrices unless tied): the plan's
    count equals transformers' count of the same model; with TP it is split, with PP the stage's share."""
    import transformers

    from megaprolong.convert.hf import hf_config
    from megaprolong.model.config import ModelConfig
    from megaprolong.model.families import FAMILIES
    from megaprolong.training.plan import params_per_rank

    f = FAMILIES[family]
    m = ModelConfig(num_layers=3, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2,
                    vocab_size=1000, family=family, qkv_bias=f.qkv_bias, qk_norm=f.qk_norm, tie_embeddings=tied)
    config = transformers.AutoConfig.for_model(**hf_config(m, 4096))
    hf = transformers.AutoModelForCausalLM.from_config(config).num_parameters()
    assert params_per_rank(m, tp=1, pp=1) == hf
    assert params_per_rank(m, tp=2, pp=1) == hf / 2
    vocab = m.vocab_size * m.hidden_size  # the first stage of three: one layer and the embedding
    assert params_per_rank(m, tp=1, pp=3) == (hf - (1 if tied else 2) * vocab - m.hidden_size) / 3 + vocab
