"""Stopping on request: checkpoint after the current step, then exit. Every rank saves the same step: they
agree through an all-reduce once per step.

What asks for a stop:

- **SIGUSR1**: Slurm's time-limit warning (``--signal=B:USR1@600``), forwarded to the workers by the batch
  shell.
- **SIGTERM**: preemption (Slurm's default signal for it) and the time limit itself. Slurm sends it to every
  process of the job, torchrun's agent included, which passes it on and gives its workers
  ``--shutdown-timeout`` seconds before SIGKILL (torch >= 2.12; before, a fixed 30 s, and rank 0 warns
  when more is asked: :func:`torchrun_grace_warning`). But the agent also sends SIGTERM when it tears the
  workers down because a peer died; then the step can never complete and the worker must exit at once.
  The two are told apart by the STOP flag below, which the batch shell writes the moment Slurm signals
  it: a worker that gets SIGTERM waits up to ``STOP_FLAG_WAIT_S`` for the flag; with it, it stops after
  the step; without it, it exits at once, as the default action would. The decision is taken in a
  thread woken by the signal itself (``signal.set_wakeup_fd``), so a main thread blocked in a collective
  with a dead peer does not delay it.
- **The STOP flag** (``RUN_FOLDER/STOP``): written by the batch shell on either signal and by rank 0 when
  a stop is agreed, naming the launch (Slurm job and allocation, or torchrun's run). Workers of that
  launch that start later (torchrun restarted them, or the signal came before they existed) stop at
  their first step; a later launch ignores and removes it.

The handlers are installed first thing in ``main()``: a signal that comes while the model is built or a
checkpoint is read is kept, not lost (SIGUSR1's default action would kill the process).
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from megaprolong.runtime.files import replace_text

STOP = "STOP"
STOP_FLAG_WAIT_S = 2.0


def launch_id() -> str | None:
    """One allocation of a job (a requeued job is a new launch), or one torchrun run; None otherwise."""
    if os.environ.get("SLURM_JOB_ID"):
        return f"{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    return os.environ.get("TORCHELASTIC_RUN_ID") or None


def stop_flag(folder: str | Path | None) -> dict | None:
    """The STOP flag of this launch in ``folder``, else None."""
    if not folder:
        return None
    try:
        flag = json.loads((Path(folder) / STOP).read_text())
    except (OSError, ValueError):
        return None
    return flag if flag.get("run") is not None and flag.get("run") == launch_id() else None


def write_stop_flag(folder: str | Path, reason: str) -> None:
    replace_text(Path(folder) / STOP, json.dumps({"run": launch_id(), "reason": reason, "time": time.time()}))


def remove_stale_stop_flag(folder: str | Path | None) -> None:
    """A STOP flag left by an earlier launch (rank 0, at start)."""
    if folder and (Path(folder) / STOP).exists() and stop_flag(folder) is None:
        (Path(folder) / STOP).unlink(missing_ok=True)


TORCHRUN_FIXED_GRACE_S = 30  # what torchrun's agent waits before SIGKILL where it has no setting for it


def torchrun_grace_warning(environ: Mapping[str, str] = os.environ) -> str | None:
    """On rank 0 of a torchrun launch: why its workers cannot have the seconds after SIGTERM that
    ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` asks for (the sbatch scripts set it to TERM_GRACE), if so.

    torch 2.12 gave torchrun ``--shutdown-timeout``, read from that variable when not given; before, its
    agent kills the workers 30 s after passing SIGTERM on, whatever is asked. A stop that needs longer (the
    current step, then the checkpoint) is then lost: the run resumes from the checkpoint before.
    """
    import dataclasses

    asked = environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "")
    if "TORCHELASTIC_RUN_ID" not in environ or environ.get("RANK") != "0" or not asked.isdigit():
        return None
    import torch
    from torch.distributed.launcher.api import LaunchConfig

    if int(asked) <= TORCHRUN_FIXED_GRACE_S or "shutdown_timeout" in {f.name for f in dataclasses.fields(LaunchConfig)}:
        return None
    return (f"torch {torch.__version__}'s torchrun kills the workers {TORCHRUN_FIXED_GRACE_S} s after passing SIGTERM "
            f"on, not the {asked} s asked (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, TERM_GRACE in the sbatch scripts; "
            f"torch >= 2.12 has the setting): on a preemption, a step and its checkpoint that take longer are "
            f"lost, and the run resumes from the checkpoint before")


class StopRequest:
    """Signal handlers and the STOP flag; :meth:`agreed` is the per-step collective decision."""

    def __init__(self):
        self.requested: str | None = None  # what asked, once something did
        self.folder: Path | None = None
        elastic = "TORCHELASTIC_RUN_ID" in os.environ
        signal.signal(signal.SIGUSR1, self._handler)
        signal.signal(signal.SIGTERM, self._handler)
        self._read_fd = None
        if (warning := torchrun_grace_warning()) is not None:
            print(f"megaprolong: warning: {warning}", file=sys.stderr, flush=True)
        if elastic:  # SIGTERM may be the agent's teardown: decide at once in a thread woken by the signal
            self._read_fd, write_fd = os.pipe()
            os.set_blocking(write_fd, False)
            signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
            threading.Thread(target=self._on_wakeup, name="megaprolong-stop", daemon=True).start()

    def watch(self, folder: str | Path | None) -> None:
        """Honour this launch's STOP flag in ``folder`` (the run folder, once the config is read)."""
        self.folder = Path(folder) if folder else None

    def _handler(self, signum, frame):
        if signum == signal.SIGUSR1 or self._read_fd is None or stop_flag(self.folder):
            self.requested = signal.Signals(signum).name

    def _on_wakeup(self) -> None:
        while True:
            select.select([self._read_fd], [], [])
            for signum in os.read(self._read_fd, 64):
                if signum != signal.SIGTERM:
                    continue
                deadline = time.monotonic() + STOP_FLAG_WAIT_S
                while stop_flag(self.folder) is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                if stop_flag(self.folder) is None:  # not a preemption: the agent is tearing workers down
                    os._exit(128 + signal.SIGTERM)
                self.requested = "SIGTERM"

    def agreed(self) -> bool:
        """Whether any rank was asked to stop, by a signal or this launch's STOP flag (collective: every rank
        calls it at the same step). Rank 0 then leaves the flag for workers restarted in this launch."""
        import torch
        import torch.distributed as dist

        from megaprolong.runtime.device import device

        if self.requested is None and stop_flag(self.folder):
            self.requested = "STOP flag"
        if not dist.is_initialized():
            return self.requested is not None
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stopping = bool(flag.item())
        if stopping and dist.get_rank() == 0 and self.folder is not None and not stop_flag(self.folder):
            write_stop_flag(self.folder, self.requested or "signal on another rank")
        return stopping
