import pytest

from megaprolong.config import ConfigError, load_config
from megaprolong.training.config import Config, validate


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("model:\n  num_layers: 4\ntrain:\n  steps: 10\noptimizer:\n  lr: 1e-5\n")
    cfg = load_config(Config, f, ["train.steps=3", "parallel.tp=2", "parallel.sequence_parallel=true"])
    assert cfg.model.num_layers == 4 and cfg.train.steps == 3
    assert cfg.parallel.tp == 2 and cfg.parallel.sequence_parallel is True
    assert cfg.optimizer.lr == 1e-5  # YAML 1.1 reads 1e-5 as a string: coerced to float
    assert cfg.model.hidden_size == 4096  # defaults are Llama-3-8B


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"parallel\.tpp"):
        load_config(Config, None, ["parallel.tpp=2"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"train\.steps: expected an integer"):
        load_config(Config, None, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"train\.precision"):
        load_config(Config, None, ["train.precision=fp64"])


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="not found"):
        load_config(Config, "/nonexistent/recipe.yaml")
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(Config, None, ["train.steps"])


@pytest.mark.parametrize("overrides, world, key", [
    (["parallel.tp=3"], 3, "model.num_attention_heads"),
    (["parallel.pp=3"], 3, "model.num_layers"),
    (["parallel.cp=2", "train.seq_length=1030"], 2, "train.seq_length"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "train.seq_length=65537"], 2, "train.seq_length"),
    (["train.global_batch_size=63"], 2, "train.global_batch_size"),
    (["parallel.tp=2"], 3, "world size"),
    (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel"),
    (["model.attention_backend=flash"], 1, "model.attention_backend"),
    # megatron's scheduler would crash after validation: warmup must leave decay steps
    (["optimizer.warmup_fraction=1.0"], 1, "optimizer.warmup_fraction"),
    (["optimizer.warmup_fraction=0.9", "train.steps=2"], 1, "optimizer.warmup_fraction"),
    (["model.attention_kernel=dense"], 1, "model.attention_kernel"),
    # TransformerEngine runs packed sequences under CP with p2p only
    (["model.attention_backend=te", "parallel.cp=2", "parallel.cp_comm_type=a2a"], 2, "parallel.cp_comm_type"),
    (["model.attention_backend=te", "parallel.cp=2", "parallel.cp_comm_type=all_gather"], 2, "parallel.cp_comm_type"),
    (["parallel.cp=2", "parallel.cp_comm_type=p2p"], 2, "parallel.cp_comm_type"),  # the torch backend would ignore it
])
def test_validate_names_offending_keys(overrides, world, key):
    cfg = load_config(Config, None, overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg, world)


def test_te_backend_is_opt_in_and_refused_without_te():
    from megaprolong.model.config import ModelConfig
    from megaprolong.model.llama import attention_backend

    assert attention_backend(ModelConfig()) == "torch"  # auto never picks TE, whatever imports
    validate(load_config(Config, None, ["model.attention_backend=te", "parallel.cp=2"]), 2)  # p2p: accepted
    with pytest.raises(ValueError, match="needs TransformerEngine"):
        attention_backend(ModelConfig(attention_backend="te"))


def test_validate_accepts_prolong_512k_layout():
    cfg = load_config(Config, None, ["parallel.tp=8", "parallel.cp=8", "train.seq_length=524288",
                                     "train.global_batch_size=16", "parallel.sequence_parallel=true"])
    validate(cfg, 64 * 8)


@pytest.mark.parametrize("recipe, world, steps, step_tokens", [
    (f"{base}_{stage}.yaml", 64, steps, tokens) for base in ("prolong", "llama31_8b", "qwen3_8b")
    for stage, steps, tokens in (("64k", 5000, 4_194_304), ("512k", 2500, 8_388_608))])
def test_prolong_recipes_carry_the_reference_numbers(recipe, world, steps, step_tokens):
    from pathlib import Path

    cfg = load_config(Config, Path(__file__).resolve().parent.parent / "examples" / recipe)
    validate(cfg, world)
    t, o = cfg.train, cfg.optimizer
    assert t.steps == steps and t.global_batch_size * t.seq_length == step_tokens
    assert (o.lr, o.min_lr_ratio, o.warmup_fraction, o.beta1, o.beta2, o.eps, o.weight_decay, o.clip_grad) == \
        (1e-5, 0.1, 0.1, 0.9, 0.95, 1e-8, 0.1, 1.0)
    assert cfg.model.rope_base == (8e6 if "64k" in recipe else 1.28e8) and t.precision == "bf16"


def test_help_says_what_every_key_means():
    """--help takes each key's meaning from its dataclass field's comment: none may be missing."""
    from megaprolong.config import describe_keys

    lines = describe_keys(Config)
    assert len(lines) > 40 and all("): " in line for line in lines), [l for l in lines if "): " not in l]
    backend = next(l for l in lines if l.strip().startswith("model.attention_backend"))
    assert "UNVERIFIED" in backend and "p2p" in backend
