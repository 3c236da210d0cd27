"""The oldest torch and transformers that setup.py admits run what we call of them.

The floors are the GPU test machine's releases (torch 2.11, transformers 5.17), so that what runs there
first has run here. Both change public API within their lines:

- transformers renamed the model's ``past_key_values`` to ``cache`` (5.24) and ``gradient_checkpointing``
  to ``activation_checkpointing`` (5.23); before 5.18 its Trainer loaded a multi-process CPU run's
  optimizer state to ``cpu:N``, which torch cannot restore. Code written against the pinned release fails
  on an older one or, worse, runs wrong: ``cache=`` lands in the old model's catch-all keyword arguments,
  and every perplexity chunk was scored without its context.
- torch's ``varlen_attn`` signature changes at every release (2.11: keyword-only ``window_size``, a tuple;
  2.12: ``enable_gqa``); torchrun before 2.12 has no shutdown timeout (a fixed 30 s); megatron-core runs
  on the CPU through patches of torch internals.

So the tests that cross those APIs run again here, the floors' releases in front of the pinned ones:
conversion against transformers' logits, SFT and its two-rank resume, the registered attention, chunked
perplexity, lm_eval's hf model; the attention kernels and their self-test, megatron-core on the CPU (a
TP2+SP x CP2 layout against one rank, document masking in fp32 and bf16, a checkpoint round trip), the
torchrun grace warning, and the device check's own runs under an interpreter holding only the GPU
machine's packages.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HUB = "huggingface-hub==1.33.0"  # within what transformers 5.17 needs (<2), as on the GPU test machine
CROSSING = [
    # transformers
    "tests/test_convert.py::test_exported_model_loads_in_transformers",  # + hf-to-mcore --verify (its logits)
    "tests/test_sft.py::test_resume_from_a_checkpoint_equals_the_uninterrupted_run",
    "tests/test_sft.py::test_packed_batch_equals_separate_conversations",
    "tests/test_sft_attention.py",
    "tests/test_eval.py::test_chunked_nll_equals_one_pass",
    "tests/test_short_eval.py::test_accuracy_equals_lm_evals_rule_computed_by_hand",
    # torch
    "tests/test_attention.py",
    "tests/test_cpu_compat.py",
    "tests/test_parallel_parity.py::test_layout_matches_single_rank[tp2_sp_cp2]",
    "tests/test_parallel_parity.py::test_document_masking_on_packed_sequences",
    "tests/test_checkpoint.py::test_synchronous_save_round_trips_in_bounded_files",
    "tests/test_checkpoint.py::test_a_torchrun_without_a_shutdown_setting_is_named_when_the_grace_asked_exceeds_its_30_s",
    "tests/test_device_check.py::test_the_performance_runs_work_and_a_kernel_that_cannot_run_fails_them",
    "tests/test_device_check.py::test_the_sft_check_judges_logits_and_gradients",
]


def floors() -> dict[str, str]:
    """{distribution: its oldest admitted release}, as setup.py names them (X.Y as X.Y.0)."""
    text = (REPO / "setup.py").read_text()
    found = {name: re.search(rf'^{name.upper()}_FLOOR = "([\d.]+)"', text, re.M) for name in ("torch", "transformers")}
    assert all(found.values()), f"setup.py names no floor for {[n for n, f in found.items() if not f]}"
    return {name: v if (v := f.group(1)).count(".") == 2 else v + ".0" for name, f in found.items()}


@pytest.mark.timeout(1500)
def test_the_oldest_admitted_torch_and_transformers_run_what_we_call(tmp_path):
    versions, site = floors(), tmp_path / "site"
    # torch without its CUDA libraries: the tests run on the CPU (the pinned torch's stay importable)
    got = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                          *(f"{name}=={v}" for name, v in versions.items()), HUB],
                         capture_output=True, text=True, timeout=900)
    if got.returncode != 0:
        if os.environ.get("CI") == "true":  # CI reaches PyPI: a skip there is a test that did not run
            pytest.fail(f"{versions} could not be installed: {got.stderr[-1500:]}")
        pytest.skip(f"{versions} could not be installed (no package index?)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    seen = subprocess.run([sys.executable, "-c", "import torch, transformers; "
                           "print(torch.__version__.split('+')[0], transformers.__version__)"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert seen.stdout.split() == [versions["torch"], versions["transformers"]], seen.stderr[-1500:]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CROSSING],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=1400)
    assert run.returncode == 0, run.stdout[-4000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1], run.stdout[-1000:]
