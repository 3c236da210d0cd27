import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    config.addinivalue_line("markers", "multirank: launches several gloo ranks with torchrun (slow, runs in CI)")



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


# The tiny pipeline (tests/test_pipeline.py, and the Slurm run that must equal it in tests/test_slurm.py)

def pipeline_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "megaprolong.pipeline", *map(str, args)], capture_output=True,
                          text=True, timeout=900, cwd=cwd)


def variant(tmp_path: Path, source: str, edit) -> Path:
    """A copy of an example pipeline with ``edit(dict)`` applied; its relative paths made absolute."""
    data = yaml.safe_load((REPO / "examples" / source).read_text())
    base = REPO / "examples"

    def absolute(p):
        return p if p is None or "{raw}" in p or Path(p).is_absolute() else str((base / p).resolve())

    data["root"] = str(tmp_path / "root")
    data["base_model"] = absolute(data.get("base_model"))
    for d in data.get("data", {}).values():
        d["mix"] = absolute(d["mix"])
        for inputs in d["domains"].values():
            inputs["input"] = [absolute(p) for p in inputs["input"]]
    for s in data["stages"]:
        s["recipe"], s["mix"] = absolute(s["recipe"]), absolute(s.get("mix"))
    if data.get("sft"):
        data["sft"]["recipe"], data["sft"]["data"] = absolute(data["sft"]["recipe"]), absolute(data["sft"].get("data"))
    edit(data)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


STAGE2_STEPS = 60  # long enough that the Slurm test's stage-2 job is cancelled mid-run, not after its end


def longer_stage2(data: dict) -> None:
    data["stages"][1]["overrides"] = [f"train.steps={STAGE2_STEPS}"]


@pytest.fixture(scope="session")
def local_tiny(tmp_path_factory):
    """The tiny pipeline (stage 2 longer), uninterrupted, on this machine (run --local): (yaml, root, log)."""
    folder = tmp_path_factory.mktemp("pipeline_local")
    path = variant(folder, "pipeline_tiny.yaml", longer_stage2)
    root = folder / "root"
    out = pipeline_cli("run", path, "--local")
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    return path, root, out.stdout
