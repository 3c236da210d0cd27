"""`sbatch slurm/prolong_512k.sh` on a real single-host Slurm with the tiny CPU recipe: the job trains,
logs, checkpoints; on the preemption signal it checkpoints, requeues itself and resumes."""

import json
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import Cluster, ensure_installed

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = ensure_installed()
    if reason:
        pytest.skip(reason)
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    c.start()
    yield c
    c.stop()


def submit(cluster, tmp_path, steps, name):
    env = {"REPO": str(REPO), "RECIPE": str(REPO / "examples" / "tiny_stage1.yaml"), "GPUS_PER_NODE": "2",
           "PYTHON": sys.executable, "CKPT_DIR": str(tmp_path / "ckpt"), "DATA_ROOT": str(tmp_path / "data"),
           "MASTER_PORT": "29611",
           "EXTRA_ARGS": f"train.steps={steps} logging.metrics_file={tmp_path / 'metrics.jsonl'}"}
    (tmp_path / "data").mkdir(exist_ok=True)
    log = tmp_path / "job.log"
    job = cluster.sbatch(str(REPO / "slurm" / "prolong_512k.sh"), f"--job-name={name}", "--nodes=1",
                         "--gpus-per-node=0", "--cpus-per-task=2", f"--output={log}", f"--chdir={REPO}", env=env)
    return job, log


def metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def test_job_trains_and_checkpoints(cluster, tmp_path):
    job, log = submit(cluster, tmp_path, 4, "tiny-run")
    assert cluster.wait(job) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    assert "rendezvous" in text and "step     4/4" in text
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3, 4]
    assert (tmp_path / "ckpt" / "step_00000004" / "megaprolong.json").exists()


def test_preemption_checkpoints_requeues_and_resumes(cluster, tmp_path):
    steps = 60
    job, log = submit(cluster, tmp_path, steps, "tiny-preempt")
    deadline = time.time() + 240
    while len(metrics(tmp_path)) < 2:
        assert time.time() < deadline and cluster.state(job) in ("PENDING", "RUNNING", "CONFIGURING"), \
            log.read_text()[-3000:] if log.exists() else "no log"
        time.sleep(0.2)
    cluster.signal_batch(job)
    assert cluster.wait(job, timeout=400) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    assert "USR1: asking the training processes to checkpoint" in text
    assert "requeueing job" in text and "restart 1" in text and "resumed from" in text
    rows = metrics(tmp_path)
    assert rows[-1]["step"] == steps
    assert sorted({r["step"] for r in rows}) == list(range(1, steps + 1))
