"""Per-step metrics: the step line, a JSONL file always, TensorBoard and W&B when asked for.

The step line is what Megatron and torchtitan users read::

    step    12/5000 | loss 2.3456 | grad norm 0.512 | lr 1.000e-05 | 5,432 ms | 50.3M tokens | 772,000 tok/s
    | 312.4 TFLOPS/GPU | MFU 31.6% | mem 61.2 GiB | data 0.003 s | ETA 7h12m

(MFU only where the GPU's peak is known; on the CPU ``mem`` is the peak RSS.) A resumed run rewrites
``metrics.jsonl`` to the steps before its checkpoint first, so the file has one row per step; values that are
not finite are written as ``null`` (valid JSON). TensorBoard purges the steps after the checkpoint the same
way; W&B continues the same run (its id is kept in the run folder, ``resume="allow"``).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections import deque
from dataclasses import asdict
from pathlib import Path

from megaprolong.runtime.files import replace_text

WANDB_ID = "wandb_run_id"


def finite_or_none(value):
    """JSON has no NaN or infinity: such values become null (recursively)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def keep_rows_up_to(path: Path, step: int) -> None:
    """Rewrite a metrics file to its rows of steps <= ``step`` (a resumed run logs the later ones again); a
    half-written last row is dropped."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("step") is not None and row["step"] <= step:
            kept.append(line)
    replace_text(path, "".join(line + "\n" for line in kept))


def duration(seconds: float) -> str:
    seconds = int(seconds)
    d, h, m = seconds // 86400, seconds // 3600 % 24, seconds // 60 % 60
    return f"{d}d{h}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{seconds % 60:02d}s"


def count(n: float) -> str:
    """1.2K, 50.3M, 20.1B."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def step_line(m, total: int, tokens_seen: int, peak_tflops: float | None, eta_s: float | None) -> str:
    mfu = f" | MFU {100 * m.tflops_per_gpu / peak_tflops:.1f}%" if peak_tflops else ""
    eta = f" | ETA {duration(eta_s)}" if eta_s is not None else ""
    evaluated = f" | held-out loss {m.eval_loss:.4f}" if m.eval_loss is not None else ""
    return (f"step {m.step:>5}/{total} | loss {m.loss:.4f} | grad norm {m.grad_norm:.3f} | lr {m.lr:.3e} | "
            f"{1000 * m.step_time_s:,.0f} ms | {count(tokens_seen)} tokens | {m.tokens_per_s:,.0f} tok/s | "
            f"{m.tflops_per_gpu:.2f} TFLOPS/GPU{mfu} | mem {m.peak_memory_bytes / 2**30:.2f} GiB | "
            f"data {m.data_time_s:.3f} s{evaluated}{eta}")


class MetricsLogger:
    """Rank 0 logs; the others construct it with ``enabled=False`` and it does nothing.

    ``resume_step``: the step the run resumed at (rows after it are rewritten); ``tokens_per_step``: tokens
    each optimizer step consumes (for the running total); ``peak_tflops``: the GPU's peak for MFU (None: not
    shown); ``run_config``: the resolved config (W&B's ``config=``); ``run_folder``: where W&B's run id is
    kept; ``heldout_names``: the domains of the held-out loss."""

    def __init__(self, cfg, domain_names: list[str], total_steps: int, enabled: bool, print_fn=print,
                 run_info: dict | None = None, *, resume_step: int = 0, tokens_per_step: int = 0,
                 peak_tflops: float | None = None, run_config: dict | None = None, run_folder: str | None = None,
                 heldout_names: list[str] | None = None):
        self.names, self.total, self.enabled, self.print = domain_names, total_steps, enabled, print_fn
        self.run_info = run_info or {}  # constant facts of the run (e.g. the attention kernel), in every row
        self.tokens_per_step, self.peak_tflops = tokens_per_step, peak_tflops
        self.recent = deque(maxlen=20)  # step times for the ETA
        self.names_heldout = heldout_names or []  # the held-out domains (eval.data), when evaluated
        self.jsonl = self.tb = self.wandb = None
        if not enabled:
            return
        if cfg.metrics_file:
            path = Path(cfg.metrics_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            keep_rows_up_to(path, resume_step)
            self.jsonl = open(path, "a")  # noqa: SIM115 (closed by close())
        if cfg.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # events of steps after the resumed checkpoint, written before the restart, are dropped
                self.tb = SummaryWriter(cfg.tensorboard_dir, purge_step=resume_step + 1 if resume_step else None)
            except ImportError:
                print_fn("logging.tensorboard_dir is set but tensorboard is not installed: not writing it")
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                print_fn("logging.wandb_project is set but wandb is not installed: not logging there")
            else:
                folder = Path(run_folder or os.path.dirname(os.path.abspath(cfg.metrics_file or ".")))
                folder.mkdir(parents=True, exist_ok=True)
                id_file = folder / WANDB_ID
                run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
                id_file.write_text(run_id + "\n")
                self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, id=run_id,
                                        resume="allow", config=run_config, dir=str(folder))

    def log(self, m) -> None:
        if not self.enabled:
            return
        self.recent.append(m.step_time_s)
        eta = (self.total - m.step) * sum(self.recent) / len(self.recent) if self.recent else None
        tokens_seen = m.step * self.tokens_per_step
        self.print(step_line(m, self.total, tokens_seen, self.peak_tflops, eta))
        row = {k: v for k, v in asdict(m).items() if k not in ("domain_loss", "eval_domain_loss")}
        row["tokens_per_s"] = m.tokens_per_s
        row["tokens_seen"] = tokens_seen
        if self.peak_tflops:
            row["mfu"] = m.tflops_per_gpu / self.peak_tflops
        row["domain_loss"] = dict(zip(self.names, m.domain_loss))
        if m.eval_loss is not None:
            row["eval_domain_loss"] = dict(zip(self.names_heldout, m.eval_domain_loss))
        row.update(self.run_info)
        row = finite_or_none(row)
        if self.jsonl:
            self.jsonl.write(json.dumps(row, allow_nan=False) + "\n")
            self.jsonl.flush()
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k != "step"}
        scalars.update({f"domain_loss/{k}": v for k, v in row["domain_loss"].items() if v is not None})
        scalars.update({f"eval_domain_loss/{k}": v for k, v in row.get("eval_domain_loss", {}).items()
                        if v is not None})
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, m.step)
        if self.wandb:
            self.wandb.log(scalars, step=m.step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
