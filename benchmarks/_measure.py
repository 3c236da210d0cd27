"""Shared by the benchmarks: run a command, return its wall time and the peak memory of its process tree."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psutil


def _anon_bytes(proc: psutil.Process) -> int:
    """Anonymous resident memory (RssAnon): what the process allocated, without file pages it maps
    (memory-mapped safetensors / indexed datasets are page cache the kernel can drop)."""
    with open(f"/proc/{proc.pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return proc.memory_info().rss


def run_measured(cmd: list[str], cwd: Path, env: dict | None = None, anonymous: bool = False) -> tuple[float, int]:
    """(wall seconds, peak memory bytes of the process and its children: RSS, or with ``anonymous`` only
    anonymous memory); raises on a non-zero exit."""
    start = time.perf_counter()
    proc = psutil.Popen(cmd, cwd=cwd, env=dict(os.environ, **(env or {})), stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE)
    measure = _anon_bytes if anonymous else (lambda p: p.memory_info().rss)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, measure(proc) + sum(measure(c) for c in proc.children(True)))
        except (psutil.Error, OSError):
            pass
        time.sleep(0.02)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{proc.stderr.read().decode()[-3000:]}")
    return time.perf_counter() - start, peak
