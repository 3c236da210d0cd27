"""The training loop: megatron-core model chunks, DDP, distributed optimizer and pipeline schedule.

One optimizer step = one global batch of ``train.global_batch_size`` sequences. Each data-parallel rank
takes its contiguous slice and runs it as micro-batches through megatron-core's forward/backward
schedule (1F1B over pipeline stages). The loss is the exact token average over the whole global batch:
each micro-batch returns (sum of token losses, number of target tokens) and megatron-core divides the
gradients by the global token count (``calculate_per_token_loss``), REFERENCE.md section 3.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from megaprolong.data.packing import Sample, balance_micro_batches
from megaprolong.model.llama import build_model, transformer_config
from megaprolong.runtime.device import device, init_distributed, local_rank_zero_first
from megaprolong.training.config import Config, validate


@dataclass
class StepMetrics:
    step: int
    loss: float
    grad_norm: float
    lr: float
    tokens: int  # target tokens in the global batch
    step_time_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_time_s if self.step_time_s > 0 else 0.0


def token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Megatron loss function: (sum of masked token losses, int token count, report for logging)."""
    mask = loss_mask.reshape(-1).float()
    total = torch.sum(per_token_loss.reshape(-1).float() * mask)
    count = mask.sum().to(torch.int)
    return total, count, {"lm loss": torch.stack([total.detach(), count.detach().float()])}


class Trainer:
    """Owns the process groups, model chunks, optimizer and LR schedule of one training run."""

    def __init__(self, cfg: Config):
        init_distributed(cfg.train.dist_timeout_minutes)
        validate(cfg, dist.get_world_size())
        self.cfg = cfg
        p = cfg.parallel
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(
                tensor_model_parallel_size=p.tp,
                pipeline_model_parallel_size=p.pp,
                virtual_pipeline_model_parallel_size=p.vpp,
                context_parallel_size=p.cp,
                distributed_timeout_minutes=cfg.train.dist_timeout_minutes,
            )
        # Same seed on data-parallel peers, distinct per TP/PP rank where megatron needs it.
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.tf_config = self._transformer_config()
        self.model = self._build_model_chunks()
        self.optimizer = self._build_optimizer()
        self.scheduler = self._build_scheduler()
        self.step = 0

    # ---- set-up -------------------------------------------------------------------------------------
    def _transformer_config(self):
        cfg, p = self.cfg, self.cfg.parallel
        bf16 = cfg.train.precision == "bf16"
        recompute = {} if cfg.train.recompute == "none" else (
            {"recompute_granularity": "selective"} if cfg.train.recompute == "selective"
            else {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1})
        config = transformer_config(
            cfg.model,
            tensor_model_parallel_size=p.tp,
            pipeline_model_parallel_size=p.pp,
            virtual_pipeline_model_parallel_size=p.vpp,
            context_parallel_size=p.cp,
            sequence_parallel=p.sequence_parallel,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
            bf16=bf16,
            calculate_per_token_loss=True,
            **recompute,
        )
        config.finalize_model_grads_func = finalize_model_grads
        return config

    def _build_model_chunks(self) -> list[torch.nn.Module]:
        p = self.cfg.parallel
        chunks = []
        for vp_stage in range(p.vpp or 1):
            vp = vp_stage if p.vpp else None
            model = build_model(
                self.cfg.model,
                self.tf_config,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
                vp_stage=vp,
            )
            model.to(device())
            if self.tf_config.bf16:
                model = Float16Module(self.tf_config, model)
            ddp_config = DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                overlap_grad_reduce=False,
                use_distributed_optimizer=p.distributed_optimizer,
                average_in_collective=False,  # the per-token loss scales by the global token count
            )
            chunks.append(DistributedDataParallel(config=self.tf_config, ddp_config=ddp_config, module=model))
        for chunk in chunks:
            chunk.broadcast_params()  # data-parallel replicas start from identical weights
        return chunks

    def _build_optimizer(self):
        o, t = self.cfg.optimizer, self.cfg.train
        config = McoreOptimizerConfig(
            optimizer="adam",  # megatron's "adam" is decoupled-weight-decay AdamW
            lr=o.lr,
            min_lr=o.lr * o.min_lr_ratio,
            weight_decay=o.weight_decay,
            adam_beta1=o.beta1,
            adam_beta2=o.beta2,
            adam_eps=o.eps,
            clip_grad=o.clip_grad,
            bf16=t.precision == "bf16",
            params_dtype=self.tf_config.params_dtype,
            use_distributed_optimizer=self.cfg.parallel.distributed_optimizer,
        )
        return get_megatron_optimizer(config, self.model)

    def _build_scheduler(self) -> OptimizerParamScheduler:
        o, steps = self.cfg.optimizer, self.cfg.train.steps
        return OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=o.lr,
            min_lr=o.lr * o.min_lr_ratio,
            lr_warmup_steps=round(o.warmup_fraction * steps),
            lr_decay_steps=steps,
            lr_decay_style="cosine",
            start_wd=o.weight_decay,
            end_wd=o.weight_decay,
            wd_incr_steps=steps,
            wd_incr_style="constant",
        )

    # ---- one step -----------------------------------------------------------------------------------
    def _micro_batches(self, global_batch: list[Sample]) -> list[dict[str, torch.Tensor]]:
        """This data-parallel rank's slice of the global batch, as micro-batch tensors on the device."""
        mbs = self.cfg.train.micro_batch_size
        global_batch = balance_micro_batches(global_batch, self.dp_size, mbs)
        per_rank = len(global_batch) // self.dp_size
        mine = global_batch[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        batches = []
        for i in range(0, per_rank, mbs):
            group = mine[i:i + mbs]
            tokens = torch.from_numpy(np.stack([s.tokens for s in group]))
            batches.append({
                "tokens": tokens.to(device()),
                "position_ids": torch.arange(tokens.shape[1]).expand_as(tokens).to(device()),
                "labels": torch.from_numpy(np.stack([s.labels for s in group])).to(device()),
                "loss_mask": torch.from_numpy(np.stack([s.loss_mask for s in group])).to(device()),
            })
        return batches

    @staticmethod
    def _forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
        return output, partial(token_loss, batch["loss_mask"])

    def forward_backward(self, global_batch: list[Sample]) -> list[dict]:
        """Gradients of the token-averaged loss of ``global_batch`` (every rank passes the whole batch)."""
        batches = self._micro_batches(global_batch)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        data = iter(batches) if len(self.model) == 1 else [iter(batches) for _ in self.model]
        return get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=data,
            model=self.model,
            num_microbatches=len(batches),
            seq_length=self.cfg.train.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size,
            forward_only=False,
        )

    def optimizer_step(self) -> tuple[float, float]:
        """Clip, update, advance the schedule; returns (grad norm before clipping, LR used)."""
        lr = self.optimizer.param_groups[0]["lr"]
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        self.step += 1
        return (float(grad_norm) if grad_norm is not None else math.nan), lr

    def train_step(self, global_batch: list[Sample]) -> StepMetrics:
        start = time.perf_counter()
        reports = self.forward_backward(global_batch)
        grad_norm, lr = self.optimizer_step()
        loss, tokens = self._global_loss(reports)
        return StepMetrics(self.step, loss, grad_norm, lr, tokens, time.perf_counter() - start)

    def _global_loss(self, reports: list[dict]) -> tuple[float, int]:
        """Token-averaged loss over the global batch, known on every rank."""
        totals = torch.zeros(2, dtype=torch.float64)
        for report in reports:  # only the last pipeline stage has reports
            totals += report["lm loss"].double().cpu()
        totals = totals.to(device())
        dist.all_reduce(totals, group=ps.get_data_parallel_group(with_context_parallel=True))
        # Broadcast from the last pipeline stage so every rank can log the same value.
        dist.all_reduce(totals, group=ps.get_pipeline_model_parallel_group())
        loss_sum, count = totals.tolist()
        return loss_sum / max(count, 1.0), int(count)


def run(cfg: Config, make_dataset, log=print) -> list[StepMetrics]:
    """Train ``cfg.train.steps`` steps on ``make_dataset()`` (anything with ``global_batch(step, size)``),
    built by one rank per node first so its on-disk index cache is built once per node."""
    trainer = Trainer(cfg)
    with local_rank_zero_first():
        dataset = make_dataset()
    history = []
    metrics_file = None
    if cfg.logging.metrics_file and dist.get_rank() == 0:
        metrics_file = open(cfg.logging.metrics_file, "a")
    try:
        while trainer.step < cfg.train.steps:
            m = trainer.train_step(dataset.global_batch(trainer.step, cfg.train.global_batch_size))
            history.append(m)
            if dist.get_rank() == 0:
                log(f"step {m.step:>5}/{cfg.train.steps} | loss {m.loss:.4f} | grad norm {m.grad_norm:.3f} | "
                    f"lr {m.lr:.3e} | {m.tokens_per_s:,.0f} tok/s")
                if metrics_file:
                    metrics_file.write(json.dumps({"step": m.step, "loss": m.loss, "grad_norm": m.grad_norm,
                                                   "lr": m.lr, "tokens_per_s": m.tokens_per_s}) + "\n")
                    metrics_file.flush()
    finally:
        if metrics_file:
            metrics_file.close()
    return history
