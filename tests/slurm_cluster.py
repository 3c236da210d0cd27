"""A real single-host Slurm (slurmctld + slurmd + munge) for the launch tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


def _run(*cmd, check=True, **kw):
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


def ensure_installed() -> str | None:
    """None when Slurm is usable, else the reason it is not."""
    if shutil.which("slurmctld") and shutil.which("munged"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed and cannot be (needs root and apt-get)"
    try:
        _run("apt-get", "update", "-qq", timeout=300)
        _run("apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurmctld", "slurmd", "slurm-client",
             "munge", timeout=600)
    except (subprocess.SubprocessError, OSError) as e:
        return f"Slurm could not be installed: {e}"
    return None if shutil.which("slurmctld") else "Slurm install did not provide slurmctld"


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self) -> None:
        host = socket.gethostname().split(".")[0]
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""ClusterName=megaprolong-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SchedulerParameters=bf_interval=1,sched_interval=2
ReturnToService=2
MailProg=/bin/true
MpiDefault=none
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        munge_dir = Path("/run/munge")
        if _run("pgrep", "-x", "munged", check=False).returncode != 0:
            munge_dir.mkdir(parents=True, exist_ok=True)
            shutil.chown(munge_dir, "munge", "munge")
            _run("runuser", "-u", "munge", "--", "/usr/sbin/munged")
        _run("slurmctld", "-i", "-f", str(self.conf), env=self.env)
        _run("slurmd", "-f", str(self.conf), env=self.env)
        deadline = time.time() + 60
        while time.time() < deadline:
            out = _run("sinfo", "-h", "-o", "%t", env=self.env, check=False).stdout.strip()
            if out in ("idle", "mix", "alloc"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"slurmd never became idle: {out}\n{(self.root / 'log' / 'slurmctld.log').read_text()[-2000:]}")

    def sbatch(self, script: str, *options: str, env: dict) -> str:
        out = _run("sbatch", "--parsable", *options, script, env={**self.env, **env})
        return out.stdout.strip().split(";")[0]

    def state(self, job: str) -> str:
        out = _run("scontrol", "show", "job", job, env=self.env, check=False).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def wait(self, job: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout=300) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.state(job)
            if s in states:
                return s
            time.sleep(1)
        raise TimeoutError(f"job {job} still {self.state(job)} after {timeout}s")

    def signal_batch(self, job: str, sig: str = "USR1") -> None:
        """``sig`` to the batch shell only (what ``--signal=B:USR1@N`` does at the time-limit warning)."""
        _run("scancel", f"--signal={sig}", "--batch", job, env=self.env)

    def signal_all(self, job: str, sig: str = "TERM") -> None:
        """``sig`` to the batch shell and every step's processes, as Slurm preempts a job."""
        _run("scancel", f"--signal={sig}", "--full", job, env=self.env)

    def show(self, job: str) -> dict[str, str]:
        """``scontrol show job``'s fields."""
        out = _run("scontrol", "show", "job", job, env=self.env, check=False).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def cancel(self, *jobs: str) -> None:
        _run("scancel", *jobs, env=self.env, check=False)

    def submit_singleton(self, script: str, *options: str, env: dict) -> str:
        """``slurm/submit.sh SCRIPT OPTIONS``: named after the run folder, --dependency=singleton."""
        out = subprocess.run([str(Path(script).parent / "submit.sh"), script, *options], check=True,
                             capture_output=True, text=True, env={**self.env, **env})
        return out.stdout.strip().split(";")[0]

    def stop(self) -> None:
        _run("scancel", "--user=root", env=self.env, check=False)
        deadline = time.time() + 30
        while _run("squeue", "-h", env=self.env, check=False).stdout.strip() and time.time() < deadline:
            time.sleep(0.5)
        _run("scontrol", "shutdown", env=self.env, check=False)
        self.kill_leftovers()
        time.sleep(1)

    def kill_leftovers(self) -> None:
        """Processes of this cluster's jobs that outlived them: without cgroups (proctrack/pgid) Slurm does not
        see torchrun's workers, which run in sessions of their own."""
        import psutil

        mine = []
        for p in psutil.process_iter():
            try:
                if p.environ().get("SLURM_CONF") == str(self.conf) and p.pid != os.getpid():
                    mine.append(p)
            except psutil.Error:
                continue
        for p in mine:
            p.kill()
        psutil.wait_procs(mine, timeout=10)
