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
])
def test_validate_names_offending_keys(overrides, world, key):
    cfg = load_config(Config, None, overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg, world)


def test_validate_accepts_prolong_512k_layout():
    cfg = load_config(Config, None, ["parallel.tp=8", "parallel.cp=8", "train.seq_length=524288",
                                     "train.global_batch_size=16", "parallel.sequence_parallel=true"])
    validate(cfg, 64 * 8)


@pytest.mark.parametrize("recipe, world, steps, step_tokens", [("prolong_64k.yaml", 64, 5000, 4_194_304),
                                                               ("prolong_512k.yaml", 64, 2500, 8_388_608)])
def test_prolong_recipes_carry_the_reference_numbers(recipe, world, steps, step_tokens):
    from pathlib import Path

    cfg = load_config(Config, Path(__file__).resolve().parent.parent / "examples" / recipe)
    validate(cfg, world)
    t, o = cfg.train, cfg.optimizer
    assert t.steps == steps and t.global_batch_size * t.seq_length == step_tokens
    assert (o.lr, o.min_lr_ratio, o.warmup_fraction, o.beta1, o.beta2, o.eps, o.weight_decay, o.clip_grad) == \
        (1e-5, 0.1, 0.1, 0.9, 0.95, 1e-8, 0.1, 1.0)
    assert cfg.model.rope_base == (8e6 if "64k" in recipe else 1.28e8) and t.precision == "bf16"
