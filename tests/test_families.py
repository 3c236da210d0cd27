"""Model families beyond Llama-3-8B, from tiny random models built with transformers' own config classes:
Llama-3.1 (RoPE scaling "llama3"), Llama-3.2 (tied embeddings, scaling x32), Qwen2.5 (QKV biases, tied),
Qwen3 (QK RMSNorm, head_dim != hidden / heads). HF -> megatron -> HF is bitwise; megatron's logits under
TP2, PP2 and TP2xPP2 equal transformers'; Qwen-shaped models train under TP2+SP x CP2 and PP2 exactly as
on one rank; a stage start's RoPE policy (replace by a plain base, or keep the scaling) is exported so that
transformers reproduces megatron's logits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import torchrun
from test_convert import convert
from test_parallel_parity import assert_matches

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=16384, rms_norm_eps=1e-6)
LLAMA3 = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def family_config(name: str):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    if name == "llama3.1":
        return LlamaConfig(**SMALL, rope_parameters={"rope_theta": 10000.0, "factor": 8.0, **LLAMA3})
    if name == "llama3.2":
        return LlamaConfig(**SMALL, tie_word_embeddings=True,
                           rope_parameters={"rope_theta": 10000.0, "factor": 32.0, **LLAMA3})
    if name == "qwen2.5":
        return Qwen2Config(**SMALL, tie_word_embeddings=True, rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    if name == "qwen3":
        return Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=False,
                           rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    raise KeyError(name)


FAMILY_NAMES = ["llama3.1", "llama3.2", "qwen2.5", "qwen3"]


def randomized(config):
    """A model of ``config`` whose norms and biases are random too (a swapped or dropped one cannot pass) and
    whose queries and keys are large enough that attention depends on position (so does a RoPE mistake)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias"):
                p.normal_(0, 0.5)
            elif n.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0, 0.3)
    return model


def tiny_family(path: Path, name: str) -> Path:
    randomized(family_config(name)).save_pretrained(path, max_shard_size="200KB")
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each family's tiny model converted (and verified against transformers, 1e-4) for TP2 x PP2."""
    models = {}
    for name in FAMILY_NAMES:
        d = tmp_path_factory.mktemp(name.replace(".", "_"))
        hf = tiny_family(d / "hf", name)
        out = convert("hf-to-mcore", "--hf", hf, "--out", d / "mcore", "--tp", 2, "--pp", 2, "--verify",
                      "--tolerance", "1e-4")
        assert out.returncode == 0, out.stderr[-3000:]
        assert json.loads(out.stdout.strip().splitlines()[-1])["ok"]
        models[name] = d, hf
    return models


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    found = {}
    for f in sorted(folder.glob("*.safetensors")):
        found.update(load_file(f))
    return found


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_round_trip_is_bitwise_and_transformers_reproduces_the_model(converted, name):
    from transformers import AutoModelForCausalLM

    d, hf = converted[name]
    out = convert("mcore-to-hf", "--ckpt", d / "mcore", "--out", d / "back")  # no --dtype: the checkpoint's own
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = _tensors(hf), _tensors(d / "back")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float32 and torch.equal(a[k], b[k]), k
    original = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    exported = AutoModelForCausalLM.from_pretrained(d / "back", dtype=torch.float32).eval()
    assert type(exported) is type(original)
    assert exported.config.tie_word_embeddings == original.config.tie_word_embeddings
    assert exported.config.rope_parameters == pytest.approx(original.config.rope_parameters)
    ids = torch.randint(0, 512, (1, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, original(ids).logits)


@pytest.mark.multirank
@pytest.mark.parametrize("layout", [(2, ["parallel.tp=2"]), (2, ["parallel.pp=2"]),
                                    (4, ["parallel.tp=2", "parallel.pp=2"])], ids=["tp2", "pp2", "tp2_pp2"])
def test_megatron_logits_under_tp_pp_equal_transformers(converted, layout):
    nproc, overrides = layout
    pairs = [str(p) for d, hf in converted.values() for p in (hf, d / "mcore")]
    out = torchrun("hf_logits.py", nproc, *pairs, *overrides, timeout=400)
    for name, (_, hf) in converted.items():
        assert f"HF_LOGITS_OK {hf}" in out, name


@pytest.mark.multirank
@pytest.mark.parametrize("layout", [(2, ["parallel.cp=2"]),
                                    (4, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.cp=2"])],
                         ids=["cp2", "tp2_sp_cp2"])
def test_logits_through_the_packed_training_path_equal_transformers(converted, layout):
    """Llama-3.1 (RoPE scaling) and Qwen3 (QK norm, own head width) through the path training takes: packed
    documents, per-document CP padding and zigzag split, our attention with RoPE rows from the model's table;
    each document's logits equal transformers' on that document alone."""
    nproc, overrides = layout
    chosen = {name: converted[name] for name in ("llama3.1", "qwen3")}
    pairs = [str(p) for d, hf in chosen.values() for p in (hf, d / "mcore")]
    out = torchrun("hf_logits.py", nproc, *pairs, "packed=1", *overrides, timeout=400)
    for name, (_, hf) in chosen.items():
        assert f"HF_LOGITS_OK {hf} packed" in out, name


def test_rope_scaling_changes_the_logits():
    """The scaling is not a no-op at these shapes: Llama-3.1 without it computes other logits (so the logit
    tests above would catch a dropped scaling)."""
    scaled = randomized(family_config("llama3.1")).eval()
    config = family_config("llama3.1")
    config.rope_parameters = {"rope_theta": 10000.0, "rope_type": "default"}
    plain = randomized(config).eval()
    plain.load_state_dict(scaled.state_dict())
    ids = torch.randint(0, 512, (1, 33), generator=torch.Generator().manual_seed(3))  # hf_logits.py's length
    with torch.no_grad():
        assert (scaled(ids).logits - plain(ids).logits).abs().max() > 1e-2  # 100x the tolerance of those tests


# Qwen-shaped features on the parity worker's tiny model: the same 3 steps under TP2+SP x CP2 and PP2 as on 1 rank
QWEN_SHAPES = {"qwen3": ["model.family=qwen3", "model.qk_norm=true", "model.kv_channels=32"],
               "qwen2.5": ["model.family=qwen2", "model.qkv_bias=true", "model.tie_embeddings=true"]}
PARITY_LAYOUTS = {"tp2_sp_cp2": (4, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.cp=2"]),
                  "pp2": (2, ["parallel.pp=2"])}


@pytest.fixture(scope="module", params=list(QWEN_SHAPES))
def qwen_reference(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"parity_{request.param.replace('.', '_')}")
    torchrun("parity.py", 1, str(d / "ref.pt"), str(d / "init.pt"), *QWEN_SHAPES[request.param])
    return request.param, d, torch.load(d / "ref.pt")


@pytest.mark.multirank
@pytest.mark.parametrize("layout", PARITY_LAYOUTS)
def test_qwen_shaped_layouts_match_single_rank(qwen_reference, layout):
    name, d, ref = qwen_reference
    nproc, overrides = PARITY_LAYOUTS[layout]
    torchrun("parity.py", nproc, str(d / f"{layout}.pt"), str(d / "init.pt"), *QWEN_SHAPES[name], *overrides)
    got = torch.load(d / f"{layout}.pt")
    feature = "q_layernorm" if name == "qwen3" else "linear_qkv.bias"
    assert any(feature in k for k in ref["grads"])  # the feature is in the model that matched
    assert_matches(got, ref, torch.load(d / "init.pt"))


@pytest.fixture(scope="module")
def llama31(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama31_stage")
    hf = tiny_family(d / "hf", "llama3.1")
    out = convert("hf-to-mcore", "--hf", hf, "--out", d / "mcore")
    assert out.returncode == 0, out.stderr[-3000:]
    return d


# A stage's RoPE policy: replace the base model's scaling by a plain base (ProLong's), or keep it.
ROPE_POLICIES = {
    "replace": (["model.rope_scaling=none", "model.rope_base=8000000.0"], {"rope_type": "default", "rope_theta": 8e6}),
    "keep": (["model.rope_scaling=llama3", "model.rope_scaling_factor=8.0", "model.rope_base=10000.0"],
             {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}),
}


@pytest.mark.multirank
def test_stage_start_rope_policy_is_exported_exactly(llama31, tmp_path):
    """A 2-step stage start (TP=2) from the converted Llama-3.1 checkpoint under each RoPE policy; each
    exported model, loaded by transformers, gives megatron's logits of its trained checkpoint."""
    from megaprolong.convert.hf import HFCheckpoint, model_config_from_hf

    m = model_config_from_hf(HFCheckpoint(llama31 / "hf").config)
    model = [f"model.{k}={json.dumps(getattr(m, k))}" for k in ("num_layers", "hidden_size", "ffn_hidden_size",
                                                                   "num_attention_heads", "num_query_groups",
                                                                   "vocab_size", "norm_eps")]
    pairs = []
    for policy, (overrides, exported_rope) in ROPE_POLICIES.items():
        run = tmp_path / policy
        args = ["--config", str(REPO / "examples/tiny_stage1.yaml"), f"data.root={llama31 / 'data'}",  # built once
                f"checkpoint.load={llama31 / 'mcore'}", f"checkpoint.dir={run / 'ckpt'}", "checkpoint.resume=none",
                f"logging.metrics_file={run / 'metrics.jsonl'}", "train.steps=2", "train.global_batch_size=4",
                "train.micro_batch_size=1", *model, *overrides]
        log = torchrun("megaprolong.train", 2, *args, timeout=400)
        assert ("kept from the checkpoint" in log) == (policy == "keep"), log[-2000:]
        out = convert("mcore-to-hf", "--ckpt", run / "ckpt", "--out", run / "hf")
        assert out.returncode == 0, out.stderr[-3000:]
        rope = json.loads((run / "hf" / "config.json").read_text())["rope_parameters"]
        assert {k: rope[k] for k in exported_rope} == exported_rope, policy
        pairs += [str(run / "hf"), str(run / "ckpt")]
    out = torchrun("hf_logits.py", 2, *pairs, "parallel.tp=2")
    assert all(f"HF_LOGITS_OK {hf}" in out for hf in pairs[::2]), out[-2000:]


@pytest.mark.parametrize("name", ["qwen3", "llama3.2"])
def test_eval_runs_on_the_family(tmp_path, tiny_tokenizer, name):
    import shutil

    model = tiny_family(tmp_path / "model", name)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tiny_tokenizer) / f, model / f)
    out = subprocess.run([sys.executable, "-m", "megaprolong.eval", "--model", str(model), "--tasks", "json_kv,niah_single",
                          "--lengths", "1024", "--samples", "2", "--out", str(tmp_path / "eval")], capture_output=True,
                         text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    scores = json.loads((tmp_path / "eval" / "results.json").read_text())["scores"]
    assert set(scores) == {"json_kv", "niah_single"} and all("1024" in v for v in scores.values())
