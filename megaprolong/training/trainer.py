"""The training loop: megatron-core model chunks, DDP, distributed optimizer and pipeline schedule.

One optimizer step = one global batch of ``train.global_batch_size`` sequences. Each data-parallel rank
takes its contiguous slice and runs it as micro-batches through megatron-core's forward/backward
schedule (1F1B over pipeline stages). The loss is the exact token average over the whole global batch:
each micro-batch returns (sum of token losses, number of target tokens) and megatron-core divides the
gradients by the global token count (``calculate_per_token_loss``): a per-micro-batch mean would weight
short and long micro-batches alike, which is not the token average ProLong trains on.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from megaprolong.data.packing import Sample, balance_micro_batches
from megaprolong.data.prefetch import BatchPrefetcher
from megaprolong.model.chunked_loss import lm_head_loss
from megaprolong.model.attention import packed_batch, select_kernel
from megaprolong.model.attention.kernels import KernelMismatch, self_test
from megaprolong.model.context_parallel import concat_packed, split_for_context_parallel
from megaprolong.model.llama import attention_backend, build_model, transformer_config
from megaprolong.model.state import unwrap_model
from megaprolong.runtime.attempts import FatalError, start_attempt
from megaprolong.runtime.device import (device, init_distributed, local_rank_zero_first, peak_memory_bytes,
                                       set_collective_timeout)
from megaprolong.runtime.preemption import StopRequest, remove_stale_stop_flag
from megaprolong.runtime.mcore_fixes import rotary_with_one_table
from megaprolong.runtime.run_lock import RunLock
from megaprolong.runtime.watchdog import StepWatchdog
from megaprolong.training import checkpoint
from megaprolong.training.config import Config, validate
from megaprolong.training.flops import peak_tflops, train_step_flops
from megaprolong.training.metrics import MetricsLogger


@dataclass
class StepMetrics:
    step: int
    loss: float
    grad_norm: float
    lr: float
    tokens: int  # target tokens in the global batch
    step_time_s: float  # data wait + forward/backward + optimizer: what tokens/s and TFLOPS are computed from
    domain_loss: list[float] = field(default_factory=list)  # token-averaged, per domain of the mix
    tflops_per_gpu: float = 0.0  # model FLOPs, attention counted per document
    data_time_s: float = 0.0  # waiting for this step's global batch (read in the background meanwhile)
    peak_memory_bytes: int = 0  # this rank's peak so far: CUDA max allocated, or peak RSS on the CPU
    skipped: bool = False  # the loss or a gradient was not finite: no update was applied
    eval_loss: float | None = None  # token-averaged loss on the held-out sequences (eval.interval steps)
    eval_domain_loss: list[float] = field(default_factory=list)  # the same per held-out domain

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_time_s if self.step_time_s > 0 else 0.0


def token_loss(loss_mask: torch.Tensor, domains: torch.Tensor, num_domains: int, per_token_loss: torch.Tensor):
    """Megatron loss function: (sum of masked token losses, int token count, report for logging).

    The report carries [sum, count] overall and per domain, summed later over micro-batches and the
    data- and context-parallel ranks into exact global token averages.
    """
    mask = loss_mask.reshape(-1).float()
    losses = per_token_loss.reshape(-1).float() * mask
    total = losses.sum()
    count = mask.sum().to(torch.int)
    dom = domains.reshape(-1).clamp(min=0).long()
    by_domain = torch.zeros(num_domains, 2, dtype=torch.float32, device=losses.device)
    by_domain[:, 0].index_add_(0, dom, losses.detach())
    by_domain[:, 1].index_add_(0, dom, mask)
    report = torch.cat([torch.stack([total.detach(), count.detach().float()]), by_domain.reshape(-1)])
    return total, count, {"lm loss": report}


def lr_scheduler(optimizer, o, steps: int) -> OptimizerParamScheduler:
    """ProLong's schedule on megatron-core's scheduler: linear warmup from 0 over ``warmup_fraction`` of the
    steps, then cosine from ``lr`` to ``min_lr_ratio * lr`` at the last step; constant weight decay."""
    return OptimizerParamScheduler(
        optimizer,
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


class NonFiniteLoss(RuntimeError):
    """The loss or the gradients were not finite for more steps in a row than ``train.skip_nonfinite_steps``."""


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
        self.scheduler = lr_scheduler(self.optimizer, cfg.optimizer, cfg.train.steps)
        self.step = 0
        self.num_domains = 1  # set from the dataset's mix by run()
        self.attention = self._attention_choice()
        m = cfg.model
        # megatron's own LM head + loss unless the loss is chunked or the vocabulary padded
        self._output_processor = lm_head_loss(cfg.train.loss_chunk_tokens, m.vocab_size, m.padded_vocab_size) \
            if cfg.train.loss_chunk_tokens or m.padded_vocab_size != m.vocab_size else None

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
            cp_comm_type=(p.cp_comm_type or "p2p") if p.cp > 1 else None,
            # packed samples padded per document for CP vary in length: pipeline stages exchange shapes
            # (megatron-core requires the alltoall dispatcher setting for that, even for dense models)
            **({"variable_seq_lengths": True, "moe_token_dispatcher_type": "alltoall"} if p.pp > 1 else {}),
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
            if getattr(model, "rotary_pos_emb", None) is not None:  # one RoPE table, not one per length asked
                # (the largest padded document: the sequence, plus padding to multiples of 2 * CP * TP)
                rotary_with_one_table(model.rotary_pos_emb, self.cfg.train.seq_length + 2 * p.cp * p.tp)
            if self.tf_config.bf16:
                model = Float16Module(self.tf_config, model)
            ddp_config = DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                overlap_grad_reduce=p.overlap_grad_reduce,
                overlap_param_gather=p.overlap_param_gather and p.distributed_optimizer,
                use_distributed_optimizer=p.distributed_optimizer,
                average_in_collective=False,  # the per-token loss scales by the global token count
            )
            chunks.append(DistributedDataParallel(config=self.tf_config, ddp_config=ddp_config, module=model))
        for chunk in chunks:
            chunk.broadcast_params()  # data-parallel replicas start from identical weights
        self._overlap_hooks(chunks)
        return chunks

    def _overlap_hooks(self, chunks) -> None:
        """With overlapped gradient reduction, megatron's schedule must hold each bucket's reduction until the
        last micro-batch (``no_sync``) and, under pipelining, start it per chunk as its backward ends; with
        overlapped parameter all-gathers, the gathers of the next forward are waited on by DDP's forward
        pre-hooks (``sync_params`` completes them where no forward follows: saves, evaluation, the end)."""
        one = len(chunks) == 1
        if self.cfg.parallel.overlap_grad_reduce:
            self.tf_config.no_sync_func = chunks[0].no_sync if one else [c.no_sync for c in chunks]
            if self.cfg.parallel.pp > 1:
                self.tf_config.grad_sync_func = chunks[0].start_grad_sync if one else [c.start_grad_sync for c in chunks]

    def sync_params(self) -> None:
        """Every rank's model weights current (collective). With overlapped parameter gathers the last update
        reaches the weights a rank does not own only in the next forward: force it now."""
        for chunk in self.model:
            if chunk.ddp_config.overlap_param_gather:
                chunk.disable_forward_pre_hook(param_sync=True)
                chunk.enable_forward_pre_hook()

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

    def _attention_choice(self) -> dict:
        """The attention backend and kernel this run uses (printed at start-up, in every metrics row); the
        kernel checks itself first (a tiny problem of the model's head shapes, offset segments, forward and
        gradients against SDPA causal_lower_right) and training is refused if it fails."""
        if attention_backend(self.cfg.model) == "te":
            return {"attention_backend": "te", "attention_kernel": "TransformerEngine DotProductAttention (unverified)"}
        m, tp = self.cfg.model, self.cfg.parallel.tp
        kernel = select_kernel(m.attention_kernel, device().type, self.tf_config.params_dtype)
        try:
            error = self_test(kernel, device(), self.tf_config.params_dtype, m.num_attention_heads // tp,
                              m.num_query_groups // tp, m.head_dim)
        except KernelMismatch as e:
            raise FatalError(str(e)) from None
        return {"attention_backend": "torch", "attention_kernel": f"{kernel.name}: {kernel.detail}",
                "attention_self_test": f"passed, max error {error:.1e} of max |ref| vs SDPA causal_lower_right"}

    # ---- one step -----------------------------------------------------------------------------------
    def _micro_batches(self, global_batch: list[Sample]) -> list[dict]:
        """This data-parallel rank's slice of the global batch as THD micro-batches on the device: each
        sample padded per document and split over the context-parallel group (zigzag), then
        ``micro_batch_size`` samples flattened into one packed sequence."""
        p, mbs = self.cfg.parallel, self.cfg.train.micro_batch_size
        global_batch = balance_micro_batches(global_batch, self.dp_size, mbs)
        per_rank = len(global_batch) // self.dp_size
        mine = global_batch[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        cp_rank = ps.get_context_parallel_rank()
        total_multiple = (2 * p.cp if p.cp > 1 else 1) * (p.tp if p.sequence_parallel else 1)
        # our attention takes RoPE's per-token frequencies with the batch; TE's applies megatron's own RoPE
        rotary = unwrap_model(self.model[0]).rotary_pos_emb if self.attention["attention_backend"] == "torch" else None
        return [self._device_batch(concat_packed([split_for_context_parallel(s, p.cp, cp_rank, total_multiple)
                                                  for s in mine[i:i + mbs]]), rotary)
                for i in range(0, per_rank, mbs)]

    def _device_batch(self, local, rotary) -> dict:
        """One rank's packed micro-batch on the device: ``[1, T/cp]`` rows and the attention layout."""
        dev = device()
        as_row = lambda a: torch.from_numpy(a).unsqueeze(0).to(dev)  # noqa: E731
        return {"tokens": as_row(local.tokens), "labels": as_row(local.labels), "loss_mask": as_row(local.loss_mask),
                "domains": as_row(local.domains), "position_ids": as_row(local.position_ids),
                "packed_seq_params": packed_batch(local, dev, self.cfg.parallel.cp, ps.get_context_parallel_rank(),
                                                  rotary)}

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"],
                       packed_seq_params=batch["packed_seq_params"], output_processor=self._output_processor)
        return output, partial(token_loss, batch["loss_mask"], batch["domains"], self.num_domains)

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
            micro_batch_size=1,  # THD: a micro-batch is one flattened [1, T/cp] sequence
            forward_only=False,
        )

    def optimizer_step(self) -> tuple[float, float]:
        """Clip, update, advance the schedule; returns (grad norm before clipping, LR used)."""
        lr = self.optimizer.param_groups[0]["lr"]
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        self.step += 1
        return (float(grad_norm) if grad_norm is not None else math.nan), lr

    def train_step(self, global_batch: list[Sample], data_time_s: float = 0.0) -> StepMetrics:
        """One optimizer step; ``data_time_s`` (the wait for ``global_batch``) counts in the step's time.
        A step whose loss or gradients are not finite applies no update (``skipped``); its batch is consumed
        and the LR schedule advances, so that the data and schedule stay where a resume puts them."""
        start = time.perf_counter()
        reports = self.forward_backward(global_batch)
        loss, tokens, per_domain = self.global_loss(reports)
        skipped = not (math.isfinite(loss) and self._grads_finite())
        if skipped:
            lr = self.optimizer.param_groups[0]["lr"]
            grad_norm = math.nan
            self.scheduler.step(increment=1)
            self.step += 1
        else:
            grad_norm, lr = self.optimizer_step()
        elapsed = time.perf_counter() - start + data_time_s
        flops = train_step_flops(self.cfg.model, [np.diff(s.cu_seqlens) for s in global_batch])
        return StepMetrics(self.step, loss, grad_norm, lr, tokens, elapsed, per_domain,
                           flops / elapsed / dist.get_world_size() / 1e12, data_time_s, peak_memory_bytes(), skipped)

    def _grads_finite(self) -> bool:
        """Whether every gradient of every rank is finite (collective; one pass over the grad buffers)."""
        finite = all(bool(torch.isfinite(buffer.grad_data).all()) for chunk in self.model
                     for buffer in chunk.buffers + chunk.expert_parallel_buffers)
        flag = torch.tensor([1.0 if finite else 0.0], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def evaluate(self, samples: list[Sample], num_domains: int) -> tuple[float, int, list[float]]:
        """The exact token-averaged loss of ``samples`` (every rank passes all of them), overall and per
        domain, forward only: each data-parallel rank takes every dp-th sample, one per micro-batch."""
        self.sync_params()
        mine = samples[self.dp_rank::self.dp_size]
        p = self.cfg.parallel
        total_multiple = (2 * p.cp if p.cp > 1 else 1) * (p.tp if p.sequence_parallel else 1)
        rotary = unwrap_model(self.model[0]).rotary_pos_emb if self.attention["attention_backend"] == "torch" else None
        batches = [self._device_batch(split_for_context_parallel(s, p.cp, ps.get_context_parallel_rank(),
                                                                 total_multiple), rotary) for s in mine]
        trained_domains, self.num_domains = self.num_domains, num_domains
        try:
            data = iter(batches) if len(self.model) == 1 else [iter(batches) for _ in self.model]
            with torch.no_grad():
                reports = get_forward_backward_func()(
                    forward_step_func=self._forward_step, data_iterator=data, model=self.model,
                    num_microbatches=len(batches), seq_length=self.cfg.train.seq_length, micro_batch_size=1,
                    forward_only=True)
            return self.global_loss(reports)
        finally:
            self.num_domains = trained_domains

    def global_loss(self, reports: list[dict]) -> tuple[float, int, list[float]]:
        """Token-averaged loss over the global batch (overall and per domain), known on every rank."""
        totals = torch.zeros(2 + 2 * self.num_domains, dtype=torch.float64)
        for report in reports:  # only the last pipeline stage has reports
            totals += report["lm loss"].double().cpu()
        totals = totals.to(device())
        dist.all_reduce(totals, group=ps.get_data_parallel_group(with_context_parallel=True))
        # Broadcast from the last pipeline stage so every rank can log the same value.
        dist.all_reduce(totals, group=ps.get_pipeline_model_parallel_group())
        t = totals.cpu().tolist()
        per_domain = [t[2 + 2 * d] / t[3 + 2 * d] if t[3 + 2 * d] else math.nan for d in range(self.num_domains)]
        return t[0] / max(t[1], 1.0), int(t[1]), per_domain


def steady_collective_timeout(t) -> None:
    """Once steps are steady the watchdog catches hangs in minutes: shorten every group's collective
    timeout to ``train.steady_timeout_minutes`` (start-up and the first steps keep the long one)."""
    if t.steady_timeout_minutes and t.steady_timeout_minutes < t.dist_timeout_minutes:
        set_collective_timeout(t.steady_timeout_minutes)


def _start(trainer: Trainer, log) -> None:
    """Resume the run from its newest checkpoint, or start a stage from another run's checkpoint."""
    ck = trainer.cfg.checkpoint
    resume_from = None
    if ck.resume == "auto" and ck.dir:
        # every rank verifies its own files; all resume from the same one (or stop: none verifies)
        resume_from = checkpoint.choose_resume(ck.dir, log)
    elif ck.resume not in ("auto", "none"):
        resume_from = ck.resume
    if resume_from is not None:
        meta = checkpoint.load(trainer, resume_from, resume=True)
        log(f"resumed from {resume_from} at step {trainer.step}" + _optimizer_note(meta))
    elif ck.load:
        found = checkpoint.complete_checkpoints(ck.load)  # a run's checkpoint dir: its newest
        meta = checkpoint.load(trainer, found[-1] if found else ck.load, resume=False)
        log(f"stage start from {found[-1] if found else ck.load} (step {meta['step']}){_optimizer_note(meta)}; LR schedule restarts; "
            f"{_rope_note(trainer.cfg.model, meta)}")


def _rope_text(model: dict) -> str:
    text = f"theta {float(model['rope_base']):g}"
    if model.get("rope_scaling", "none") != "none":
        text += f", {model['rope_scaling']} scaling x{model.get('rope_scaling_factor', 8.0):g}"
    return text


def _rope_note(model, meta: dict) -> str:
    """The RoPE policy of a stage start: the recipe's RoPE (model.rope_base, model.rope_scaling) is what
    trains and what is exported; the checkpoint's is only reported."""
    saved = {**meta.get("config", {}).get("model", {}), "rope_base": meta["rope_base"]}
    before, now = _rope_text(saved), _rope_text(dataclasses.asdict(model))
    return f"RoPE {now}" + (" (kept from the checkpoint)" if before == now else f" (replaces the checkpoint's {before})")


def _optimizer_note(meta: dict) -> str:
    if meta["optimizer_loaded"]:
        return ", weights + optimizer state"
    if meta.get("weights_only"):
        return f", weights only (converted from {meta.get('source', 'another format')})"
    return (f", weights only: the checkpoint's layout {meta.get('layout')} differs in TP/PP and its optimizer "
            f"state was saved dp_reshardable (a periodic save), so it starts fresh (a stage's last checkpoint, or "
            f"checkpoint.optimizer_format=fully_reshardable, carries it across layouts)")


class NonFiniteGuard:
    """Counts steps in a row whose loss or gradients were not finite (skipped: no update); more than
    ``allowed`` stops the run, naming the step and the domains whose loss was not finite."""

    def __init__(self, allowed: int, domain_names: list[str], say):
        self.allowed, self.names, self.say, self.in_a_row = allowed, domain_names, say, 0

    def check(self, m: StepMetrics, last_saved: int | None) -> None:
        if not m.skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        bad = [f"{n} {v}" for n, v in zip(self.names, m.domain_loss) if not math.isfinite(v)]
        what = (f"loss {m.loss} (domains: {', '.join(bad)})" if bad or not math.isfinite(m.loss)
                else f"gradients not finite (loss {m.loss:.4f})")
        if self.in_a_row > self.allowed:
            raise NonFiniteLoss(f"step {m.step}: {what}; {self.in_a_row} such step(s) in a row "
                                f"(train.skip_nonfinite_steps={self.allowed}): stopping, no checkpoint written after "
                                f"{'step ' + str(last_saved) if last_saved is not None else 'the start'}")
        self.say(f"step {m.step}: {what}: skipped, no update ({self.in_a_row} of {self.allowed} allowed in a row)")


def _take_folder(cfg: Config, say) -> RunLock | None:
    """Rank 0, before any work: the folder's lock (refused if another live run writes there; a dead one's
    taken over), saves a killed run left half-written removed, an earlier launch's STOP flag removed."""
    ck = cfg.checkpoint
    if not ck.dir:
        return None
    lock = RunLock(ck.dir, say)
    lock.keep_fresh()
    checkpoint.remove_stale_saves(ck.dir, say)
    remove_stale_stop_flag(ck.dir)
    if cfg.run.dir:  # the resolved config, as this launch runs it
        import yaml

        (Path(cfg.run.dir) / "logs").mkdir(parents=True, exist_ok=True)
        (Path(cfg.run.dir) / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    return lock


def run(cfg: Config, make_dataset, log=print, stop: StopRequest | None = None,
        make_heldout=None) -> list[StepMetrics]:
    """Train ``cfg.train.steps`` steps on ``make_dataset()`` (anything with ``global_batch(step, size)``),
    built by one rank per node first so its on-disk index cache is built once per node. ``stop``: the
    signal handlers, installed by the caller as early as it can (a new one otherwise). ``make_heldout()``:
    (held-out samples, their domain names), evaluated every ``eval.interval`` steps."""
    ck = cfg.checkpoint
    stop = stop or StopRequest()
    stop.watch(ck.dir)
    attempt = None  # rank 0's record of this attempt, once the process group exists
    attempt_step = [0]
    watchdog = StepWatchdog(cfg.train.watchdog, rank=int(os.environ.get("RANK", 0)),
                            on_expire=lambda why: attempt and attempt.failed(attempt_step[0], why))
    watchdog.arm("start-up", cfg.train.watchdog.startup_minutes * 60)
    trainer = Trainer(cfg)
    rank0 = dist.get_rank() == 0
    say = log if rank0 else (lambda *_: None)
    attempt = start_attempt(ck.dir, rank0=rank0)  # stops if the same step (or start-up) failed twice
    lock = _take_folder(cfg, say) if rank0 else None
    dist.barrier()
    with local_rank_zero_first():
        dataset = make_dataset()
        heldout, heldout_names = make_heldout() if make_heldout and cfg.eval.interval else ([], [])
    names = getattr(dataset, "domain_names", ["data"])
    trainer.num_domains = len(names)
    say(f"attention: backend {trainer.attention['attention_backend']}, kernel {trainer.attention['attention_kernel']}"
        + (f"; self-test {trainer.attention['attention_self_test']}" if "attention_self_test" in trainer.attention else ""))
    _start(trainer, say)
    history = []
    t = cfg.train
    metrics = MetricsLogger(cfg.logging, names, t.steps, enabled=rank0, print_fn=log, run_info=trainer.attention,
                            resume_step=trainer.step, tokens_per_step=t.global_batch_size * t.seq_length,
                            peak_tflops=peak_tflops(torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                                                    t.precision),
                            run_config=dataclasses.asdict(cfg), run_folder=cfg.run.dir or ck.dir,
                            heldout_names=heldout_names)
    nonfinite = NonFiniteGuard(t.skip_nonfinite_steps, names, say)
    queue = AsyncCallsQueue() if ck.async_save else None
    batches = BatchPrefetcher(dataset, t.global_batch_size, t.steps)
    last_saved = trainer.step if ck.dir and trainer.step > 0 else None  # the newest checkpoint's step
    try:
        stopping = stop.agreed()  # a signal during start-up is not lost
        while trainer.step < t.steps and not stopping:
            attempt_step[0] = trainer.step + 1
            attempt.step_starts(trainer.step + 1)
            watchdog.arm_step(trainer.step + 1)
            m = trainer.train_step(*batches.get(trainer.step))
            watchdog.step_done(m.step_time_s)
            if len(watchdog.step_times) == t.watchdog.warmup_steps:
                steady_collective_timeout(t)
            nonfinite.check(m, last_saved)
            if heldout and (m.step % cfg.eval.interval == 0 or m.step == t.steps):
                m.eval_loss, _, m.eval_domain_loss = trainer.evaluate(heldout, len(heldout_names))
            history.append(m)
            metrics.log(m)
            if queue:
                queue.maybe_finalize_async_calls(blocking=False)  # publishes background saves that finished
            stopping = stop.agreed()
            due = ck.interval and trainer.step % ck.interval == 0
            recent = stopping and last_saved is not None and trainer.step - last_saved <= ck.stop_save_skip_steps
            if ck.dir and (due or (stopping and not recent) or trainer.step == t.steps):
                watchdog.arm_save(trainer.step)
                # the stage's last checkpoint is the next stage's start: portable across layouts
                path = checkpoint.save(trainer, ck.dir, keep=ck.keep, queue=queue, portable=trainer.step == t.steps)
                last_saved = trainer.step
                say(f"{'saving' if queue else 'saved'} {path}")
        if stopping:
            done = (f"checkpointed at step {trainer.step}" if last_saved == trainer.step else
                    f"not saving step {trainer.step}: the checkpoint of step {last_saved} is within "
                    f"checkpoint.stop_save_skip_steps={ck.stop_save_skip_steps}" if last_saved is not None else
                    "nothing to save")
            say(f"stop requested ({stop.requested or 'on another rank'}): {done}; exiting")
        watchdog.arm("the last checkpoint's background write", t.watchdog.save_minutes * 60)
        if queue:
            queue.maybe_finalize_async_calls(blocking=True)  # the last save is complete before we exit
        attempt.ended()
        if lock is not None and not stopping:
            lock.release()  # finished: the folder is free (a stopped run keeps it until its requeue)
    except BaseException as e:  # recorded, so that the same failure at the same step is not retried forever
        attempt.failed(trainer.step + 1, e)
        raise
    finally:
        watchdog.disarm()
        batches.close()
        if queue:
            queue.close()
        metrics.close()
    # Every group ended before the interpreter exits: a live NCCL communicator at exit warns and can hold the
    # exit up (the workers and benchmarks that build a Trainer themselves end the same way).
    dist.destroy_process_group()
    return history
