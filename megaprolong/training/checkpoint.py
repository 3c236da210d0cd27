"""Distributed checkpoints (megatron-core dist_checkpointing, torch_dist) with resume and stage starts.

Layout: ``DIR/step_00001234/`` holds the sharded model and optimizer state plus ``megaprolong.json``
(step, LR-schedule state, RoPE base, config) and one RNG file per rank. A checkpoint is written under
``step_N.tmp`` and renamed only after every rank finished and the metadata is in place, so an interrupted
save is never picked by ``--resume auto``; a run removes the ``.tmp`` folders a killed save left behind when
it starts (they can hold 100+ GB at 8B).

The metadata records every file with its size and full-content digest (:mod:`megaprolong.training.manifest`).
``resume: auto`` verifies the newest checkpoint (every rank its own files, in parallel) and, if it fails,
renames it aside (``step_N.corrupt``, kept for a person to look at) and tries the previous one. When the
folder holds checkpoints but none verifies, the run stops (:class:`~megaprolong.runtime.attempts.FatalError`)
instead of starting the stage again from ``checkpoint.load``: that would restart the LR schedule, and
rotation would then delete the old checkpoints. Rotation (``checkpoint.keep``) counts only checkpoints whose
files are all present at their recorded sizes, and never deletes a set-aside one.

Weights are saved reshardable (they load under any TP/PP/CP/DP layout). Optimizer state
(``checkpoint.optimizer_format=auto``): periodic and preemption saves are ``dp_reshardable``, rank-local
(each rank writes its own shard, nothing is gathered; they resume under the same TP/PP/VPP, any DP), and the
stage's last save is ``fully_reshardable`` (megatron gathers the optimizer state of a TP x PP shard onto
each data-parallel rank, once per stage) so that the next stage loads weights and Adam state under its own
layout. Loading a ``dp_reshardable`` checkpoint under another TP/PP gives weights only, which the log says.

A synchronous save writes each tensor as it goes (:mod:`megaprolong.training.sync_save`), so a periodic save
costs no memory beyond the rank's own state; an asynchronous one (``checkpoint.async_save``) first copies the
rank's shard to host memory so that training can go on while a background process writes it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from megaprolong.config import ConfigError
from megaprolong.model.config import ModelConfig
from megaprolong.model.state import unwrap_model
from megaprolong.runtime import attempts
from megaprolong.runtime.attempts import FatalError
from megaprolong.runtime.mcore_fixes import async_writer_hashes_what_it_writes, checkpoint_results_queue_dies_with_worker
from megaprolong.training import manifest
from megaprolong.training.checkpoint_dir import (  # noqa: F401  (re-exported: the folder's side of checkpoints)
    ASIDE, META, complete_checkpoints, no_checkpoint_verifies, remove_stale_saves, resume_problems, rotate, set_aside,
    verify)
from megaprolong.training.sync_save import SynchronousSave


def verify_on_all_ranks(path: str | Path) -> list[str]:
    """:func:`verify` with every rank reading the files its index wrote, in parallel (collective)."""
    mine = manifest.owned_by(dist.get_rank(), dist.get_world_size())
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, verify(path, checksums=True, mine=mine))
    return list(dict.fromkeys(line for lines in found for line in lines))


def choose_resume(root: str | Path, say) -> Path | None:
    """The newest checkpoint under ``root`` that verifies (collective; every rank checks its own files).
    Each one that does not is said, with why, and renamed aside by rank 0. Raises :class:`FatalError` when
    checkpoints exist but none verifies; None when nothing was ever saved."""
    found = complete_checkpoints(root)
    lines = []
    for path in reversed(found):
        problems = verify_on_all_ranks(path)
        if not problems:
            return path
        aside = path.with_name(path.name + ASIDE)
        say(f"skipping checkpoint {path}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
            + f"; renamed aside to {aside.name}")
        lines.append(problems[0])
        if dist.get_rank() == 0:
            n = 1
            while aside.exists():
                aside, n = path.with_name(f"{path.name}{ASIDE}.{n}"), n + 1
            os.replace(path, aside)
        dist.barrier()
    stop = no_checkpoint_verifies(root, [], lines)
    if stop:
        raise FatalError("\n".join(stop))
    return None


def _sharded_state(trainer, is_loading: bool, optimizer_format: str | None) -> dict:
    """The model's (and, given its format, the optimizer's) sharded state dict."""
    model = {}
    for i, chunk in enumerate(trainer.model):  # GPTModel names, whatever wraps it (DDP, Float16Module)
        model[f"model{i}" if len(trainer.model) > 1 else "model"] = unwrap_model(chunk).sharded_state_dict()
    state = dict(model)
    if optimizer_format:
        if is_loading:
            _materialize_optimizer_state(trainer.optimizer)
        flat = {}
        for v in model.values():
            flat.update(v)
        state["optimizer"] = trainer.optimizer.sharded_state_dict(
            flat, is_loading=is_loading, metadata={"distrib_optim_sharding_type": optimizer_format})
    return state


def _materialize_optimizer_state(optimizer) -> None:
    """megatron's distributed optimizer (without apex/TE) can describe a checkpoint to load only once its
    Adam state exists: create that state with one zero-learning-rate step, which changes no weight."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None or len(inner.state) or not hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            continue
        rates = [g["lr"] for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"] = 0.0
        opt._init_optimizer_states_with_dummy_values()
        for g, lr in zip(inner.param_groups, rates):
            g["lr"] = lr


def _adopt_group_settings(optimizer, loaded: dict) -> None:
    """A stage start keeps the Adam moments but takes the new recipe's per-group settings (LR bounds, weight
    decay multipliers): megatron-core matches saved groups to live ones by those settings, so the saved
    groups are given the live groups' settings, in order (the grouping itself does not depend on them)."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    saved, live = loaded["optimizer"]["param_groups"], chained[0].optimizer.param_groups
    if len(chained) != 1 or len(saved) != len(live):
        raise ConfigError(f"the checkpoint's optimizer has {len(saved)} parameter groups, this run {len(live)}")
    for old, new in zip(saved, live):
        for key in param_group_identifier_keys:
            if key in new:
                old[key] = new[key]
            else:
                old.pop(key, None)


def _accept_missing_adam_step(optimizer) -> None:
    """megatron-core 0.19's fully-reshardable load copies every tensor of the live Adam state from the
    checkpoint, which never holds torch AdamW's per-parameter ``step`` (KeyError 'step'): let the live
    value stand (``_restore_adam_step`` then sets it from the loaded param groups)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        original = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if original is None:
            continue

        def set_states(model_param, tensors, opt=opt, original=original):
            group, order = opt.model_param_group_index_map[model_param]
            step = opt.optimizer.state[opt.optimizer.param_groups[group]["params"][order]].get("step")
            if torch.is_tensor(step) and "step" not in tensors:
                tensors = {**tensors, "step": step}
            return original(model_param, tensors)

        opt._set_main_param_and_optimizer_states = set_states


def _restore_adam_step(optimizer) -> None:
    """With torch's AdamW (no apex/TE), megatron keeps the step count in the param groups but restores the
    per-parameter ``step`` as one tensor shared by all parameters (so every update advances it once per
    parameter) or from the placeholder state: give every parameter its own count (bias correction)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in getattr(getattr(opt, "optimizer", None), "param_groups", []):
            if "step" not in group:
                continue
            for p in group["params"]:
                state = opt.optimizer.state.get(p)
                if state and torch.is_tensor(state.get("step")):
                    state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype,
                                                 device=state["step"].device)


def save_format(configured: str, portable: bool) -> str:
    """The optimizer format of a save: ``auto`` is rank-local unless the save must be ``portable``."""
    if configured != "auto":
        return configured
    return "fully_reshardable" if portable else "dp_reshardable"


def save(trainer, root: str | Path, keep: int | None = None, queue=None, portable: bool = False) -> Path:
    """Save model, optimizer, schedule and RNG at ``trainer.step``; collective over all ranks. ``portable``:
    loadable with its optimizer state under another TP/PP (see :func:`save_format`).

    With ``queue`` (a megatron ``AsyncCallsQueue``) the sharded state is written by a background process
    while training goes on; the checkpoint is published (metadata written, renamed) when the queue
    finalizes it (``queue.maybe_finalize_async_calls``, collective), so an unfinished one is never picked."""
    checkpoint_results_queue_dies_with_worker()
    async_writer_hashes_what_it_writes()
    trainer.sync_params()  # weights a rank does not own are current (overlapped parameter gathers)
    root = Path(root)
    final = root / f"step_{trainer.step:08d}"
    tmp = root / f"step_{trainer.step:08d}.tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    fmt = save_format(trainer.cfg.checkpoint.optimizer_format, portable)
    state = _sharded_state(trainer, is_loading=False, optimizer_format=fmt)
    rng, rng_file = _rng_state(), tmp / f"rng_rank{dist.get_rank():05d}.pt"
    meta = {"step": trainer.step, "scheduler": trainer.scheduler.state_dict(),
            "rope_base": trainer.cfg.model.rope_base, "world_size": dist.get_world_size(),
            "layout": _layout(trainer), "optimizer_format": fmt, "config": asdict(trainer.cfg)}

    def publish():
        dist.barrier()  # every rank's shards are written
        if dist.get_rank() == 0:  # the record of every file, then the metadata that marks it complete
            meta["files"] = manifest.collect(tmp, exclude=(META,))
            (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            attempts.note_checkpoint(root, trainer.step)
            if keep:
                rotate(root, keep)
        dist.barrier()

    # The RNG files go in after megatron's save has started: it warns "Overwriting old incomplete / corrupted
    # checkpoint" when the folder it is given is not empty.
    if queue is None:  # written a tensor at a time (megatron's own synchronous save stages a copy of all)
        dist_checkpointing.save(state, str(tmp), sharded_strategy=SynchronousSave())
        torch.save(rng, rng_file)
        publish()
    else:
        # megatron-core's own background writer (the default, "nvrx", needs nvidia-resiliency-ext)
        request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True, async_strategy="mcore")
        torch.save(rng, rng_file)
        request.add_finalize_fn(publish)
        queue.schedule_async_request(request)
    return final


def load(trainer, path: str | Path, resume: bool) -> dict:
    """Load a checkpoint into ``trainer``.

    ``resume=True`` continues the run: step, LR schedule and RNG come back too (the data position is the
    step). ``resume=False`` starts a new stage from it: weights and optimizer state only; the schedule
    restarts at step 0. Either way the RoPE base is the config's (RoPE has no saved state), and the
    checkpoint's own value is only reported.
    """
    path = Path(path)
    meta = json.loads((path / META).read_text())
    saved = meta.get("config", {}).get("model", {})
    saved_head_dim = ModelConfig(**saved).head_dim if saved else trainer.cfg.model.head_dim
    if saved_head_dim != trainer.cfg.model.head_dim:
        raise ConfigError(f"{path}: the checkpoint has heads of {saved_head_dim} channels, the recipe "
                          f"{trainer.cfg.model.head_dim}: set model.kv_channels={saved_head_dim}")
    for key in ("vocab_size", "vocab_multiple", "num_layers", "hidden_size", "num_query_groups", "family",
                "qkv_bias", "qk_norm", "tie_embeddings"):
        if key in saved and saved[key] != getattr(trainer.cfg.model, key):
            raise ConfigError(f"{path}: the checkpoint has model.{key}={saved[key]}, the recipe "
                              f"{getattr(trainer.cfg.model, key)}: set model.{key}={saved[key]}")
    fmt = meta.get("optimizer_format", "dp_reshardable")
    reshardable = fmt == "fully_reshardable" or meta.get("layout") == _layout(trainer)
    with_optimizer = not meta.get("weights_only") and reshardable
    state = dist_checkpointing.load(
        _sharded_state(trainer, is_loading=True, optimizer_format=fmt if with_optimizer else None), str(path))
    for i, chunk in enumerate(trainer.model):
        unwrap_model(chunk).load_state_dict(state[f"model{i}" if len(trainer.model) > 1 else "model"])
    if with_optimizer:
        if not resume:
            _adopt_group_settings(trainer.optimizer, state["optimizer"])
        _accept_missing_adam_step(trainer.optimizer)
        with torch.no_grad():  # fp32 main params are views of the model's leaf parameters
            trainer.optimizer.load_state_dict(state["optimizer"])
        _restore_adam_step(trainer.optimizer)
    else:
        trainer.optimizer.reload_model_params()  # fp32 master copies from the loaded weights
    meta["optimizer_loaded"] = with_optimizer
    if resume and not meta.get("weights_only"):
        trainer.step = meta["step"]
        trainer.scheduler.load_state_dict(meta["scheduler"])
        rng_file = path / f"rng_rank{dist.get_rank():05d}.pt"
        if rng_file.exists() and meta.get("world_size") == dist.get_world_size():
            _set_rng_state(torch.load(rng_file, weights_only=False))
    # The loaded param groups carry the checkpoint's LR: the schedule's (restarted or resumed) value wins.
    trainer.scheduler.step(increment=0)
    return meta


def _layout(trainer) -> dict:
    p = trainer.cfg.parallel
    return {"tp": p.tp, "pp": p.pp, "vpp": p.vpp, "distributed_optimizer": p.distributed_optimizer}


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])
