"""Start a new stage from a checkpoint saved under another layout (run under torchrun, 1 rank).

Usage: stage_start.py CKPT_DIR DATA_MIX DATA_ROOT
Checks: the weights equal the checkpoint's (TP2 -> TP1 resharding), the Adam state is loaded, the model uses
the config's new RoPE base (not the checkpoint's), the LR schedule restarts at step 0 with the new stage's peak
LR. Prints STAGE_START_OK.
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
from megatron.core.dist_checkpointing.mapping import ShardedBase

from megaprolong.config import load_config
from megaprolong.model.state import unwrap_model
from megaprolong.training.config import Config
from megaprolong.training.trainer import Trainer, _start

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from test_lr_schedule import prolong_lr  # noqa: E402


def main(ckpt: str, mix: str, root: str):
    cfg = load_config(Config, REPO / "examples" / "tiny_stage1.yaml", [
        "parallel.tp=1", "parallel.sequence_parallel=false", "model.rope_base=128000000.0", "train.steps=10",
        "optimizer.lr=5e-4",
        f"checkpoint.load={ckpt}", "checkpoint.resume=none", f"data.mix={mix}", f"data.root={root}"])
    trainer = Trainer(cfg)
    model = unwrap_model(trainer.model[0])
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    logs = []
    _start(trainer, logs.append)
    assert trainer.step == 0 and trainer.optimizer.param_groups[0]["lr"] == 0.0, "schedule must restart (warmup)"
    assert all(g["max_lr"] == 5e-4 for g in trainer.optimizer.param_groups), "the new stage's peak LR"
    assert "weights + optimizer state" in logs[0], logs
    assert "LR schedule restarts" in logs[0] and "RoPE theta 1.28e+08 (replaces the checkpoint's theta 8e+06)" in logs[0], logs
    inv_freq = model.rotary_pos_emb.inv_freq.double()
    d = cfg.model.head_dim
    want = 1.0 / (128000000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    torch.testing.assert_close(inv_freq, want, rtol=1e-6, atol=0)
    # weights: the checkpoint's, read from its TP2 shards into tensors of their own (dist_checkpointing.load
    # fills the tensors it is given in place: given the model's own, it would compare them with themselves)
    def own_tensor(x):
        if isinstance(x, ShardedBase) and isinstance(getattr(x, "data", None), torch.Tensor):
            return dataclasses.replace(x, data=torch.full_like(x.data, float("nan")))
        return x

    request = model.sharded_state_dict()
    dict_list_map_inplace(own_tensor, request)
    saved = dist_checkpointing.load({"model": request}, ckpt)["model"]
    for name, param in model.named_parameters():
        assert saved[name].data_ptr() != param.data_ptr()
        torch.testing.assert_close(param.detach(), saved[name].to(param.dtype), rtol=0, atol=0)
    assert all(not torch.equal(initial[n], p) for n, p in model.named_parameters()), "loading changed every weight"
    assert json.loads((Path(ckpt) / "megaprolong.json").read_text())["rope_base"] == 8000000.0
    # the new stage's schedule: ProLong's formula over its own 10 steps with its own peak
    for step in range(10):
        lr = trainer.optimizer.param_groups[0]["lr"]
        assert abs(lr - prolong_lr(step, 10, 5e-4)) < 1e-12, (step, lr)
        trainer.scheduler.step(increment=1)
    print("STAGE_START_OK")


if __name__ == "__main__":
    main(*sys.argv[1:4])
