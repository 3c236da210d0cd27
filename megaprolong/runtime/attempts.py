"""Which step a run was at when it died, so that a failure that repeats at the same step stops the run
instead of looping through restarts and requeues.

Rank 0 writes ``CHECKPOINT_DIR/progress.json`` as each step starts (``{"step": n, "clean": false}``) and
marks it clean when the run ends by itself (finished, or stopped on request). A run that starts and finds
an unclean record knows the previous attempt died during that step; if the attempt before it had died at
the same step too, the step is what fails (a bad batch, a deterministic error), and restarting would only
repeat it. ``python -m megaprolong.runtime.attempts CHECKPOINT_DIR`` tells a launcher the same thing
(exit 1 and the reason when the run must not be restarted).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

PROGRESS = "progress.json"


class RepeatedFailure(RuntimeError):
    """The same step failed in two consecutive attempts."""


def _read(folder: Path) -> dict:
    try:
        return json.loads((folder / PROGRESS).read_text())
    except (OSError, ValueError):
        return {}


def _write(folder: Path, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{PROGRESS}.{os.getpid()}"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, folder / PROGRESS)


def repeated_failure(folder: str | Path) -> str | None:
    """Why the run must not be restarted (the step that failed twice), else None."""
    record = _read(Path(folder))
    if record and not record.get("clean") and record.get("failed_before") == record.get("step"):
        return (f"step {record['step']} failed in two attempts in a row ({record.get('error') or 'the process died'}): "
                f"not restarting; fix the cause (data, config), then resubmit")
    return None


class Attempt:
    """One attempt of a run, as seen by rank 0 (``enabled=False`` on the other ranks: does nothing)."""

    def __init__(self, folder: str | Path | None, enabled: bool):
        self.folder = Path(folder) if folder and enabled else None
        self.failed_before = None
        if self.folder is None:
            return
        previous = _read(self.folder)
        if previous and not previous.get("clean"):  # the previous attempt died during previous["step"]
            if previous.get("failed_before") == previous["step"]:
                raise RepeatedFailure(repeated_failure(self.folder))
            self.failed_before = previous["step"]

    def step_starts(self, step: int) -> None:
        if self.folder is not None:
            _write(self.folder, {"step": step, "clean": False, "failed_before": self.failed_before})

    def failed(self, step: int, error: BaseException) -> None:
        if self.folder is not None:
            _write(self.folder, {"step": step, "clean": False, "failed_before": self.failed_before,
                                 "error": f"{type(error).__name__}: {error}"[:500]})

    def ended(self) -> None:
        if self.folder is not None:
            _write(self.folder, {"step": None, "clean": True})


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    reason = repeated_failure(argv[0]) if argv else "usage: python -m megaprolong.runtime.attempts CHECKPOINT_DIR"
    if reason:
        print(reason)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
