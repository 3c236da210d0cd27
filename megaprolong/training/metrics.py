"""Per-step metrics: a progress line, a JSONL file always, TensorBoard and W&B when asked for."""

from __future__ import annotations

import json
import os
from dataclasses import asdict


class MetricsLogger:
    """Rank 0 logs; the others construct it with ``enabled=False`` and it does nothing."""

    def __init__(self, cfg, domain_names: list[str], total_steps: int, enabled: bool, print_fn=print,
                 run_info: dict | None = None):
        self.names, self.total, self.enabled, self.print = domain_names, total_steps, enabled, print_fn
        self.run_info = run_info or {}  # constant facts of the run (e.g. the attention kernel), in every row
        self.jsonl = self.tb = self.wandb = None
        if not enabled:
            return
        if cfg.metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(cfg.metrics_file)), exist_ok=True)
            self.jsonl = open(cfg.metrics_file, "a")
        if cfg.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(cfg.tensorboard_dir)
            except ImportError:
                print_fn("logging.tensorboard_dir is set but tensorboard is not installed: not writing it")
        if cfg.wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name)
            except ImportError:
                print_fn("logging.wandb_project is set but wandb is not installed: not logging there")

    def log(self, m) -> None:
        if not self.enabled:
            return
        self.print(f"step {m.step:>5}/{self.total} | loss {m.loss:.4f} | grad norm {m.grad_norm:.3f} | "
                   f"lr {m.lr:.3e} | {m.tokens_per_s:,.0f} tok/s | {m.tflops_per_gpu:.2f} TFLOPS/GPU | data {m.data_time_s:.3f} s")
        row = {k: v for k, v in asdict(m).items() if k != "domain_loss"}
        row["tokens_per_s"] = m.tokens_per_s
        row["domain_loss"] = dict(zip(self.names, m.domain_loss))
        row.update(self.run_info)
        if self.jsonl:
            self.jsonl.write(json.dumps(row) + "\n")
            self.jsonl.flush()
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        scalars.update({f"domain_loss/{k}": v for k, v in row["domain_loss"].items()})
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
