"""Slurm preemption and time limits: SIGTERM / SIGUSR1 ask a run to checkpoint and exit after the current
step. Ranks agree through an all-reduce so that they all save the same step.

Under torchrun (elastic), SIGTERM comes from its agent tearing the workers down: a peer died, so the step
can never complete and a handler waiting for it would wait for the collective timeout. There SIGTERM ends
the worker at once (the run restarts from its newest checkpoint); preemption reaches the workers as
SIGUSR1 (the sbatch scripts send it), which still checkpoints first."""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

from megaprolong.runtime.device import device


class StopRequest:
    def __init__(self):
        self.requested = False
        elastic = "TORCHELASTIC_RUN_ID" in os.environ
        signal.signal(signal.SIGUSR1, self._handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL if elastic else self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        """Whether any rank was signalled (collective: every rank calls it at the same step)."""
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
