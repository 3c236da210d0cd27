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


def submit(cluster, tmp_path, steps, name, extra="", **settings):
    env = {"REPO": str(REPO), "RECIPE": str(REPO / "examples" / "tiny_stage1.yaml"), "GPUS_PER_NODE": "2",
           "PYTHON": sys.executable, "CKPT_DIR": str(tmp_path / "ckpt"), "DATA_ROOT": str(tmp_path / "data"),
           "MASTER_PORT": "29611",
           "EXTRA_ARGS": f"train.steps={steps} logging.metrics_file={tmp_path / 'metrics.jsonl'} {extra}", **settings}
    (tmp_path / "data").mkdir(parents=True, exist_ok=True)
    log = tmp_path / "job.log"
    job = cluster.sbatch(str(REPO / "slurm" / "prolong_512k.sh"), f"--job-name={name}", "--nodes=1",
                         "--gpus-per-node=0", "--cpus-per-task=2", f"--output={log}", f"--chdir={REPO}", env=env)
    return job, log


def metrics(folder):
    path = folder / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def preempt_after(cluster, job, log, rows, n):
    """Once ``rows()`` has ``n`` entries, send the job the preemption signal; then it must complete."""
    deadline = time.time() + 240
    while len(rows()) < n:
        assert time.time() < deadline and cluster.state(job) in ("PENDING", "RUNNING", "CONFIGURING"), \
            log.read_text(errors="replace")[-3000:] if log.exists() else "no log"
        time.sleep(0.2)
    cluster.signal_batch(job)
    assert cluster.wait(job, timeout=400) == "COMPLETED", log.read_text(errors="replace")[-3000:]
    return log.read_text(errors="replace")


def test_preemption_checkpoints_requeues_and_resumes(cluster, tmp_path):
    steps = 60
    job, log = submit(cluster, tmp_path, steps, "tiny-preempt")
    text = preempt_after(cluster, job, log, lambda: metrics(tmp_path), 2)
    assert "USR1: asking the training processes to checkpoint" in text
    assert "requeueing job" in text and "restart 1" in text and "resumed from" in text
    rows = metrics(tmp_path)
    assert rows[-1]["step"] == steps
    assert sorted({r["step"] for r in rows}) == list(range(1, steps + 1))


def wait_until(predicate, cluster, job, log, timeout=240):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline and cluster.state(job) in ("PENDING", "RUNNING", "CONFIGURING"), \
            log.read_text(errors="replace")[-3000:] if log.exists() else "no log"
        time.sleep(0.05)


def kill_one_worker(module: str, folder: Path) -> None:
    """kill -9 one worker process of ``module`` whose command line names ``folder``."""
    import psutil

    def cmdline(p):
        return " ".join(p.info["cmdline"] or [])

    workers = [p for p in psutil.process_iter(["cmdline"]) if f"-u -m {module}" in cmdline(p) and str(folder) in cmdline(p)]
    workers[-1].kill()


def kill_one_worker_at(module, folder, record, job, cluster, log):
    """kill -9 one worker of ``module`` once the run's progress record (in ``folder``) holds ``record``."""
    def reached():
        try:
            now = json.loads((folder / "progress.json").read_text())
        except (OSError, ValueError):
            return False
        return all(now.get(k) == v for k, v in record.items())

    wait_until(reached, cluster, job, log)
    kill_one_worker(module, folder)


# a slower model than the tiny recipe's, so that a step lasts long enough to be killed inside it
SLOW = "checkpoint.interval=2 model.num_layers=8 model.hidden_size=512 model.ffn_hidden_size=2048"


def test_dead_worker_restarts_in_the_job_then_a_repeated_failure_stops_it(cluster, tmp_path):
    """The job trains, logs and checkpoints. kill -9 of one worker: torchrun restarts the workers within the
    job, which resume and finish every step; with MAX_RESTARTS=1, a worker dying at the same step twice stops
    the job, naming the step."""
    ref, ref_log = submit(cluster, tmp_path / "ref", 6, "tiny-uninterrupted", SLOW)
    assert cluster.wait(ref, timeout=400) == "COMPLETED", ref_log.read_text(errors="replace")[-3000:]
    text = ref_log.read_text(errors="replace")
    assert "rendezvous" in text and "step     6/6" in text and "Overwriting old incomplete" not in text
    assert [m["step"] for m in metrics(tmp_path / "ref")] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "ref" / "ckpt" / "step_00000006" / "megaprolong.json").exists()
    job, log = submit(cluster, tmp_path / "a", 6, "tiny-dead-worker", SLOW, MAX_RESTARTS="1")
    kill_one_worker_at("megaprolong.train", tmp_path / "a" / "ckpt", {"step": 4}, job, cluster, log)
    assert cluster.wait(job, timeout=400) == "COMPLETED", log.read_text(errors="replace")[-3000:]
    text = log.read_text(errors="replace")
    assert "resumed from" in text and "requeueing" not in text
    # every step's last logged loss equals the uninterrupted job's
    want = {r["step"]: r["loss"] for r in metrics(tmp_path / "ref")}
    got = {r["step"]: r["loss"] for r in metrics(tmp_path / "a")}
    assert sorted(got) == list(range(1, 7)) and all(abs(got[s] - want[s]) <= 1e-6 * abs(want[s]) for s in want)

    job, log = submit(cluster, tmp_path / "b", 6, "tiny-repeated-failure", SLOW, MAX_RESTARTS="1")
    for failed_before in (None, 3):
        kill_one_worker_at("megaprolong.train", tmp_path / "b" / "ckpt", {"step": 3, "failed_before": failed_before},
                           job, cluster, log)
    assert cluster.wait(job, timeout=400) == "FAILED", log.read_text(errors="replace")[-3000:]
    text = log.read_text(errors="replace")
    assert "step 3 failed in two attempts in a row" in text and "requeueing" not in text


def test_sft_dead_worker_restarts_in_the_job(cluster, tmp_path, tiny_chat_model):
    """`sbatch slurm/sft.sh`: one SFT worker killed (kill -9) mid-run; torchrun restarts the workers within
    the job, they resume from the newest checkpoint and the job finishes every step."""
    from megaprolong.data.tiny import synthetic_chats, write_jsonl

    chats = write_jsonl(synthetic_chats(100, seed=2), tmp_path / "chats.jsonl")
    out, steps = tmp_path / "sft", 40
    env = {"REPO": str(REPO), "RECIPE": str(REPO / "examples" / "tiny_sft.yaml"), "MODEL": str(tiny_chat_model),
           "SFT_DATA": str(chats), "OUT_DIR": str(out), "GPUS_PER_NODE": "2", "PYTHON": sys.executable,
           "MASTER_PORT": "29613", "MAX_RESTARTS": "1", "EXTRA_ARGS": f"train.steps={steps} train.save_steps=5"}
    ref_log = tmp_path / "sft_ref.log"
    ref = cluster.sbatch(str(REPO / "slurm" / "sft.sh"), "--job-name=tiny-sft-ref", "--nodes=1", "--gpus-per-node=0",
                         "--cpus-per-task=2", f"--output={ref_log}", f"--chdir={REPO}",
                         env={**env, "OUT_DIR": str(tmp_path / "sft_ref")})
    assert cluster.wait(ref, timeout=400) == "COMPLETED", ref_log.read_text(errors="replace")[-3000:]
    log = tmp_path / "sft.log"
    job = cluster.sbatch(str(REPO / "slurm" / "sft.sh"), "--job-name=tiny-sft-dead", "--nodes=1",
                         "--gpus-per-node=0", "--cpus-per-task=2", f"--output={log}", f"--chdir={REPO}", env=env)
    wait_until(lambda: (out / "checkpoints" / "checkpoint-10").exists(), cluster, job, log)
    kill_one_worker("megaprolong.sft", out)
    assert cluster.wait(job, timeout=400) == "COMPLETED", log.read_text(errors="replace")[-3000:]
    text = log.read_text(errors="replace")
    assert "resuming from" in text and "requeueing" not in text and "fine-tuned model ->" in text
    want = {r["step"]: r["loss"] for r in metrics(tmp_path / "sft_ref")}
    got = {r["step"]: r["loss"] for r in metrics(out)}  # the last logged loss of each step
    assert sorted(got) == list(range(1, steps + 1)) and all(abs(got[s] - want[s]) <= 1e-6 for s in want), (got, want)

    # a worker dying at the same step in two attempts in a row stops the SFT job, naming the step
    out = tmp_path / "sft_repeated"
    env.update(OUT_DIR=str(out), MASTER_PORT="29614",
               EXTRA_ARGS=f"train.steps={steps} train.save_steps=2 train.global_batch_tokens=8192")  # slower steps
    log = tmp_path / "sft_repeated.log"
    job = cluster.sbatch(str(REPO / "slurm" / "sft.sh"), "--job-name=tiny-sft-repeated", "--nodes=1",
                         "--gpus-per-node=0", "--cpus-per-task=2", f"--output={log}", f"--chdir={REPO}", env=env)
    for failed_before in (None, 5):
        kill_one_worker_at("megaprolong.sft", out, {"step": 5, "failed_before": failed_before}, job, cluster, log)
    assert cluster.wait(job, timeout=400) == "FAILED", log.read_text(errors="replace")[-3000:]
    assert "step 5 failed in two attempts in a row" in log.read_text(errors="replace")


def test_sft_job_preempts_requeues_resumes_then_eval_job_scores_the_model(cluster, tmp_path, tiny_chat_model):
    """`sbatch slurm/sft.sh` (tiny SFT recipe, 2 CPU processes): preempted mid-run, it checkpoints,
    requeues and resumes to the end; `sbatch slurm/eval.sh` then evaluates the fine-tuned model."""
    from megaprolong.data.tiny import synthetic_chats, write_jsonl

    chats = write_jsonl(synthetic_chats(100, seed=2), tmp_path / "chats.jsonl")
    out, steps = tmp_path / "sft", 300
    env = {"REPO": str(REPO), "RECIPE": str(REPO / "examples" / "tiny_sft.yaml"), "MODEL": str(tiny_chat_model),
           "SFT_DATA": str(chats), "OUT_DIR": str(out), "GPUS_PER_NODE": "2", "PYTHON": sys.executable,
           "MASTER_PORT": "29612", "EXTRA_ARGS": f"train.steps={steps}"}
    log = tmp_path / "sft.log"
    job = cluster.sbatch(str(REPO / "slurm" / "sft.sh"), "--job-name=tiny-sft", "--nodes=1", "--gpus-per-node=0",
                         "--cpus-per-task=2", f"--output={log}", f"--chdir={REPO}", env=env)
    text = preempt_after(cluster, job, log, lambda: metrics(out), 3)
    assert "USR1: asking the training processes" in text and "requeueing job" in text
    assert "resuming from" in text and "fine-tuned model ->" in text
    rows = [r["step"] for r in metrics(out)]
    assert sorted(set(rows)) == list(range(1, steps + 1))
    assert (out / "model" / "model.safetensors").exists()

    results = tmp_path / "eval"
    env = {"REPO": str(REPO), "MODEL": str(out / "model"), "OUT_DIR": str(results), "TASKS": "niah_single,json_kv",
           "LENGTHS": "1024", "PYTHON": sys.executable, "EVAL_ARGS": "--samples 2"}
    log = tmp_path / "eval.log"
    job = cluster.sbatch(str(REPO / "slurm" / "eval.sh"), "--job-name=tiny-eval", "--gpus-per-node=0",
                         "--cpus-per-task=2", f"--output={log}", f"--chdir={REPO}", env=env)
    assert cluster.wait(job, timeout=300) == "COMPLETED", log.read_text(errors="replace")[-3000:]
    scores = json.loads((results / "results.json").read_text())["scores"]
    assert set(scores) == {"niah_single", "json_kv"} and "niah_single" in log.read_text(errors="replace")


def test_scripts_fail_fast_on_missing_inputs(cluster, tmp_path):
    for script, env, message in (
            ("eval.sh", {}, "MODEL is not set"),
            ("sft.sh", {"MODEL": str(tmp_path / "none")}, "HF model not found"),
            ("prolong_512k.sh", {"DATA_ROOT": str(tmp_path / "none")}, "data not found")):
        log = tmp_path / f"{script}.log"
        job = cluster.sbatch(str(REPO / "slurm" / script), "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1",
                             f"--output={log}", f"--chdir={REPO}", env={"REPO": str(REPO), **env})
        assert cluster.wait(job, timeout=60) == "FAILED"
        assert message in log.read_text(errors="replace")
