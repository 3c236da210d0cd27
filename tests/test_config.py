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
