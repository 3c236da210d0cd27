"""One run per folder: a lock file (``RUN_FOLDER/run.lock``) naming the launch that writes there.

Two jobs writing one checkpoint folder delete each other's half-written saves and mix their progress
records. The lock holds the owner's launch id (the Slurm job id, kept across requeues, or torchrun's run
id, kept across its restarts), host, pid and start time; rank 0 of the owning run refreshes its time stamp
every half minute. A lock of another launch is honoured while that launch is alive:

- a Slurm job: while ``squeue`` still knows it (pending, running, requeued, completing, ...);
- otherwise: while its time stamp is fresh (``STALE_AFTER_S``) and, on the same host, its process lives.

A lock whose owner is gone is taken over, and the takeover is said.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from megaprolong.runtime.attempts import run_id
from megaprolong.runtime.files import replace_text

LOCK = "run.lock"
STALE_AFTER_S = 300.0  # no refresh for this long: the owner is gone (when Slurm cannot say)
REFRESH_S = 30.0


@dataclass
class LockOwner:
    run: str  # launch id: Slurm job id, torchrun run id, or host:pid
    host: str
    pid: int
    started: float  # time.time()
    slurm: bool  # the run id is a Slurm job id

    def describe(self) -> str:
        kind = "job" if self.slurm else "run"
        return (f"{kind} {self.run} on {self.host} (pid {self.pid}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))})")


class FolderInUse(RuntimeError):
    """Another live run holds the folder's lock."""


def this_owner() -> LockOwner:
    launch = run_id()
    return LockOwner(run=launch or f"{socket.gethostname()}:{os.getpid()}", host=socket.gethostname(),
                     pid=os.getpid(), started=time.time(), slurm=bool(os.environ.get("SLURM_JOB_ID")))


def read_lock(folder: str | Path) -> tuple[LockOwner | None, float]:
    """The lock's owner and the age of its time stamp in seconds (None, 0 when there is none)."""
    path = Path(folder) / LOCK
    try:
        owner = LockOwner(**json.loads(path.read_text()))
        return owner, time.time() - path.stat().st_mtime
    except (OSError, ValueError, TypeError):
        return None, 0.0


_ALIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
                 "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}


def _slurm_job_alive(job: str) -> bool | None:
    """Whether Slurm still runs (or will run) ``job``; None when Slurm cannot be asked."""
    if not shutil.which("squeue"):
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:  # "Invalid job id specified": long gone
        return False if "Invalid job id" in out.stderr else None
    return any(state.strip() in _ALIVE_STATES for state in out.stdout.splitlines())


def _pid_alive(pid: int, started: float) -> bool:
    """Whether the process that took the lock at ``started`` still runs (not a zombie, not a newer process
    that reuses its pid)."""
    import psutil

    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and process.create_time() <= started + 1.0
    except psutil.Error:
        return False


def owner_alive(owner: LockOwner, age_s: float) -> bool:
    if owner.slurm:
        alive = _slurm_job_alive(owner.run)
        if alive is not None:
            return alive
    if owner.host == socket.gethostname() and not _pid_alive(owner.pid, owner.started):
        return False
    return age_s < STALE_AFTER_S


def check(folder: str | Path | None) -> str | None:
    """Why this launch may not write ``folder`` (another live run holds it), else None. Read-only: every
    rank can ask."""
    if not folder:
        return None
    owner, age = read_lock(folder)
    me = this_owner()
    if owner is None or owner.run == me.run or not owner_alive(owner, age):
        return None
    return (f"{folder} is in use by {owner.describe()} ({Path(folder) / LOCK}); two runs writing one folder "
            f"delete each other's checkpoints. Wait for it to end, or give this run another folder")


class RunLock:
    """The folder's lock held by this launch (rank 0), refreshed in the background while held."""

    def __init__(self, folder: str | Path, say=print):
        self.path = Path(folder) / LOCK
        self._stop = threading.Event()
        self._thread = None
        self.acquire(say)

    def acquire(self, say) -> None:
        me, folder = this_owner(), self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            reason = check(folder)
            if reason:
                raise FolderInUse(reason)
            previous, _ = read_lock(folder)
            if previous is None:  # free: create it, unless another launch does so at the same moment
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    time.sleep(0.1)
                    continue
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(asdict(me)))
                return
            if previous.run != me.run:
                say(f"taking over the lock of {folder} from {previous.describe()}, which is gone")
            replace_text(self.path, json.dumps(asdict(me)))
            return
        raise FolderInUse(f"{folder}: could not take its lock {self.path} (another launch keeps taking it)")

    def keep_fresh(self) -> None:
        """Refresh the time stamp every ``REFRESH_S`` seconds in a daemon thread, until :meth:`release`."""
        def refresh():
            while not self._stop.wait(REFRESH_S):
                try:
                    os.utime(self.path)
                except OSError:
                    return
        self._thread = threading.Thread(target=refresh, name="megaprolong-run-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """The run has ended (finished or given up): the folder is free."""
        self._stop.set()
        owner, _ = read_lock(self.path.parent)
        if owner is not None and owner.run == this_owner().run:
            self.path.unlink(missing_ok=True)
