"""The console scripts: help, clear errors, and a real 2-rank TP training run from the CLI."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch import torchrun

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


def script(name):
    path = shutil.which(name, path=str(BIN))
    if path is None:
        pytest.skip(f"{name} not installed (pip install -e .)")
    return path


def test_train_help_lists_config_keys():
    out = subprocess.run([script("megaprolong-train"), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for key in ("parallel.tp", "parallel.cp", "train.global_batch_size", "optimizer.lr", "data.prefix"):
        assert key in out.stdout


def test_train_config_error_exits_2(tmp_path):
    out = subprocess.run([script("megaprolong-train"), "parallel.tpp=2"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "parallel.tpp" in out.stderr


@pytest.mark.parametrize("name,keys", [("megaprolong-sft", ["train.global_batch_tokens", "data.mds", "--strict"]),
                                       ("megaprolong-eval", ["--tasks", "--lengths", "--ppl-data", "compare"])])
def test_sft_and_eval_help(name, keys):
    out = subprocess.run([script(name), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and all(k in out.stdout for k in keys)
    bad = subprocess.run([script(name)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "required" in bad.stderr  # no model: a clear message, not a traceback


def test_convert_help():
    out = subprocess.run([script("megaprolong-convert"), "hf-to-mcore", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--verify" in out.stdout and "--rope-base" in out.stdout


def test_preprocess_help():
    out = subprocess.run([script("megaprolong-preprocess"), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--group-by" in out.stdout and "--skip-bad" in out.stdout


@pytest.mark.multirank
def test_tiny_recipe_trains_with_tp2(tmp_path, tiny_corpus, tiny_tokenizer):
    from megaprolong.data.preprocess import PreprocessConfig, preprocess
    from megaprolong.data.tiny import write_jsonl

    src = write_jsonl(tiny_corpus, tmp_path / "c.jsonl")
    preprocess(PreprocessConfig(inputs=[str(src)], tokenizer=str(tiny_tokenizer),
                                output_prefix=str(tmp_path / "d"), quiet=True))
    metrics = tmp_path / "m.jsonl"
    out = torchrun("megaprolong.train", 2, "--config", str(REPO / "examples/tiny_stage1.yaml"),
                   "data.mix=", "data.prepare=", f"data.prefix={tmp_path / 'd'}", "train.steps=12",
                   f"checkpoint.dir={tmp_path / 'ckpt'}", f"logging.metrics_file={metrics}")
    # the step line: time stamp, tool and rank, ms/step, tokens so far, tokens/s, TFLOPS, peak memory, ETA
    import re

    line = next(l for l in out.splitlines() if "step     4/12" in l)
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[train r0\] step     4/12 \| loss \d+\.\d{4} \| grad norm "
                    r"[\d.]+ \| lr [\d.e+-]+ \| [\d,]+ ms \| 4\.1K tokens \| [\d,]+ tok/s \| [\d.]+ TFLOPS/GPU \| "
                    r"mem \d+\.\d\d GiB \| data [\d.]+ s \| ETA \d+m\d\ds$", line), line
    assert "MFU" not in line  # no known peak on a CPU
    assert not [l for l in out.splitlines() if "[train r1]" in l]  # one rank speaks
    rows = [json.loads(l) for l in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert all({"loss", "grad_norm", "lr", "tokens_per_s", "tflops_per_gpu", "domain_loss", "tokens_seen",
                "peak_memory_bytes", "step_time_s"} <= r.keys() for r in rows)
    assert [r["tokens_seen"] for r in rows] == [1024 * s for s in range(1, 13)]  # 8 sequences x 128 tokens per step
    assert (tmp_path / "ckpt" / "step_00000012" / "megaprolong.json").exists()
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0, "tiny model must learn the synthetic corpus"


def test_bad_layout_fails_before_any_process_group(tmp_path):
    import os

    env = dict(os.environ, WORLD_SIZE="2")
    out = subprocess.run([script("megaprolong-train"), "--config", str(REPO / "examples/tiny_stage1.yaml"),
                          "parallel.tp=3"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2
    assert "model.num_attention_heads=4 not divisible by parallel.tp=3" in out.stderr


@pytest.fixture
def small_dataset(tmp_path):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = tmp_path / "d"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for n in (300, 120, 700):
        builder.add_document(np.arange(n, dtype=np.uint16) % 400, [n])
    builder.finalize(f"{prefix}.idx")
    return prefix


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


@pytest.mark.parametrize("problem", ["missing_prefix", "truncated_idx", "short_bin", "missing_load"])
def test_bad_paths_are_named_before_any_process_group(tmp_path, small_dataset, problem):
    """One line naming the file and what was expected, exit 2. WORLD_SIZE=2 with no second rank: had the
    check come after init_process_group, rank 0 would wait for its peer until the timeout."""
    import os
    import socket

    overrides = ["data.mix=", "data.prepare=", f"data.prefix={small_dataset}", "train.seq_length=256"]
    if problem == "missing_prefix":
        overrides[2], named = f"data.prefix={tmp_path / 'nope'}", f"{tmp_path / 'nope'}: no indexed dataset"
    elif problem == "truncated_idx":
        _truncate(Path(f"{small_dataset}.idx"), -10)
        named = f"{small_dataset}.idx: "
    elif problem == "short_bin":
        _truncate(Path(f"{small_dataset}.bin"), -2)
        named = f"{small_dataset}.bin: "
    else:
        overrides.append(f"checkpoint.load={tmp_path / 'no_ckpt'}")
        named = f"checkpoint.load={tmp_path / 'no_ckpt'}: not found"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    out = subprocess.run([script("megaprolong-train"), "--config", str(REPO / "examples/tiny_stage1.yaml"), *overrides],
                         capture_output=True, text=True, timeout=90, env=env)
    lines = [l for l in out.stderr.splitlines() if l.startswith("megaprolong-train:")]
    assert out.returncode == 2 and len(lines) == 1 and named in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    if problem == "truncated_idx":
        assert "truncated" in lines[0] and "expected" in lines[0]
        inspect = subprocess.run([script("megaprolong-preprocess"), "inspect", str(small_dataset)],
                                 capture_output=True, text=True, timeout=60)
        assert inspect.returncode == 2 and f"{small_dataset}.idx" in inspect.stderr
        assert "Traceback" not in inspect.stderr


def test_no_top_level_tools_package_is_installed(tmp_path):
    """The installed package is megaprolong alone: `import tools` elsewhere finds nothing of ours (it would
    shadow any other project's `tools`); the checkout's tools/ scripts still run Megatron-LM style."""
    probe = subprocess.run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('tools'))"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert probe.stdout.strip() == "None", probe.stdout
    for name in ("preprocess_data", "convert", "plan", "train", "sft", "eval"):
        out = subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), "--help"], capture_output=True,
                             text=True, cwd=tmp_path, timeout=60)
        assert out.returncode == 0 and "usage:" in out.stdout, (name, out.stderr[-500:])


def test_mfu_where_the_peak_is_known():
    from types import SimpleNamespace

    from megaprolong.training.flops import peak_tflops
    from megaprolong.training.metrics import step_line

    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4 and peak_tflops("NVIDIA GH200 480GB", "bf16") == 989.4
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert peak_tflops("NVIDIA H100 80GB HBM3", "fp32") is None and peak_tflops(None, "bf16") is None
    m = SimpleNamespace(step=10, loss=2.0, grad_norm=0.5, lr=1e-5, step_time_s=5.0, tokens_per_s=800_000.0,
                        tflops_per_gpu=395.76, peak_memory_bytes=60 * 2**30, data_time_s=0.001, eval_loss=1.9)
    line = step_line(m, 5000, 41_943_040, 989.4, 3600 * 7.2)
    assert "| MFU 40.0% |" in line and "| mem 60.00 GiB |" in line and "41.9M tokens" in line
    assert line.endswith("| held-out loss 1.9000 | ETA 7h12m")
