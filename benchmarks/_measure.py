"""Shared by the benchmarks: run a command, return its wall time and the peak RSS of its process tree."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psutil


def run_measured(cmd: list[str], cwd: Path, env: dict | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes of the process and its children); raises on a non-zero exit."""
    start = time.perf_counter()
    proc = psutil.Popen(cmd, cwd=cwd, env=dict(os.environ, **(env or {})), stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(True)))
        except psutil.Error:
            pass
        time.sleep(0.02)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{proc.stderr.read().decode()[-3000:]}")
    return time.perf_counter() - start, peak
