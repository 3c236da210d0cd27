"""`sbatch slurm/prolong_512k.sh` on a real single-host Slurm with the tiny CPU recipe: the job trains,
logs, checkpoints; on preemption (SIGTERM) and the time-limit warning (SIGUSR1) it checkpoints, requeues
itself and resumes; failures are requeued within their own budget; bad input, a second job on the same
folder and a bad node are refused before anything trains."""

import json
import os
import subprocess
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
        if os.environ.get("CI") == "true":  # CI installs Slurm: a skip there is a test that did not run
            pytest.fail(f"CI=true but Slurm is unusable: {reason}")
        pytest.skip(reason)
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    c.start()
    yield c
    c.stop()


def stage_env(tmp_path, steps, extra="", **settings):
    (tmp_path / "data").mkdir(parents=True, exist_ok=True)
    return {"REPO": str(REPO), "RECIPE": str(REPO / "examples" / "tiny_stage1.yaml"), "GPUS_PER_NODE": "2",
            "PYTHON": sys.executable, "CKPT_DIR": str(tmp_path / "ckpt"), "DATA_ROOT": str(tmp_path / "data"),
            "MASTER_PORT": "29611",
            "EXTRA_ARGS": f"train.steps={steps} logging.metrics_file={tmp_path / 'metrics.jsonl'} {extra}", **settings}


JOB_OPTIONS = ("--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", f"--chdir={REPO}")


def submit(cluster, tmp_path, steps, name, extra="", log_name="job.log", **settings):
    log = tmp_path / log_name
    job = cluster.sbatch(str(REPO / "slurm" / "prolong_512k.sh"), f"--job-name={name}", *JOB_OPTIONS,
                         f"--output={log}", env=stage_env(tmp_path, steps, extra, **settings))
    return job, log


def metrics(folder):
    path = folder / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def wait_rows(cluster, job, log, rows, n, timeout=240):
    """Until ``rows()`` has ``n`` entries (the job must stay alive meanwhile)."""
    deadline = time.time() + timeout
    while len(rows()) < n:
        assert time.time() < deadline and cluster.state(job) in ALIVE, \
            log.read_text(errors="replace")[-3000:] if log.exists() else "no log"
        time.sleep(0.2)


def preempt_after(cluster, job, log, rows, n):
    """Once ``rows()`` has ``n`` entries, send the job the time-limit warning; then it must complete."""
    wait_rows(cluster, job, log, rows, n)
    cluster.signal_batch(job)
    assert cluster.wait(job, timeout=400) == "COMPLETED", log.read_text(errors="replace")[-3000:]
    return log.read_text(errors="replace")


def test_preemption_time_limit_and_failures_each_end_in_a_requeue(cluster, tmp_path):
    """One job, four allocations: preempted as Slurm does it (SIGTERM to the batch shell and every step), it
    checkpoints after the current step and requeues; then the time-limit warning (SIGUSR1 to the batch shell)
    does the same; then, after those two requeues (SLURM_RESTART_COUNT=2 > MAX_REQUEUES=1), a worker dies
    with no torchrun restarts left: a failure requeue still has its budget (preemptions do not count), and
    the run finishes every step once, each allocation resuming from the previous one's last checkpoint."""
    steps = 40
    job, log = submit(cluster, tmp_path, steps, "tiny-preempt", MAX_RESTARTS="0", MAX_REQUEUES="1")
    rows = lambda: metrics(tmp_path)  # noqa: E731
    wait_rows(cluster, job, log, rows, 3)
    cluster.signal_all(job, "TERM")
    wait_until(lambda: "restart 1:" in log.read_text(errors="replace"), cluster, job, log)
    n = len(rows())
    wait_rows(cluster, job, log, rows, n + 3)
    cluster.signal_batch(job, "USR1")
    wait_until(lambda: "restart 2:" in log.read_text(errors="replace"), cluster, job, log)
    n = len(rows())
    wait_rows(cluster, job, log, rows, n + 3)
    kill_one_worker("megaprolong.train", tmp_path / "ckpt")
    assert cluster.wait(job, timeout=400) == "COMPLETED", log.read_text(errors="replace")[-3000:]
    text = log.read_text(errors="replace")
    assert "TERM: asking the training processes to checkpoint" in text and "stopped on TERM" in text
    assert "USR1: asking the training processes to checkpoint" in text and "stopped on USR1" in text
    assert "failure requeue 1 of 1" in text and "restart 3:" in text and "giving up" not in text
    # each stop checkpointed its step, and the next allocation resumed there
    import re

    for stopped in re.findall(r"stop requested \(\w+\): checkpointed at step (\d+)", text)[:2]:
        assert f"step_{int(stopped):08d} at step {int(stopped)}" in text, stopped
    assert len(re.findall(r"stop requested \(\w+\): checkpointed at step", text)) == 2
    got = rows()
    assert got[-1]["step"] == steps and sorted({r["step"] for r in got}) == list(range(1, steps + 1))


ALIVE = ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED", "COMPLETING")  # a requeued job passes through the last two


def wait_until(predicate, cluster, job, log, timeout=240):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline and cluster.state(job) in ALIVE, \
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
    """The job checks its node, trains, logs and checkpoints. kill -9 of one worker: torchrun restarts the
    workers within the job, which resume and finish every step (their losses equal the uninterrupted run's:
    tests/test_checkpoint.py, the same restart without Slurm); with MAX_RESTARTS=1, a worker dying at the
    same step twice stops the job, naming the step."""
    job, log = submit(cluster, tmp_path / "a", 6, "tiny-dead-worker", SLOW, MAX_RESTARTS="1")
    kill_one_worker_at("megaprolong.train", tmp_path / "a" / "ckpt", {"step": 4}, job, cluster, log)
    assert cluster.wait(job, timeout=400) == "COMPLETED", log.read_text(errors="replace")[-3000:]
    text = log.read_text(errors="replace")
    assert "start-up checks passed" in text and "node_check: " in text and " ok (0 GPU(s)" in text
    assert "resumed from" in text and "requeueing" not in text and "Overwriting old incomplete" not in text
    rows = [m["step"] for m in metrics(tmp_path / "a")]
    assert sorted(set(rows)) == list(range(1, 7)) and rows[-1] == 6
    assert (tmp_path / "a" / "ckpt" / "step_00000006" / "megaprolong.json").exists()

    job, log = submit(cluster, tmp_path / "b", 6, "tiny-repeated-failure", SLOW, MAX_RESTARTS="1", NODE_CHECK="0")
    for failed_before in (None, 3):
        kill_one_worker_at("megaprolong.train", tmp_path / "b" / "ckpt", {"step": 3, "failed_before": failed_before},
                           job, cluster, log)
    assert cluster.wait(job, timeout=400) == "FAILED", log.read_text(errors="replace")[-3000:]
    text = log.read_text(errors="replace")
    assert "step 3 failed in two attempts in a row" in text and "requeueing" not in text


def test_sft_dead_worker_restarts_in_the_job(cluster, tmp_path, tiny_chat_model):
    """`sbatch slurm/sft.sh`: one SFT worker killed (kill -9) mid-run; torchrun restarts the workers within
    the job, they resume from the newest checkpoint and the job finishes every step; a worker dying at the
    same step twice stops the job, naming the step."""
    from megaprolong.data.tiny import synthetic_chats, write_jsonl

    chats = write_jsonl(synthetic_chats(100, seed=2), tmp_path / "chats.jsonl")
    out, steps = tmp_path / "sft", 40
    env = {"REPO": str(REPO), "RECIPE": str(REPO / "examples" / "tiny_sft.yaml"), "MODEL": str(tiny_chat_model),
           "SFT_DATA": str(chats), "OUT_DIR": str(out), "GPUS_PER_NODE": "2", "PYTHON": sys.executable,
           "MASTER_PORT": "29613", "MAX_RESTARTS": "1", "NODE_CHECK": "0",
           "EXTRA_ARGS": f"train.steps={steps} train.save_steps=5"}
    log = tmp_path / "sft.log"
    job = cluster.sbatch(str(REPO / "slurm" / "sft.sh"), "--job-name=tiny-sft-dead", "--nodes=1",
                         "--gpus-per-node=0", "--cpus-per-task=2", f"--output={log}", f"--chdir={REPO}", env=env)
    wait_until(lambda: (out / "checkpoints" / "checkpoint-10").exists(), cluster, job, log)
    kill_one_worker("megaprolong.sft", out)
    assert cluster.wait(job, timeout=400) == "COMPLETED", log.read_text(errors="replace")[-3000:]
    text = log.read_text(errors="replace")
    assert "resuming from" in text and "requeueing" not in text and "fine-tuned model ->" in text
    # every step logged (resumed losses equal the uninterrupted run's: tests/test_sft.py, the same resume)
    assert sorted({r["step"] for r in metrics(out)}) == list(range(1, steps + 1))

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
    out, steps = tmp_path / "sft", 100
    env = {"REPO": str(REPO), "RECIPE": str(REPO / "examples" / "tiny_sft.yaml"), "MODEL": str(tiny_chat_model),
           "SFT_DATA": str(chats), "OUT_DIR": str(out), "GPUS_PER_NODE": "2", "PYTHON": sys.executable,
           "MASTER_PORT": "29612", "NODE_CHECK": "0", "EXTRA_ARGS": f"train.steps={steps}"}
    log = tmp_path / "sft.log"
    job = cluster.sbatch(str(REPO / "slurm" / "sft.sh"), "--job-name=tiny-sft", "--nodes=1", "--gpus-per-node=0",
                         "--cpus-per-task=2", f"--output={log}", f"--chdir={REPO}", env=env)
    text = preempt_after(cluster, job, log, lambda: metrics(out), 3)
    assert "USR1: asking the training processes" in text and "requeueing job" in text
    assert "resuming from" in text and "fine-tuned model ->" in text
    rows = [r["step"] for r in metrics(out)]
    assert sorted(set(rows)) == list(range(1, steps + 1))
    assert (out / "model" / "model.safetensors").exists()

    from test_short_eval import write_tasks

    write_tasks(tmp_path / "lm_eval_tasks")
    results = tmp_path / "eval"
    env = {"REPO": str(REPO), "MODEL": str(out / "model"), "OUT_DIR": str(results), "TASKS": "niah_single,json_kv",
           "LENGTHS": "1024", "PYTHON": sys.executable, "EVAL_ARGS": "--samples 2", "SUITES": "long,short",
           "SHORT_TASKS": "tiny_mc", "SHORT_ARGS": f"--include-path {tmp_path / 'lm_eval_tasks'} --device cpu",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "REPORT_LENGTHS": "1024"}
    log = tmp_path / "eval.log"
    job = cluster.sbatch(str(REPO / "slurm" / "eval.sh"), "--job-name=tiny-eval", "--gpus-per-node=0",
                         "--cpus-per-task=2", f"--output={log}", f"--chdir={REPO}", env=env)
    assert cluster.wait(job, timeout=300) == "COMPLETED", log.read_text(errors="replace")[-3000:]
    scores = json.loads((results / "long" / "results.json").read_text())["scores"]
    assert set(scores) == {"niah_single", "json_kv"} and "niah_single" in log.read_text(errors="replace")
    assert "acc_norm,none" in json.loads((results / "short" / "results.json").read_text())["short"]["tiny_mc"]["metrics"]
    report = json.loads((results / "report" / "report.json").read_text())
    assert report["rows"][0]["model"] == "eval" and report["rows"][0]["cells"]["Recall"]["note"].startswith("ours")


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


def test_one_job_per_folder(cluster, tmp_path):
    """While a job trains in a folder, a second job on the same folder (plain sbatch) is refused by the
    folder's lock, naming the first, without a requeue; one submitted through slurm/submit.sh waits for the
    first (--dependency=singleton under a name derived from the folder) and then resumes its checkpoint."""
    env = stage_env(tmp_path, 40, SLOW)
    # side by side on 2 CPUs (the script asks for the whole node: --exclusive)
    options = (*JOB_OPTIONS[:2], "--cpus-per-task=1", "--mem=1G", "--oversubscribe", JOB_OPTIONS[3])
    first = cluster.submit_singleton(str(REPO / "slurm" / "prolong_512k.sh"), *options,
                                     f"--output={tmp_path / 'first.log'}", env=env)
    wait_until(lambda: (tmp_path / "ckpt" / "run.lock").exists() and len(metrics(tmp_path)) >= 1, cluster, first,
               tmp_path / "first.log")
    name = cluster.show(first)["JobName"]
    assert name.startswith("mp-ckpt-")
    second = cluster.sbatch(str(REPO / "slurm" / "prolong_512k.sh"), "--job-name=intruder", *options,
                            f"--output={tmp_path / 'second.log'}", env=env)
    assert cluster.wait(second, timeout=120) == "FAILED"
    text = (tmp_path / "second.log").read_text(errors="replace")
    assert f"is in use by job {first} on" in text and "requeue" not in text.replace("not launching", "")
    assert cluster.show(second).get("Restarts") == "0"
    third = cluster.submit_singleton(str(REPO / "slurm" / "prolong_512k.sh"), *options,
                                     f"--output={tmp_path / 'third.log'}", env=env)
    time.sleep(3)
    assert cluster.show(third)["JobName"] == name and cluster.state(third) == "PENDING"
    assert cluster.show(third)["Reason"] == "Dependency" and cluster.state(first) == "RUNNING"
    cluster.cancel(first, third)


def test_bad_input_fails_once_with_the_reason_last(cluster, tmp_path):
    """A mix with a zero weight: the start-up check says so in one line, the job fails with exit 2 at once,
    torchrun never starts and the job is not requeued."""
    import yaml

    mix = yaml.safe_load((REPO / "examples" / "mixes" / "tiny_stage1.yaml").read_text())
    mix["domains"][2]["weight"] = 0
    (tmp_path / "bad_mix.yaml").write_text(yaml.safe_dump(mix))
    job, log = submit(cluster, tmp_path, 6, "tiny-bad-data", f"data.mix={tmp_path / 'bad_mix.yaml'}")
    assert cluster.wait(job, timeout=120) == "FAILED"
    info = cluster.show(job)
    assert info["ExitCode"] == "2:0" and info.get("Restarts") == "0"
    lines = log.read_text(errors="replace").splitlines()
    said = [line for line in lines if "megaprolong-train: domain web: weight 0" in line]
    assert len(said) == 1 and "weights are normalized" in said[0]
    assert "the start-up checks failed" in lines[-1] and "not launching" in lines[-1]
    assert not any("attention: backend" in line or "torch.distributed.run" in line for line in lines)


def test_a_node_that_fails_its_check_is_named_and_left_out(cluster, tmp_path):
    """The node check fails on the (only) node: the job names it, never starts torchrun there, and is
    requeued with the node excluded (here it then has nowhere to run: it stays pending)."""
    import socket

    host = socket.gethostname().split(".")[0]
    job, log = submit(cluster, tmp_path, 6, "tiny-bad-node", MEGAPROLONG_NODE_CHECK_FAIL=host)
    wait = time.time() + 120
    while cluster.show(job).get("ExcNodeList") != host:
        assert time.time() < wait, log.read_text(errors="replace")[-3000:] if log.exists() else "no log"
        time.sleep(1)
    text = log.read_text(errors="replace")
    assert f"node_check: {host} FAILED" in text and f"node check failed on: {host}; not training there" in text
    assert f"requeued with ExcNodeList={host}" in text and "attention: backend" not in text
    assert cluster.wait(job, states=("PENDING",), timeout=90) == "PENDING"  # nowhere left to run
    cluster.cancel(job)


def pipeline_status(cluster, yaml_path, root) -> dict[str, tuple[str, str]]:
    out = subprocess.run([sys.executable, "-m", "megaprolong.pipeline", "status", str(yaml_path), "--root", str(root)],
                         capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, **cluster.env})
    assert out.returncode in (0, 1), out.stderr[-2000:]
    rows = {}
    for line in out.stdout.splitlines()[1:]:
        parts = line.split(None, 1)
        name, rest = parts[0], parts[1] if len(parts) > 1 else ""
        state = next(s for s in ("not started", "done", "running", "waiting", "failed") if rest.startswith(s))
        rows[name] = (state, rest[len(state):].strip())
    assert out.returncode == any(state == "failed" for state, _ in rows.values())  # 1: a step failed
    return rows


@pytest.mark.timeout(1200)
def test_the_tiny_pipeline_submitted_resumes_where_it_broke(cluster, tmp_path, local_tiny):
    """`megaprolong-pipeline submit` on the tiny pipeline: every step a job, chained; status tells each state;
    the stage-2 job cancelled mid-run fails it (the steps after it can no longer start); a second submit
    runs stage 2 onward only (the earlier steps' jobs ran once), and the final evaluation equals the
    uninterrupted pipeline's (run --local)."""
    from conftest import STAGE2_STEPS, longer_stage2, variant

    def edit(data):
        longer_stage2(data)  # as the uninterrupted run
        data["cluster"].update(sbatch=["--gpus-per-node=0", "--cpus-per-task=2", "--mem=2G", "--oversubscribe"],
                               node_check=False)

    yaml_path = variant(tmp_path, "pipeline_tiny.yaml", edit)
    root = tmp_path / "root"
    before = pipeline_status(cluster, yaml_path, root)
    assert {state for state, _ in before.values()} == {"not started"} and len(before) == 7

    def submit():
        out = subprocess.run([sys.executable, "-m", "megaprolong.pipeline", "submit", str(yaml_path)], capture_output=True,
                             text=True, timeout=120, cwd=REPO, env={**os.environ, **cluster.env})
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout.strip().splitlines()[-1].split()

    first = submit()
    assert len(first) == 7
    record = lambda: json.loads((root / "pipeline.json").read_text())  # noqa: E731
    stage2_job = record()["stage2"]["job"]
    deadline = time.time() + 400
    while not (root / "ckpt" / "stage2" / "metrics.jsonl").exists() or \
            len((root / "ckpt" / "stage2" / "metrics.jsonl").read_text().splitlines()) < 2:
        assert time.time() < deadline, pipeline_status(cluster, yaml_path, root)
        time.sleep(0.2)
    states = pipeline_status(cluster, yaml_path, root)
    assert states["stage1"][0] == "done" and states["stage2"][0] == "running"
    assert states["stage2"][1].startswith(f"job {stage2_job}, step ") and f" of {STAGE2_STEPS}, " in states["stage2"][1]
    assert states["sft"][0] == "waiting" and "(pending:" in states["sft"][1]
    cluster.cancel(stage2_job)
    deadline = time.time() + 300  # Slurm's KillWait, then the job's processes reaped
    while pipeline_status(cluster, yaml_path, root)["stage2"][0] != "failed":
        assert time.time() < deadline, subprocess.run(["ps", "-ef"], capture_output=True, text=True).stdout
        time.sleep(1)
    assert pipeline_status(cluster, yaml_path, root)["stage2"][1].startswith(f"job {stage2_job}: ")
    second = submit()
    assert len(second) == 4 and not set(second) & set(first)  # stage2, hf, sft, eval: new jobs
    assert all(record()[s]["job"] == j for s, j in zip(("tiny-data", "data:tiny", "stage1"), first[:3]))
    deadline = time.time() + 600
    while any(state != "done" for state, _ in pipeline_status(cluster, yaml_path, root).values()):
        rows = pipeline_status(cluster, yaml_path, root)
        assert time.time() < deadline and not any(s == "failed" for s, _ in rows.values()), rows
        time.sleep(2)
    logs = sorted(p.name for p in (root / "logs").iterdir())
    for step in ("tiny-data", "data-tiny", "stage1"):  # one job each: nothing finished was redone
        assert len([name for name in logs if name.startswith(f"{step}-")]) == 1, logs
    assert len([name for name in logs if name.startswith("stage2-")]) == 2
    _, local_root, _ = local_tiny
    got = json.loads((root / "eval" / "long" / "results.json").read_text())
    want = json.loads((local_root / "eval" / "long" / "results.json").read_text())
    assert got["scores"] == want["scores"] and got["ppl"] == want["ppl"]
