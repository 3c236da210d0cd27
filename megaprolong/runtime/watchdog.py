"""A step watchdog: a hang costs minutes, not the collective timeout (two hours at 512K).

Each phase of the run (start-up, a step, a checkpoint save) is given a time budget; if it has not ended
when the budget runs out, every thread's stack is printed (so the log shows where each rank waited) and the
process exits with ``HUNG_EXIT``, so that torchrun restarts the workers from the newest checkpoint. The run's
attempt record then shows the step as failed, and a step that hangs twice in a row stops the run.

Budgets (:class:`WatchdogConfig`): start-up and the first ``warmup_steps`` steps get ``startup_minutes``
(compilation, allocator warm-up, the first collective of each group); after that a step gets ``factor`` x
the median of the steady steps so far, at least ``floor_minutes``; a save gets ``save_minutes``.

Two timers are armed together: a Python thread that names the rank and phase, prints the stacks and exits
(it runs whenever the main thread waits in a collective, which releases the interpreter lock), and
faulthandler's C-level timer a minute later, which does the same even if the interpreter is stuck.
"""

from __future__ import annotations

import faulthandler
import os
import statistics
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

HUNG_EXIT = 75


@dataclass
class WatchdogConfig:
    enabled: bool = True  # exit (and let torchrun restart) when a step, a save or start-up overruns its budget
    factor: float = 5.0  # a steady step may take this many times the median step time
    floor_minutes: float = 5.0  # but never less than this
    startup_minutes: float = 30.0  # start-up (process groups, model, checkpoint load) and each warm-up step
    warmup_steps: int = 3  # steps timed with the start-up budget before the median is trusted
    save_minutes: float = 30.0  # one checkpoint save


class StepWatchdog:
    """Arm it before each phase; :meth:`step_done` feeds the step times the budget is derived from."""

    def __init__(self, cfg: WatchdogConfig, rank: int, on_expire: Callable[[str], None] | None = None):
        self.cfg, self.rank, self.on_expire = cfg, rank, on_expire
        self.step_times: list[float] = []
        self._timer: threading.Timer | None = None

    def step_budget_s(self) -> float:
        c = self.cfg
        steady = self.step_times[c.warmup_steps:]
        if not steady:
            return c.startup_minutes * 60
        return max(c.floor_minutes * 60, c.factor * statistics.median(steady))

    def arm(self, what: str, budget_s: float) -> None:
        if not self.cfg.enabled:
            return
        self.disarm()
        self._timer = threading.Timer(budget_s, self._expire, (what, budget_s))
        self._timer.daemon = True
        self._timer.start()
        faulthandler.dump_traceback_later(budget_s + 60, exit=True)

    def arm_step(self, step: int) -> None:
        self.arm(f"step {step}", self.step_budget_s())

    def arm_save(self, step: int) -> None:
        self.arm(f"checkpoint save at step {step}", self.cfg.save_minutes * 60)

    def step_done(self, seconds: float) -> None:
        self.step_times.append(seconds)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        faulthandler.cancel_dump_traceback_later()

    def _expire(self, what: str, budget_s: float) -> None:
        message = (f"watchdog: rank {self.rank}: {what} did not finish within {budget_s:.0f} s; "
                   f"the stacks of every thread follow, then this worker exits so that the launcher restarts")
        print(message, file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        if self.on_expire is not None:
            try:
                self.on_expire(f"hung: {what} exceeded {budget_s:.0f} s")
            except Exception:  # noqa: BLE001  exiting matters more than the record
                pass
        os._exit(HUNG_EXIT)
