"""megaprolong-pipeline without Slurm: the plan (steps, what they read and make, each stage's fit, refusals)
and the tiny pipeline run on this machine (the reference the Slurm test compares with: tests/test_slurm.py)."""

import json
from pathlib import Path

import pytest

from conftest import pipeline_cli, variant

REPO = Path(__file__).resolve().parent.parent


def test_plan_lists_every_step_and_refuses_a_stage_that_does_not_fit(tmp_path):
    ok = pipeline_cli("plan", REPO / "examples" / "pipeline_prolong_8b.yaml", "--root", tmp_path / "r8b")
    assert ok.returncode == 0, ok.stderr[-2000:]
    for step in ("data:prolong64k", "data:prolong512k", "base", "stage1", "stage2", "hf", "sft", "eval"):
        assert f"\n{step}" in "\n" + ok.stdout, step
    assert f"{tmp_path / 'r8b' / 'ckpt' / 'stage1' / 'step_00005000'}" in ok.stdout  # stage 2 reads stage 1's final
    assert "stage stage2: 8 node(s) x 8: TP8 PP1 CP8 DP1" in ok.stdout and "(fits)" in ok.stdout
    small = variant(tmp_path, "pipeline_prolong_8b.yaml", lambda d: d["cluster"].update(gpu_mem_gib=12))
    refused = pipeline_cli("plan", small)
    lines = [line for line in refused.stderr.splitlines() if "does not fit" in line]
    assert refused.returncode == 2 and lines, refused.stderr[-2000:]
    assert any("stage stage2 does not fit:" in line and "GiB/GPU needed by TP8 PP1 CP8 on 8 x 8 GPUs of 12 GiB" in line
               for line in lines), lines
    broken = variant(tmp_path, "pipeline_prolong_8b.yaml", lambda d: d["stages"][1].update(data="prolong1m"))
    out = pipeline_cli("plan", broken)
    assert out.returncode == 2 and "stage stage2: data 'prolong1m' is not one of the data sets" in out.stderr


@pytest.mark.multirank
def test_the_tiny_pipeline_runs_here_and_a_second_run_redoes_nothing(local_tiny):
    path, root, first = local_tiny
    for step in ("tiny-data", "data:tiny", "stage1", "stage2", "hf", "sft", "eval"):
        assert f"[pipeline r0] == {step}" in first
    assert (root / "eval" / "report" / "report.json").exists() and (root / "sft" / "model" / "config.json").exists()
    # stage 2 started from stage 1's final, portable checkpoint, named by its step
    assert f"stage start from {root / 'ckpt' / 'stage1' / 'step_00000030'}" in first
    again = pipeline_cli("run", path, "--local")
    assert again.returncode == 0 and again.stdout.count("complete (verified), skipped") == 7
    assert "[pipeline r0] ==" not in again.stdout


def test_the_export_refuses_data_made_with_another_tokenizer(local_tiny, tmp_path):
    """A dataset whose tokenizer record differs from the pipeline's tokenizer: plan and run refuse it."""
    import shutil

    path, root, _ = local_tiny
    copy = tmp_path / "root"
    shutil.copytree(root / "raw", copy / "raw")
    shutil.copytree(root / "data", copy / "data")
    sidecar = copy / "data" / "tiny" / "web.json"
    record = json.loads(sidecar.read_text())
    record["tokenizer_sha256"] = "0" * 64
    sidecar.write_text(json.dumps(record))
    out = pipeline_cli("plan", path, "--root", copy)
    assert out.returncode == 2 and "data tiny/web was tokenized with another tokenizer" in out.stderr
