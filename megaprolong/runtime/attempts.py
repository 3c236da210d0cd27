"""The run's record of its attempts (``RUN_FOLDER/progress.json``), so that a launcher restarts what can
succeed and nothing else.

Rank 0 writes it: ``step`` is where the current attempt is (0 during start-up, before step 1), ``clean``
is set when the run ends by itself (finished, or stopped on request). An attempt that starts and finds an
unclean record knows the previous one died at that step; if the one before died at the same step too, the
step is what fails (a bad batch, a deterministic error, a hang, an OOM while loading) and restarting would
only repeat it (:class:`RepeatedFailure`, exit 3).

Two more outcomes stop a run for good:

- **fatal** (exit 2): bad input (config, data, no checkpoint that verifies). Recorded with the launch's
  run id (the Slurm job id, or torchrun's run id), so that workers torchrun restarts in the same launch
  exit at once, and the batch shell does not requeue; a new submission starts afresh.
- **requeue budget spent**: the batch shell asks :func:`requeue_verdict` after a failure. Only failure
  requeues count (a preemption or time-limit requeue does not), and the count starts again whenever the
  run got past the step it failed at before.

``python -m megaprolong.runtime.attempts FOLDER [--requeue MAX]`` tells a launcher (exit 1 and the reason
on stdout when it must stop).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from megaprolong.runtime.files import replace_text

PROGRESS = "progress.json"
FATAL_EXIT = 2  # bad input: not retried
REPEATED_EXIT = 3  # the same step failed twice: not retried


class RepeatedFailure(RuntimeError):
    """The same step failed in two consecutive attempts."""


class FatalError(RuntimeError):
    """Bad input (config, data, checkpoints): retrying cannot help."""


def run_id() -> str | None:
    """This launch's identity: the Slurm job (kept across requeues) or torchrun's run (kept across its
    restarts); None for a plain process."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or None


def read(folder: str | Path) -> dict:
    try:
        return json.loads((Path(folder) / PROGRESS).read_text())
    except (OSError, ValueError):
        return {}


def _write(folder: Path, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    replace_text(folder / PROGRESS, json.dumps(record))


def _update(folder: Path, **changes) -> dict:
    record = {**read(folder), **changes}
    _write(folder, record)
    return record


def _where(step: int) -> str:
    return "start-up" if step == 0 else f"step {step}"


def repeated_failure(folder: str | Path) -> str | None:
    """Why the run must not be restarted (the step that failed twice), else None."""
    record = read(folder)
    if record and not record.get("clean") and record.get("step") is not None \
            and record.get("failed_before") == record["step"]:
        return (f"{_where(record['step'])} failed in two attempts in a row "
                f"({record.get('error') or 'the process died'}): not restarting; fix the cause (data, config), "
                f"then resubmit")
    return None


def fatal_error(folder: str | Path, launch: str | None = None) -> str | None:
    """The fatal error recorded by this launch (``launch`` defaults to :func:`run_id`), else None."""
    fatal = read(folder).get("fatal")
    launch = launch if launch is not None else run_id()
    if fatal and launch is not None and fatal.get("run") == launch:
        return fatal["error"]
    return None


def record_fatal(folder: str | Path | None, error: str) -> None:
    """Record bad input for this launch (rank 0 only): restarts in it exit at once, no requeue."""
    if folder:
        _update(Path(folder), fatal={"run": run_id(), "error": error}, clean=False)


def note_checkpoint(folder: str | Path | None, step: int) -> None:
    """A checkpoint of ``step`` was published (rank 0): a later start that finds none verifying stops."""
    if folder:
        _update(Path(folder), checkpoint=max(step, int(read(folder).get("checkpoint") or 0)))


class Attempt:
    """One attempt of a run, as seen by rank 0 (``enabled=False`` on the other ranks: does nothing)."""

    def __init__(self, folder: str | Path | None, enabled: bool):
        self.folder = Path(folder) if folder and enabled else None
        self.failed_before = None
        if self.folder is None:
            return
        previous = read(self.folder)
        if previous and not previous.get("clean") and previous.get("step") is not None:
            if previous.get("failed_before") == previous["step"]:  # died where the attempt before it died
                raise RepeatedFailure(repeated_failure(self.folder))
            self.failed_before = previous["step"]
        self.step_starts(0)  # start-up: a death before step 1 counts as a failure of "step 0"

    def step_starts(self, step: int) -> None:
        if self.folder is not None:
            _update(self.folder, step=step, clean=False, failed_before=self.failed_before, error=None, fatal=None)

    def failed(self, step: int, error: BaseException | str) -> None:
        if self.folder is not None:
            text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
            _update(self.folder, step=step, clean=False, failed_before=self.failed_before, error=text[:500])

    def ended(self) -> None:
        if self.folder is not None:
            _update(self.folder, step=None, clean=True, failed_before=None, error=None)


def start_attempt(folder: str | Path | None, rank0: bool) -> Attempt:
    """This attempt's record, read and kept by rank 0 before any work; every rank raises
    :class:`RepeatedFailure` when the previous two attempts died at the same step (collective when
    torch.distributed is initialized)."""
    reason, attempt = [None], Attempt(None, enabled=False)
    if rank0:
        try:
            attempt = Attempt(folder, enabled=True)
        except RepeatedFailure as e:
            reason = [str(e)]
    import torch.distributed as dist  # here: the launcher's check (main) needs only the standard library

    if dist.is_initialized():
        dist.broadcast_object_list(reason, src=0)
    if reason[0]:
        raise RepeatedFailure(reason[0])
    return attempt


def requeue_verdict(folder: str | Path, max_requeues: int) -> tuple[bool, str]:
    """After a failed launch: (requeue?, why). Counts this failure requeue in the record; the count
    restarts when the run got past the step where the previous counted failure happened."""
    folder = Path(folder)
    if (error := fatal_error(folder)) is not None:
        return False, error
    if (reason := repeated_failure(folder)) is not None:
        return False, reason
    record = read(folder)
    step = record.get("step") or 0
    previous = record.get("requeues") or {"count": 0, "step": -1}
    count = previous["count"] + 1 if step <= previous["step"] else 1
    if count > max_requeues:
        return False, (f"{count - 1} failure requeue(s) in a row without getting past {_where(previous['step'])} "
                       f"(MAX_REQUEUES={max_requeues}): giving up; the log above has the errors")
    _update(folder, requeues={"count": count, "step": step if count == 1 else previous["step"]})
    return True, f"failure requeue {count} of {max_requeues} at {_where(step)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megaprolong.runtime.attempts",
                                     description="Whether a run may be restarted (exit 0) or must stop (exit 1, "
                                                 "the reason on stdout).")
    parser.add_argument("folder", help="the run's checkpoint folder (holds progress.json)")
    parser.add_argument("--requeue", type=int, metavar="MAX", default=None,
                        help="after a failed launch: count a failure requeue and allow at most MAX in a row")
    args = parser.parse_args(argv)
    if args.requeue is not None:
        allowed, why = requeue_verdict(args.folder, args.requeue)
        print(why)
        return 0 if allowed else 1
    reason = fatal_error(args.folder) or repeated_failure(args.folder)
    if reason:
        print(reason)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
