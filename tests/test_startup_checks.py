"""Bad input is found before any process group, said in one line, and never retried: each case exits 2 from
``megaprolong-train --check`` (the sbatch scripts' first step) and from a worker launched directly; a
restarted worker of the same launch exits at once on the recorded error."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SEQ = 256


def dataset(prefix: Path, lengths, vocab=400, tokenizer="aaaa") -> Path:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for n in lengths:
        builder.add_document(np.arange(n, dtype=np.uint16) % 300, [n])
    builder.finalize(f"{prefix}.idx")
    Path(f"{prefix}.json").write_text(json.dumps({"vocab_size": vocab, "tokenizer_sha256": tokenizer * 16}))
    return prefix


def mix(path: Path, domains, seq_length=SEQ) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"seq_length": seq_length, "domains": domains}))
    return path


@pytest.fixture
def data(tmp_path):
    dataset(tmp_path / "books", [900, 700, 400])
    dataset(tmp_path / "web", [120] * 20)
    return tmp_path


GOOD = [{"name": "books", "prefix": "books", "weight": 0.5, "chunk": SEQ}, {"name": "web", "prefix": "web", "weight": 0.5}]


def case(data: Path, problem: str) -> tuple[Path, str]:
    """A mix with one problem, and what the one line must say."""
    domains = [dict(d) for d in GOOD]
    seq_length = SEQ
    if problem == "empty_domain":
        dataset(data / "empty", [])
        domains[1]["prefix"], said = "empty", f"domain web: {data / 'empty'} holds no document"
    elif problem == "shorter_than_a_sequence":
        dataset(data / "few", [50, 60])
        domains[1]["prefix"], said = "few", "is shorter than one sequence of 256 tokens"
    elif problem == "zero_weight":
        domains[1]["weight"], said = 0.0, "domain web: weight 0.0 must be > 0 (weights are normalized"
    elif problem == "negative_weight":
        domains[0]["weight"], said = -0.2, "domain books: weight -0.2 must be > 0"
    elif problem == "seq_length":
        seq_length, said = 512, "the mix's seq_length is 512, train.seq_length is 256"
    elif problem == "vocab":
        dataset(data / "big_vocab", [120] * 20, vocab=1000)
        domains[1]["prefix"], said = "big_vocab", "vocabulary of 1,000 tokens, more than the model's model.vocab_size=512"
    else:  # another tokenizer
        dataset(data / "other_tok", [120] * 20, tokenizer="bbbb")
        domains[1]["prefix"], said = "other_tok", "different tokenizers (books: tokenizer sha256 aaaaaaaaaaaa; web: " \
                                                  "tokenizer sha256 bbbbbbbbbbbb)"
    return mix(data / "mix.yaml", domains, seq_length), said


def train(data: Path, mix_file: Path, *extra, env=None, check=True):
    cmd = [sys.executable, "-m", "megaprolong.train", *(["--check"] if check else []),
           "--config", str(REPO / "examples/tiny_stage1.yaml"), f"data.mix={mix_file}", f"data.root={data}",
           "data.prepare=", f"train.seq_length={SEQ}", "model.max_position_embeddings=512", "parallel.tp=1",
           "parallel.sequence_parallel=false", f"checkpoint.dir={data / 'ckpt'}", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, **(env or {})})


PROBLEMS = ["empty_domain", "shorter_than_a_sequence", "zero_weight", "negative_weight", "seq_length", "vocab",
            "tokenizer"]


@pytest.mark.parametrize("problem", PROBLEMS)
def test_each_bad_data_case_is_one_line_and_exit_2(data, problem):
    mix_file, said = case(data, problem)
    out = train(data, mix_file)
    lines = [line for line in out.stderr.splitlines() if line.startswith("megaprolong-train:")]
    assert out.returncode == 2 and len(lines) == 1 and said in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_a_good_mix_passes_the_check(data):
    out = train(data, mix(data / "mix.yaml", GOOD))
    assert out.returncode == 0 and "start-up checks passed" in out.stdout, out.stderr[-2000:]


def test_a_restart_in_the_same_launch_exits_at_once_on_the_recorded_error(data):
    """A worker of a torchrun launch finds bad data: rank 0 records it; the workers torchrun then starts
    again in that launch exit at once naming it, without checking again; another launch checks afresh."""
    mix_file, said = case(data, "zero_weight")
    launch = {"TORCHELASTIC_RUN_ID": "launch-1", "RANK": "0"}
    first = train(data, mix_file, env=launch, check=False)
    assert first.returncode == 2 and said in first.stderr
    again = train(data, mix(data / "mix.yaml", GOOD), env=launch, check=False)  # even if the data changed since
    assert again.returncode == 2 and said in again.stderr and "not retrying" in again.stderr
    fixed = train(data, mix(data / "mix.yaml", GOOD), env={"TORCHELASTIC_RUN_ID": "launch-2", "RANK": "0"})
    assert fixed.returncode == 0, fixed.stderr[-2000:]
