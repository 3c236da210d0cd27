"""Checkpoints: kill -9 and resume, preemption signal, never an interrupted save, stage starts."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from launch import torchrun
from test_lr_schedule import prolong_lr

REPO = Path(__file__).resolve().parent.parent
STEPS = 6


def test_interrupted_save_is_never_picked(tmp_path):
    from megaprolong.training.checkpoint import complete_checkpoints

    for name, complete in (("step_00000002", True), ("step_00000004", True), ("step_00000006.tmp", True),
                           ("step_00000008", False)):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "megaprolong.json").write_text("{}")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000002", "step_00000004"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_corpus, tiny_tokenizer):
    from megaprolong.data.preprocess import PreprocessConfig, preprocess
    from megaprolong.data.tiny import write_jsonl

    root = tmp_path_factory.mktemp("data")
    for domain in ("books", "code", "web"):
        src = write_jsonl([d for d in tiny_corpus if d["domain"] == domain], root / f"{domain}.jsonl")
        preprocess(PreprocessConfig(inputs=[str(src)], tokenizer=str(tiny_tokenizer), output_prefix=str(root / domain),
                                    add_eos=True, quiet=True, group_by="repo" if domain == "code" else None))
    return root


def train_args(data, ckpt, metrics, *extra):
    return ["--config", str(REPO / "examples/tiny_stage1.yaml"), f"data.mix={REPO / 'examples/mixes/tiny_stage1.yaml'}",
            f"data.root={data}", f"train.steps={STEPS}", "model.vocab_size=512", f"checkpoint.dir={ckpt}",
            f"logging.metrics_file={metrics}", *extra]


def logged(metrics, key="loss"):
    """The last logged value of every step (a resumed run logs the steps after its checkpoint again)."""
    out = {}
    for line in Path(metrics).read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row[key]
    return [out[s] for s in sorted(out)]


def losses(metrics):
    return logged(metrics, "loss")


def launch(args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "megaprolong.train", *args]
    return subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> None:
    """kill -9 torchrun and every process under it (its workers run in sessions of their own, so killing its
    process group would leave them training), as Slurm does when a job step is killed."""
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        p.kill()
    psutil.wait_procs(tree, timeout=30)
    proc.wait()


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    d = tmp_path_factory.mktemp("straight")
    # every save portable here, so that a periodic one can be resumed under another layout (below)
    torchrun("megaprolong.train", 2, *train_args(data, d / "ckpt", d / "m.jsonl", "checkpoint.interval=3",
                                                 "checkpoint.optimizer_format=fully_reshardable"))
    return d, losses(d / "m.jsonl")


@pytest.mark.multirank
def test_kill_9_then_resume_equals_uninterrupted(data, tmp_path, uninterrupted, monkeypatch):
    """kill -9 after the step-2 checkpoint, once step 3 was logged: the rerun resumes at step 2 and matches
    the uninterrupted run; metrics.jsonl, TensorBoard and W&B (offline) each have every step once, W&B in
    the same run."""
    _, want = uninterrupted
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    args = train_args(data, tmp_path / "ckpt", tmp_path / "m.jsonl", "checkpoint.interval=2", f"run.dir={run_dir}",
                      "logging.wandb_project=megaprolong-test")
    proc = launch(args)
    wait_for(lambda: (tmp_path / "ckpt" / "step_00000002" / "megaprolong.json").exists() and
             len((tmp_path / "m.jsonl").read_text().splitlines()) >= 3, proc)
    kill_tree(proc)  # torchrun and both ranks, mid-run
    first_id = (run_dir / "wandb_run_id").read_text().strip()
    out = torchrun("megaprolong.train", 2, *args)
    assert f"resumed from {tmp_path / 'ckpt' / 'step_00000002'} at step 2" in out
    torch.testing.assert_close(losses(tmp_path / "m.jsonl"), want, rtol=1e-6, atol=0)
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # each step once, in order
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, STEPS + 1))
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(want, rel=1e-6)
    assert (run_dir / "wandb_run_id").read_text().strip() == first_id
    runs = sorted((run_dir / "wandb").glob(f"offline-run-*-{first_id}"))
    assert len(runs) == 2  # the killed run and its continuation, one W&B run id
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["checkpoint"]["interval"] == 2
    # the schedule continues where it stopped: step s used ProLong's LR for step s - 1 (tiny recipe: peak 3e-3)
    assert logged(tmp_path / "m.jsonl", "lr") == pytest.approx([prolong_lr(s, STEPS, 3e-3) for s in range(STEPS)])
    # checkpoint.optimizer_format=auto: periodic saves rank-local, the stage's last one portable
    formats = {p.name: json.loads((p / "megaprolong.json").read_text())["optimizer_format"]
               for p in (tmp_path / "ckpt").glob("step_*")}
    assert formats == {"step_00000002": "dp_reshardable", "step_00000004": "dp_reshardable",
                       f"step_{STEPS:08d}": "fully_reshardable"}


@pytest.mark.multirank
def test_preemption_signal_checkpoints_exits_and_resumes(data, tmp_path, uninterrupted):
    _, want = uninterrupted
    args = train_args(data, tmp_path / "ckpt", tmp_path / "m.jsonl")
    proc = launch(args)
    wait_for(lambda: (tmp_path / "m.jsonl").exists() and len((tmp_path / "m.jsonl").read_text().splitlines()) >= 2, proc)
    for child in psutil.Process(proc.pid).children(recursive=True):  # what Slurm's --signal reaches
        child.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "stop requested" in out
    saved = sorted(p.name for p in (tmp_path / "ckpt").glob("step_*"))
    assert len(saved) == 1 and saved[0] != f"step_{STEPS:08d}"
    out = torchrun("megaprolong.train", 2, *args)
    assert "resumed from" in out
    torch.testing.assert_close(losses(tmp_path / "m.jsonl"), want, rtol=1e-6, atol=0)


@pytest.mark.multirank
def test_bf16_resume_continues_exactly(data, tmp_path):
    """In the recipes' precision (bf16 weights, fp32 master weights and Adam moments in the optimizer), a run
    resumed from its step-2 checkpoint logs the same losses as the run that went on: nothing is rounded to
    bf16 on the way (master weights rebuilt from the bf16 weights would change every later step)."""
    straight = train_args(data, tmp_path / "a" / "ckpt", tmp_path / "a" / "m.jsonl", "train.precision=bf16",
                          "checkpoint.interval=2", "train.steps=4")
    torchrun("megaprolong.train", 2, *straight)
    resumed = train_args(data, tmp_path / "b" / "ckpt", tmp_path / "b" / "m.jsonl", "train.precision=bf16",
                         "train.steps=4", f"checkpoint.resume={tmp_path / 'a' / 'ckpt' / 'step_00000002'}")
    assert "weights + optimizer state" in torchrun("megaprolong.train", 2, *resumed)
    assert losses(tmp_path / "b" / "m.jsonl") == losses(tmp_path / "a" / "m.jsonl")[2:]


@pytest.mark.multirank
def test_resume_under_another_layout_carries_the_optimizer_state(data, tmp_path, uninterrupted):
    """A TP=2 checkpoint (optimizer state fully reshardable) resumed with TP=1 x DP=2 (distributed optimizer
    sharded over 2 ranks) continues exactly like the uninterrupted TP=2 run."""
    d, want = uninterrupted
    args = train_args(data, tmp_path / "ckpt", tmp_path / "m.jsonl", "parallel.tp=1",
                      "parallel.sequence_parallel=false", f"checkpoint.resume={d / 'ckpt' / 'step_00000003'}")
    out = torchrun("megaprolong.train", 2, *args)
    assert "weights + optimizer state" in out
    torch.testing.assert_close(losses(tmp_path / "m.jsonl"), want[3:], rtol=1e-5, atol=0)


@pytest.mark.multirank
def test_stage_start_from_other_layout_uses_new_rope_base_and_fresh_schedule(data, uninterrupted):
    d, _ = uninterrupted
    out = torchrun("stage_start.py", 1, str(d / "ckpt" / f"step_{STEPS:08d}"),
                   str(REPO / "examples/mixes/tiny_stage1.yaml"), str(data))
    assert "STAGE_START_OK" in out


@pytest.mark.multirank
def test_trained_checkpoint_exports_to_transformers_with_its_rope_base(uninterrupted, tmp_path):
    from transformers import AutoModelForCausalLM

    d, _ = uninterrupted
    out = subprocess.run([sys.executable, "-m", "megaprolong.cli.convert", "mcore-to-hf", "--ckpt", str(d / "ckpt"),
                          "--out", str(tmp_path / "hf"), "--dtype", "float32"], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["rope_theta"] == 8000000.0 and cfg["max_position_embeddings"] == 128
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.rope_parameters["rope_theta"] == 8000000.0
    generated = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)
    # exact: the checkpoint (saved by TP=2 ranks) under TP=2 gives transformers' logits on the exported model
    assert "HF_LOGITS_OK" in torchrun("hf_logits.py", 2, str(tmp_path / "hf"), str(d / "ckpt"), "parallel.tp=2")


@pytest.mark.multirank
def test_async_checkpoints_resume_like_the_uninterrupted_run(data, tmp_path, uninterrupted):
    """Checkpoints written in the background (checkpoint.async_save) are complete when published and
    resume exactly."""
    _, want = uninterrupted
    args = train_args(data, tmp_path / "ckpt", tmp_path / "m.jsonl", "checkpoint.interval=2",
                      "checkpoint.async_save=true")
    out = torchrun("megaprolong.train", 2, *args)
    assert "saving" in out
    from megaprolong.training.checkpoint import complete_checkpoints

    assert [p.name for p in complete_checkpoints(tmp_path / "ckpt")] == [f"step_{s:08d}" for s in (2, 4, 6)]
    torch.testing.assert_close(losses(tmp_path / "m.jsonl"), want, rtol=1e-6, atol=0)
    resumed = train_args(data, tmp_path / "ckpt2", tmp_path / "m2.jsonl",
                         f"checkpoint.resume={tmp_path / 'ckpt' / 'step_00000004'}")
    assert "resumed from" in torchrun("megaprolong.train", 2, *resumed)
    torch.testing.assert_close(losses(tmp_path / "m2.jsonl"), want[4:], rtol=1e-6, atol=0)


def corrupt_middle(path: Path, nbytes: int = 4096) -> None:
    """Zero a stretch in the middle of a file, keeping its size (what a bad copy or a disk does)."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\0" * nbytes)
    assert path.stat().st_size == size


def largest_shard(step_dir: Path) -> Path:
    return max(step_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)


@pytest.mark.multirank
def test_same_size_damage_in_the_newest_checkpoint_is_found_and_the_previous_resumed(data, tmp_path, uninterrupted):
    """A zeroed stretch in the middle of a shard of the newest checkpoint (size unchanged, both ends intact):
    resume: auto names the file, sets the checkpoint aside (step_N.corrupt, kept), resumes from the previous
    one and matches the uninterrupted run; the same checkpoint named explicitly is refused before any process
    group."""
    _, want = uninterrupted
    args = train_args(data, tmp_path / "ckpt", tmp_path / "m.jsonl", "checkpoint.interval=2")
    torchrun("megaprolong.train", 2, *args)
    shutil.rmtree(tmp_path / "ckpt" / f"step_{STEPS:08d}")  # as if the run had stopped after step 4
    step4 = tmp_path / "ckpt" / "step_00000004"
    shard = largest_shard(step4)
    corrupt_middle(shard)
    out = torchrun("megaprolong.train", 2, *args)
    assert f"skipping checkpoint {step4}: {shard}: content changed" in out
    assert f"resumed from {tmp_path / 'ckpt' / 'step_00000002'} at step 2" in out
    aside = tmp_path / "ckpt" / "step_00000004.corrupt"
    assert (aside / shard.name).exists() and (tmp_path / "ckpt" / "step_00000004").exists()  # set aside, rewritten
    torch.testing.assert_close(losses(tmp_path / "m.jsonl"), want, rtol=1e-6, atol=0)
    named = subprocess.run([sys.executable, "-m", "megaprolong.train",
                            *train_args(data, tmp_path / "c2", tmp_path / "m2.jsonl", f"checkpoint.resume={aside}")],
                           capture_output=True, text=True, timeout=120, cwd=REPO,
                           env=dict(os.environ, WORLD_SIZE="2", RANK="0"))  # no peer: fails before any group
    assert named.returncode == 2 and f"{aside / shard.name}: content changed" in named.stderr
    assert "Traceback" not in named.stderr


@pytest.mark.multirank
def test_no_checkpoint_verifying_stops_the_run_instead_of_restarting_the_stage(data, tmp_path, uninterrupted):
    """Every checkpoint of the run damaged (same size, so only the digests tell): the run neither resumes nor
    starts the stage again from checkpoint.load (which would restart the LR schedule, and rotation would
    delete the old checkpoints); it stops with one line per checkpoint, exit 2, and the restart torchrun makes
    exits at once on the recorded error. The checkpoints stay on disk, set aside."""
    d, _ = uninterrupted
    ckpt = tmp_path / "ckpt"
    args = train_args(data, ckpt, tmp_path / "m.jsonl", "checkpoint.interval=2", "checkpoint.keep=3",
                      f"checkpoint.load={d / 'ckpt'}")
    torchrun("megaprolong.train", 2, *args)
    shutil.rmtree(ckpt / f"step_{STEPS:08d}")
    rows = (tmp_path / "m.jsonl").read_text()
    for step in (2, 4):
        corrupt_middle(largest_shard(ckpt / f"step_{step:08d}"))
    agent = launch_elastic(args, max_restarts=1)
    out, _ = agent.communicate(timeout=240)
    assert agent.returncode != 0, out[-3000:]
    assert "no checkpoint verifies" in out and "content changed" in out
    assert "not retrying" in out  # the restarted workers read the recorded error instead of trying again
    assert "stage start from" not in out and (tmp_path / "m.jsonl").read_text() == rows  # nothing trained
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000002.corrupt", "step_00000004.corrupt"]
    assert "no checkpoint verifies" in progress(ckpt)["fatal"]["error"]  # what the batch shell reads: no requeue


def launch_elastic(args, max_restarts=1, shutdown_timeout=30):
    """torchrun with in-job restarts (c10d rendezvous), 2 ranks, in its own process group; it SIGKILLs
    workers that outlive its SIGTERM by ``shutdown_timeout`` seconds (asked as the sbatch scripts ask: by
    the environment, which torch < 2.12 ignores for a fixed 30 s instead of refusing an unknown flag)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           f"--max-restarts={max_restarts}", "-m", "megaprolong.train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_ELASTIC_SHUTDOWN_TIMEOUT=str(shutdown_timeout))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_a_torchrun_without_a_shutdown_setting_is_named_when_the_grace_asked_exceeds_its_30_s(monkeypatch):
    """torch < 2.12's torchrun SIGKILLs 30 s after SIGTERM whatever TERM_GRACE asks: rank 0 warns."""
    import dataclasses

    from torch.distributed.launcher import api

    from megaprolong.runtime.preemption import torchrun_grace_warning

    launch = {"TORCHELASTIC_RUN_ID": "r", "RANK": "0", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120"}
    has_setting = tuple(int(n) for n in torch.__version__.split(".")[:2]) >= (2, 12)
    assert (torchrun_grace_warning(launch) is None) == has_setting
    old = dataclasses.make_dataclass("LaunchConfig", [f.name for f in dataclasses.fields(api.LaunchConfig)
                                                      if f.name != "shutdown_timeout"])
    monkeypatch.setattr(api, "LaunchConfig", old)
    message = torchrun_grace_warning(launch)
    assert message and "30 s" in message and "120 s" in message
    assert torchrun_grace_warning(dict(launch, TORCH_ELASTIC_SHUTDOWN_TIMEOUT="30")) is None
    assert torchrun_grace_warning(dict(launch, RANK="1")) is None  # one line per launch, not per rank
    assert torchrun_grace_warning({k: v for k, v in launch.items() if k != "TORCHELASTIC_RUN_ID"}) is None


def kill_one_worker(agent: subprocess.Popen) -> list[int]:
    """kill -9 one training worker (a child of torchrun's agent); returns its pid and its children's."""
    worker = psutil.Process(agent.pid).children()[-1]
    victims = [worker.pid] + [c.pid for c in worker.children(recursive=True)]
    worker.kill()
    return victims


def progress(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "progress.json").read_text())
    except (OSError, ValueError):
        return {}


@pytest.mark.multirank
def test_dead_worker_restarts_in_job_and_leaves_no_process(data, tmp_path, uninterrupted):
    """torchrun --max-restarts 1: one worker killed (kill -9) after the step-2 checkpoint; the restarted
    workers resume from it and finish with the uninterrupted run's losses; nothing the dead worker started
    (megatron's checkpoint-queue manager) survives it."""
    _, want = uninterrupted
    args = train_args(data, tmp_path / "ckpt", tmp_path / "m.jsonl", "checkpoint.interval=2")
    agent = launch_elastic(args)
    wait_for(lambda: (tmp_path / "ckpt" / "step_00000002" / "megaprolong.json").exists(), agent)
    victims = kill_one_worker(agent)
    out, _ = agent.communicate(timeout=240)
    assert agent.returncode == 0, out[-3000:]
    assert f"resumed from {tmp_path / 'ckpt' / 'step_00000002'} at step 2" in out
    torch.testing.assert_close(losses(tmp_path / "m.jsonl"), want, rtol=1e-6, atol=0)
    time.sleep(1)
    alive = [p for p in victims if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes of the killed worker still alive: {alive}"


@pytest.mark.multirank
def test_failure_repeating_at_the_same_step_stops_with_the_step(data, tmp_path):
    """A worker dies at the same step in two attempts in a row: the run stops, naming the step, instead of
    restarting (torchrun's restarts spent; the launcher's check and a new launch both refuse)."""
    ckpt = tmp_path / "ckpt"
    # a slower model than the tiny recipe's, so a step lasts long enough to be killed inside it
    args = train_args(data, ckpt, tmp_path / "m.jsonl", "checkpoint.interval=2", "train.steps=8",
                      "model.num_layers=8", "model.hidden_size=512", "model.ffn_hidden_size=2048")
    agent = launch_elastic(args)
    # step 3 in the first attempt, then again in the restarted one (resumed from step 2's checkpoint)
    for failed_before in (None, 3):
        wait_for(lambda: progress(ckpt).get("step") == 3 and progress(ckpt).get("failed_before") == failed_before,
                 agent, timeout=180)
        kill_one_worker(agent)
    out, _ = agent.communicate(timeout=240)
    assert agent.returncode != 0, out[-3000:]
    check = subprocess.run([sys.executable, "-m", "megaprolong.runtime.attempts", str(ckpt)], capture_output=True,
                           text=True, cwd=REPO)
    assert check.returncode == 1 and "step 3 failed in two attempts" in check.stdout
    one_rank = [*args, "parallel.tp=1", "parallel.sequence_parallel=false"]
    again = subprocess.run([sys.executable, "-m", "megaprolong.train", *one_rank], capture_output=True, text=True,
                           timeout=180, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert again.returncode == 3 and "step 3 failed in two attempts" in again.stderr, again.stderr[-2000:]


def test_synchronous_save_round_trips_in_bounded_files(tmp_path):
    out = torchrun("sync_save.py", 2, str(tmp_path / "ckpt"))
    assert out.count("ok:") == 2


def workers_of(agent: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(agent.pid).children()


@pytest.mark.multirank
def test_a_stop_signal_before_the_model_is_built_is_kept(data, tmp_path, uninterrupted):
    """SIGUSR1 reaches the workers a moment after they start, long before their model exists: it is kept
    (its default action would kill them); the run stops cleanly before its first step, and a rerun trains
    like the uninterrupted one."""
    _, want = uninterrupted
    args = train_args(data, tmp_path / "ckpt", tmp_path / "m.jsonl")
    agent = launch(args)
    wait_for(lambda: len(workers_of(agent)) == 2, agent)
    time.sleep(1.0)  # the workers run Python by now, still importing megatron-core (seconds)
    for worker in workers_of(agent):
        worker.send_signal(signal.SIGUSR1)
    out, _ = agent.communicate(timeout=180)
    assert agent.returncode == 0, out[-3000:]
    assert "stop requested (SIGUSR1): nothing to save" in out and "step     1" not in out
    torchrun("megaprolong.train", 2, *args)
    torch.testing.assert_close(losses(tmp_path / "m.jsonl"), want, rtol=1e-6, atol=0)


@pytest.mark.multirank
def test_a_hung_worker_is_found_by_the_watchdog_and_the_run_restarts(data, tmp_path, uninterrupted):
    """One worker stopped (SIGSTOP) in the middle of the run: its peer's step watchdog fires after its
    budget, prints every thread's stack and exits; torchrun restarts the workers, which resume and finish
    with the uninterrupted run's losses, within the budget plus the restart time."""
    _, want = uninterrupted
    ckpt = tmp_path / "ckpt"
    args = train_args(data, ckpt, tmp_path / "m.jsonl", "checkpoint.interval=2", "train.watchdog.warmup_steps=1",
                      "train.watchdog.floor_minutes=0.25", "train.watchdog.startup_minutes=3")
    agent = launch_elastic(args, max_restarts=1, shutdown_timeout=5)
    wait_for(lambda: progress(ckpt).get("step") == 3, agent, timeout=180)  # a step with no save after it
    victim = workers_of(agent)[-1]
    victim.suspend()
    stopped = time.time()
    out, _ = agent.communicate(timeout=300)
    elapsed = time.time() - stopped
    assert agent.returncode == 0, out[-3000:]
    assert "watchdog: rank" in out and "step 3 did not finish within 15 s" in out
    assert "most recent call first" in out  # the stacks
    assert "resumed from" in out
    torch.testing.assert_close(losses(tmp_path / "m.jsonl"), want, rtol=1e-6, atol=0)
    # 15 s budget, 5 s for torchrun to SIGKILL the stopped worker, the restart itself
    assert elapsed < 15 + 5 + 90, elapsed


@pytest.mark.multirank
def test_the_applied_learning_rate_is_prolongs_at_every_step(data):
    assert "APPLIED_LR_OK" in torchrun("applied_lr.py", 1, str(data))


@pytest.mark.multirank
def test_a_nan_loss_stops_the_run_naming_the_step_and_domain(data, tmp_path):
    """The web domain's loss turns NaN at step 3: the run stops there naming step 3 and the domain, applies
    no update and saves nothing after step 2; with train.skip_nonfinite_steps=1 the step is skipped (no
    update, logged as null), and the run finishes."""
    out = torchrun("nonfinite.py", 1, str(data), str(tmp_path / "stop"), "0")
    stopped = json.loads(out.strip().splitlines()[-1])
    assert stopped["error"].startswith("step 3: loss nan (domains: web nan)") and "after step 2" in stopped["error"]
    assert [r["step"] for r in stopped["rows"]] == [1, 2] and stopped["changed"] is False
    assert sorted(p.name for p in (tmp_path / "stop" / "ckpt").glob("step_*")) == ["step_00000002"]
    out = torchrun("nonfinite.py", 1, str(data), str(tmp_path / "skip"), "1")
    skipped = json.loads(out.strip().splitlines()[-1])
    assert skipped["error"] is None and skipped["changed"] is False
    assert [r["step"] for r in skipped["rows"]] == list(range(1, 7))
    row = skipped["rows"][2]
    assert row["skipped"] is True and row["loss"] is None and row["domain_loss"]["web"] is None
    assert row["domain_loss"]["books"] is not None  # the other domains' losses are still told
    assert any("step 3: loss nan (domains: web nan): skipped, no update" in line for line in skipped["lines"])
