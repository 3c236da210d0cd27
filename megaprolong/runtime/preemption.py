"""Slurm preemption and time limits: SIGTERM / SIGUSR1 ask a run to checkpoint and exit after the current
step. Ranks agree through an all-reduce so that they all save the same step."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from megaprolong.runtime.device import device


class StopRequest:
    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        """Whether any rank was signalled (collective: every rank calls it at the same step)."""
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
