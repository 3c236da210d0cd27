"""One log format for every command (train, SFT, evaluation, conversion):

    2026-12-02 01:23:45 [train r0] step    12/5000 | loss 2.3456 | ...

a wall-clock stamp, the tool and the rank. Rank 0 logs progress (INFO); the other ranks only warnings and
errors, so a 512-rank job's log reads like one process's. Lines go to stdout; a command's one-line error
messages (bad input) stay on stderr, as ``megaprolong-TOOL: ...``.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "megaprolong"


def rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def get_logger(tool: str) -> logging.Logger:
    """The logger of ``tool`` ("train", "sft", "eval", "convert"), set up once per process."""
    root = logging.getLogger(ROOT)
    if not getattr(root, "_megaprolong_setup", False):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(_Format())
        root.handlers = [handler]
        root.setLevel(logging.INFO if rank() == 0 else logging.WARNING)
        root.propagate = False
        root._megaprolong_setup = True
    return root.getChild(tool)


class _Format(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s [%(tool)s r%(rank)s] %(message)s", "%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        record.tool = record.name.split(".", 1)[1] if "." in record.name else record.name
        record.rank = rank()
        return super().format(record)
