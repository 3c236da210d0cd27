"""The SFT stage on HF checkpoints: TRL's SFTTrainer (FSDP2 on GPUs, DDP over gloo on CPU) on our packed
conversations, with ProLong's hyper-parameters. The training loop is TRL's/transformers'; this module only
wires the recipe into it: data, schedule, precision, attention kernel, metrics, atomic final save."""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megaprolong.runtime.files import replace_text
from megaprolong.runtime.log import get_logger
from megaprolong.sft.config import SFTConfig, gradient_accumulation
from megaprolong.training import manifest


def _attention(cfg: SFTConfig, cuda: bool) -> str:
    """The transformers attention implementation; every choice masks packed conversations exactly. ``auto``:
    our varlen kernels on a GPU (torch's own flash attention: flash-attn has not run in this project's checks),
    sdpa on the CPU (a dense [L, L] mask from the position ids: fine at CPU lengths, not at 64K)."""
    from megaprolong.sft import varlen_attention

    choice = cfg.train.attn_implementation
    if choice == "auto":
        choice = varlen_attention.NAME if cuda else "sdpa"
    if choice == varlen_attention.NAME:
        varlen_attention.register()
    return choice


def _self_test_attention(choice: str, model: Any, cuda: bool) -> str:
    """Our kernels behind ``choice`` checked on a tiny problem of the model's head shapes (offset segments,
    forward and gradients, against SDPA causal_lower_right) before training; transformers' own sdpa and
    eager paths need none. Raises FatalError on a mismatch."""
    import torch

    from megaprolong.model.attention.kernels import KernelMismatch, self_test, select_kernel
    from megaprolong.runtime.attempts import FatalError
    from megaprolong.sft import varlen_attention

    names = {varlen_attention.NAME: "auto", "flash_attention_2": "flash-attn"}
    if choice not in names:
        return choice
    c = model.config
    dtype = torch.bfloat16 if cuda else torch.float32
    kernel = select_kernel(names[choice], "cuda" if cuda else "cpu", dtype)
    dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    try:
        error = self_test(kernel, torch.device("cuda" if cuda else "cpu"), dtype, c.num_attention_heads,
                          c.num_key_value_heads, dim)
    except KernelMismatch as e:
        raise FatalError(str(e)) from None
    if choice == varlen_attention.NAME:
        varlen_attention.prepare_per_batch(model)
    return f"{choice} ({kernel.name}; self-test passed, max error {error:.1e} of max |ref| vs SDPA causal_lower_right)"


class _MetricsFile:
    """A transformers callback writing one JSON object per logged step (main process only) and the step
    line. ``resume_step``: the checkpoint's step a resumed run continues from (0: a fresh run): the file is
    rewritten to the rows before it, so it has one row per step."""

    def __init__(self, path: Path, resume_step: int, total_steps: int):
        from transformers import TrainerCallback

        from megaprolong.training.metrics import keep_rows_up_to

        outer = self

        class Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if state.is_world_process_zero and logs and "loss" in logs:
                    outer.write(state.global_step, logs)

        self.callback = Callback()
        self.path, self.last, self.tokens, self.total = path, time.time(), 0.0, total_steps
        self.recent: list[float] = []
        if int(os.environ.get("RANK", 0)) == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step and path.exists():
                keep_rows_up_to(path, resume_step)
            else:
                path.write_text("")

    def write(self, step: int, logs: dict) -> None:
        from megaprolong.runtime.device import peak_memory_bytes
        from megaprolong.training.metrics import count, duration, finite_or_none

        now, tokens = time.time(), logs.get("num_tokens", 0.0)  # TRL counts the tokens seen by all ranks
        seconds = max(now - self.last, 1e-9)
        row = {"step": step, "loss": logs["loss"], "grad_norm": logs.get("grad_norm"),
               "lr": logs.get("learning_rate"), "tokens_per_s": (tokens - self.tokens) / seconds,
               "step_time_s": seconds, "peak_memory_bytes": peak_memory_bytes(),
               **{k: v for k, v in logs.items() if k in ("mean_token_accuracy", "num_tokens", "entropy")}}
        self.last, self.tokens = now, tokens
        self.recent = (self.recent + [seconds])[-20:]
        eta = (self.total - step) * sum(self.recent) / len(self.recent) if self.total else None
        get_logger("sft").info(
            f"step {step:>5}/{self.total or '?'} | loss {row['loss']:.4f} | grad norm {row['grad_norm'] or 0:.3f} | "
            f"lr {row['lr'] or 0:.3e} | {1000 * seconds:,.0f} ms | {count(tokens)} tokens | "
            f"{row['tokens_per_s']:,.0f} tok/s | mem {row['peak_memory_bytes'] / 2**30:.2f} GiB"
            + (f" | ETA {duration(eta)}" if eta is not None else ""))
        with open(self.path, "a") as f:
            f.write(json.dumps(finite_or_none(row), allow_nan=False) + "\n")


def _preemption_callback(stop: Any) -> Any:
    """On SIGTERM/SIGUSR1 (agreed by all ranks after each step): save a checkpoint and stop training."""
    from transformers import TrainerCallback

    class Preemption(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if stop.agreed():
                control.should_save = True
                control.should_training_stop = True
            return control

    return Preemption()


def _attempt_callback(attempt: Any) -> Any:
    """Records the step each attempt is at (a failure repeating at the same step stops the run)."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            attempt.step_starts(state.global_step + 1)

    return Progress()


# Written into an HF checkpoint folder once every rank has saved its part: the folder's files with their
# sizes and full-content digests. transformers writes checkpoint-N in place, so a worker killed during a
# save leaves a folder that looks like a checkpoint; without this record it is never resumed from.
COMPLETE = "megaprolong_complete.json"


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _gathered(part):
    """Every rank's ``part`` (a list or dict), concatenated on every rank."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return part
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    if isinstance(part, dict):
        return {k: v for p in parts for k, v in p.items()}
    return list(dict.fromkeys(x for p in parts for x in p))


def _completion_callback() -> Any:
    """Records each HF checkpoint as complete after all ranks saved it: transformers wrote the files, so
    every rank reads and hashes a share of them (in parallel), and rank 0 writes the record."""
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class Completion(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            files = _gathered(manifest.hash_share(folder, *_world(), exclude=(COMPLETE,)))
            if state.is_world_process_zero:
                replace_text(folder / COMPLETE, json.dumps({"step": state.global_step, "files": files}))
            if torch.distributed.is_initialized():
                torch.distributed.barrier()

    return Completion()


def _problems(folder: Path) -> list[str]:
    """What is wrong with an HF checkpoint (collective: every rank verifies the files it hashed)."""
    try:
        files = json.loads((folder / COMPLETE).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return [f"no {COMPLETE} (its save did not finish)"]
    return _gathered(manifest.problems(folder, files, mine=manifest.owned_by(*_world())))


def newest_complete_checkpoint(folder: Path, say: Callable[[str], None]) -> Path | None:
    """The newest HF checkpoint under ``folder`` that was saved completely and verifies (collective when
    torch.distributed is up); each newer one skipped is said, with why."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    steps = {int(m.group(1)): p for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
             if p.is_dir() and (m := re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", p.name))}
    return manifest.first_verified((steps[s] for s in sorted(steps, reverse=True)), _problems, say)


def fsdp_wrap_classes(model_dir: str | Path) -> list[str]:
    """The decoder-layer classes FSDP wraps one by one: the model's own ``_no_split_modules`` (a Llama's
    ``LlamaDecoderLayer``, a Qwen3's ``Qwen3DecoderLayer``), read from its class without loading weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    return list(model_class._no_split_modules or [])


def fsdp_settings(cfg: SFTConfig) -> dict:
    """transformers' ``fsdp_config`` for the recipe's model (FSDP2, full shards, a full state dict on save)."""
    return {"version": 2, "transformer_layer_cls_to_wrap": fsdp_wrap_classes(cfg.model), "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT"}


def checkpointing_arguments(arguments_class: type, enabled: bool) -> dict:
    """Activation checkpointing (non-reentrant), by the names the installed transformers' ``TrainingArguments``
    has: ``activation_checkpointing`` and its ``_kwargs`` since 5.23 (the old names kept as deprecated aliases),
    ``gradient_checkpointing`` and its ``_kwargs`` before (the new names there are a TypeError)."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(arguments_class)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False}}


_indexed_cpu_registered = False


def load_indexed_cpu_locations(transformers_version: str) -> None:
    """transformers < 5.18 resumes a multi-process run with ``torch.load(optimizer.pt,
    map_location=args.device)``, and on CPU ranks that device is ``cpu:N``, a location torch has no
    deserializer for ("don't know how to restore data location ... (tagged with cpu:0)"): every resumed
    multi-process CPU run failed. There, register one in torch's public registry of storage locations (it
    tags nothing on save). 5.18 loads to plain ``cpu`` instead."""
    global _indexed_cpu_registered
    from packaging.version import Version

    if _indexed_cpu_registered or Version(transformers_version) >= Version("5.18"):
        return
    import torch

    torch.serialization.register_package(100, lambda storage: None,
                                         lambda storage, location: storage if location.startswith("cpu:") else None)
    _indexed_cpu_registered = True


def training_arguments(cfg: SFTConfig, world_size: int, cuda: bool) -> Any:
    """TRL's SFTConfig for the recipe: padding-free batches of our pre-packed rows."""
    import trl

    t, o = cfg.train, cfg.optimizer
    bf16 = t.precision == "bf16" or (t.precision == "auto" and cuda)
    fsdp = cuda and t.fsdp and world_size > 1
    return trl.SFTConfig(
        output_dir=str(Path(cfg.output_dir) / "checkpoints"),
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=gradient_accumulation(cfg, world_size),
        max_steps=t.steps if t.steps else -1,
        num_train_epochs=1,
        learning_rate=o.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": o.min_lr_ratio},
        warmup_steps=o.warmup_fraction,  # a float in [0, 1): a fraction of the total steps
        adam_beta1=o.beta1, adam_beta2=o.beta2, adam_epsilon=o.eps,
        optim="adamw_torch",
        weight_decay=o.weight_decay,
        max_grad_norm=o.clip_grad,
        seed=t.seed, data_seed=t.seed,
        bf16=bf16,
        use_cpu=not cuda,
        ddp_backend="gloo" if not cuda and world_size > 1 else None,
        **checkpointing_arguments(trl.SFTConfig, t.gradient_checkpointing),
        fsdp="full_shard auto_wrap" if fsdp else "",
        fsdp_config=fsdp_settings(cfg) if fsdp else None,
        # Our rows are already tokenized, masked and packed: TRL only collates them (padding-free).
        dataset_kwargs={"skip_prepare_dataset": True},
        padding_free=True,
        packing=False,
        max_length=None,  # rows are packed to <= train.seq_length already
        train_sampling_strategy="sequential",  # the order is the seeded shuffle done before packing
        average_tokens_across_devices=True,  # loss = sum of token NLL / trained tokens of the global batch
        ddp_find_unused_parameters=False,
        dataloader_drop_last=True,
        logging_steps=1,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_only_model=False,
        report_to=cfg.logging.report_to or "none",
        disable_tqdm=not sys.stderr.isatty(),  # in a Slurm log: one line per step, no progress-bar redraws
    )


def _final_save(trainer: Any, tokenizer: Any, out: Path) -> Path:
    """The fine-tuned model, tokenizer and chat template, written to a temporary folder and renamed."""
    tmp = out.with_name(out.name + ".tmp")
    if trainer.accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))  # collective under FSDP: every rank calls it
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(str(tmp))
        # the trainer's token alignment turned it into a list: generation stops on the end of a reply, one id
        trainer.model.generation_config.eos_token_id = tokenizer.eos_token_id
        trainer.model.generation_config.save_pretrained(str(tmp))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    trainer.accelerator.wait_for_everyone()
    return out


def run_sft(cfg: SFTConfig, stop: Any = None) -> Path | None:
    """Fine-tune ``cfg.model`` on ``cfg.data``; returns the folder of the final HF model, or None when a
    preemption signal stopped the run (its checkpoint is in OUTPUT_DIR/checkpoints; a rerun resumes).
    ``stop``: the signal handlers, installed by the caller as early as it can (a new one otherwise)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    from megaprolong.runtime.preemption import StopRequest
    from megaprolong.sft.chat import chat_format_for, prepare_tokenizer
    from megaprolong.sft.data import build_sft_dataset

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.logging.wandb_project:
        os.environ.setdefault("WANDB_PROJECT", cfg.logging.wandb_project)
    cuda = torch.cuda.is_available()
    if cuda:  # each process on its own GPU before anything touches CUDA (NCCL, the attention self-test)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0))))
    if world_size > 1 and not torch.distributed.is_initialized():  # transformers then uses this group
        import datetime

        from megaprolong.runtime.device import init_process_group_per_attempt

        init_process_group_per_attempt("nccl" if cuda else "gloo", int(os.environ.get("RANK", 0)), world_size,
                                       datetime.timedelta(minutes=30))
    from megaprolong.runtime.attempts import start_attempt

    rank0 = int(os.environ.get("RANK", 0)) == 0
    attempt = start_attempt(Path(cfg.output_dir), rank0=rank0)
    lock = None
    if rank0:  # refuses a folder another live run writes; takes over a dead one's
        from megaprolong.runtime.preemption import remove_stale_stop_flag
        from megaprolong.runtime.run_lock import RunLock

        lock = RunLock(cfg.output_dir, say=get_logger("sft").info)
        lock.keep_fresh()
        remove_stale_stop_flag(cfg.output_dir)
    args = training_arguments(cfg, world_size, cuda)
    say = get_logger("sft").info  # rank 0 speaks
    transformers.set_seed(cfg.train.seed)
    chat_format = cfg.chat_format
    if chat_format == "auto":
        chat_format = chat_format_for(json.loads((Path(cfg.model) / "config.json").read_text()))
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model), chat_format)
    with args.main_process_first(local=True, desc="SFT data"):
        if cfg.data.prepare == "tiny" and not Path(cfg.data.path).exists():
            from megaprolong.data.tiny import synthetic_chats, write_jsonl

            write_jsonl(synthetic_chats(200, seed=0), Path(cfg.data.path))
        dataset, report = build_sft_dataset(cfg, tokenizer, cfg.data.cache_dir or Path(cfg.output_dir) / ".sft_data",
                                            progress=args.local_process_index == 0)
    say(report.summary())
    if report.truncated:
        get_logger("sft").warning(f"{report.truncated} conversation(s) longer than train.seq_length="
                                  f"{cfg.train.seq_length} were truncated")
    attention = _attention(cfg, cuda)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model, dtype=torch.float32, attn_implementation=attention,
        use_cache=False)  # with a cache transformers would let packed conversations see each other
    say(f"attention {_self_test_attention(attention, model, cuda)}, chat format {chat_format}")
    # The RoPE base (and every other field) of the long-context checkpoint is kept as saved.
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    last = newest_complete_checkpoint(Path(args.output_dir), say)
    resume_step = int(last.name.rsplit("-", 1)[1]) if last else 0
    metrics = _MetricsFile(Path(cfg.logging.metrics_file or Path(cfg.output_dir) / "metrics.jsonl"), resume_step,
                           args.max_steps if args.max_steps > 0 else 0)
    stop = stop or StopRequest()
    stop.watch(cfg.output_dir)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[metrics.callback, _preemption_callback(stop), _attempt_callback(attempt),
                                    _completion_callback()])
    if last:
        say(f"resuming from {last}")
        load_indexed_cpu_locations(transformers.__version__)
    try:
        trainer.train(resume_from_checkpoint=str(last) if last else None)
    except BaseException as e:
        attempt.failed(trainer.state.global_step + 1, e)
        raise
    attempt.ended()
    preempted = stop.agreed()
    out = None if preempted else _final_save(trainer, tokenizer, Path(cfg.output_dir) / "model")
    if lock is not None and not preempted:
        lock.release()
    if torch.distributed.is_initialized():
        release_wrapped_model(trainer)
        torch.distributed.destroy_process_group()  # else gloo aborts the process at interpreter exit
    return out


def release_wrapped_model(trainer: Any) -> None:
    """Free the DDP-wrapped model while torch.distributed still holds its process group. DDP's C++ reducer
    holds the group too: were it the last holder (the group destroyed, then the trainer freed as this
    function's caller returns), the group would be torn down inside the reducer's deallocation with the GIL
    held, joining gloo's worker threads, one of which may still need the GIL to release a finished
    collective's tensors. That deadlock (torch 2.11: a rank hung at exit after a preemption's checkpoint, in
    about 1 of 4 runs) held the node until the batch shell's requeue deadline."""
    wrapped = weakref.ref(trainer.model_wrapped)
    trainer.model_wrapped = trainer.model  # the only holder of the DDP module (accelerate keeps the bare model)
    gc.collect()
    if (left := wrapped()) is not None and left is not trainer.model:
        get_logger("sft").warning(f"the wrapped model ({type(left).__name__}) outlives the run: a reference is "
                                  f"left, and the process group's teardown may hang")
