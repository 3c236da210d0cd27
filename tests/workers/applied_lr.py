"""The learning rate the real trainer applies at every step equals ProLong's formula (run under torchrun).

Usage: applied_lr.py DATA_ROOT
The trainer's own loop runs (``training.trainer.run``); its optimizer step is observed, not re-written: the
LR of every parameter group at the moment megatron's optimizer steps, and the weights around the first
step, whose LR is 0 (warm-up starts at 0, and decoupled weight decay scales with the LR too). Prints
APPLIED_LR_OK.
"""

import sys
from pathlib import Path

import torch

from megaprolong.config import load_config
from megaprolong.train import build_dataset
from megaprolong.training import trainer as trainer_module
from megaprolong.training.config import Config

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from test_lr_schedule import prolong_lr  # noqa: E402

STEPS = 20


def main(root: str) -> None:
    cfg = load_config(Config, REPO / "examples" / "tiny_stage1.yaml", [
        f"data.mix={REPO / 'examples/mixes/tiny_stage1.yaml'}", f"data.root={root}", "data.prepare=null",
        f"train.steps={STEPS}", "parallel.tp=1", "parallel.sequence_parallel=false", "model.vocab_size=512",
        "checkpoint.dir=null", "optimizer.warmup_fraction=0.2"])
    applied, around_first = [], []
    step = trainer_module.Trainer.optimizer_step

    def observed(self):
        groups = self.optimizer.param_groups
        applied.append(sorted({g["lr"] for g in groups}))
        weights = [p.detach().clone() for chunk in self.model for p in chunk.parameters()] if not around_first else None
        out = step(self)
        if weights is not None:
            around_first.append(all(torch.equal(a, p.detach()) for a, p in
                                    zip(weights, (p for chunk in self.model for p in chunk.parameters()))))
        return out

    trainer_module.Trainer.optimizer_step = observed
    trainer_module.run(cfg, lambda: build_dataset(cfg), log=lambda *_: None)
    assert len(applied) == STEPS and all(len(lrs) == 1 for lrs in applied), applied
    want = [prolong_lr(s, STEPS, 3e-3, warmup_fraction=0.2) for s in range(STEPS)]
    got = [lrs[0] for lrs in applied]
    assert all(abs(g - w) <= 1e-12 + 1e-9 * w for g, w in zip(got, want)), list(zip(got, want))
    assert got[0] == 0.0 and around_first == [True], around_first  # LR 0: no weight moved
    print("APPLIED_LR_OK")


if __name__ == "__main__":
    main(*sys.argv[1:])
