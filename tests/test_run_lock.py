"""One run per folder: a live owner's lock is honoured, a dead owner's taken over, the owner's own kept."""

import json
import os
import subprocess
import sys
import time

import pytest

from megaprolong.runtime import run_lock


@pytest.fixture(autouse=True)
def no_launch(monkeypatch):
    for var in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)


def test_a_live_run_keeps_its_folder_and_a_dead_ones_lock_is_taken_over(tmp_path, monkeypatch):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = run_lock.LockOwner(run="torchrun-run-a", host=os.uname().nodename.split(".")[0], pid=other.pid,
                                   started=time.time(), slurm=False)
        (tmp_path / run_lock.LOCK).write_text(json.dumps(owner.__dict__))
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "torchrun-run-b")
        reason = run_lock.check(tmp_path)
        assert reason and "in use by run torchrun-run-a" in reason and f"pid {other.pid}" in reason
        with pytest.raises(run_lock.FolderInUse):
            run_lock.RunLock(tmp_path)
    finally:
        other.kill()
        other.wait()
    said = []
    lock = run_lock.RunLock(tmp_path, say=said.append)  # its process is gone: taken over, and said
    assert said and "taking over the lock" in said[0] and "torchrun-run-a" in said[0]
    assert run_lock.read_lock(tmp_path)[0].run == "torchrun-run-b"
    lock.release()
    assert not (tmp_path / run_lock.LOCK).exists()


def test_the_same_launch_takes_its_own_lock_again(tmp_path, monkeypatch):
    """torchrun restarts and Slurm requeues keep the launch id: the restarted run is the owner."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-1")
    run_lock.RunLock(tmp_path)
    assert run_lock.check(tmp_path) is None
    run_lock.RunLock(tmp_path)


def test_a_lock_not_refreshed_for_long_is_stale(tmp_path, monkeypatch):
    owner = run_lock.LockOwner(run="elsewhere", host="another-host", pid=1, started=time.time(), slurm=False)
    path = tmp_path / run_lock.LOCK
    path.write_text(json.dumps(owner.__dict__))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "me")
    assert run_lock.check(tmp_path)  # another host, fresh: honoured
    old = time.time() - run_lock.STALE_AFTER_S - 10
    os.utime(path, (old, old))
    assert run_lock.check(tmp_path) is None
