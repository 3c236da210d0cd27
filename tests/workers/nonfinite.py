"""A loss that turns NaN at one step, in one domain, through the real trainer (run under torchrun, 1 rank).

Usage: nonfinite.py DATA_ROOT OUT_DIR SKIP_ALLOWED
The per-token loss of the "web" domain is poisoned (times NaN) at step 3 only, inside the loss function
megatron calls, so everything after it (the global loss, the gradients, the update) sees what a real
overflow would give. Prints the outcome as JSON: the error (if the run stopped), the metrics rows, and
whether the weights changed in the poisoned step.
"""

import json
import sys
from pathlib import Path

import torch

from megaprolong.config import load_config
from megaprolong.train import build_dataset
from megaprolong.training import trainer as trainer_module
from megaprolong.training.config import Config

REPO = Path(__file__).resolve().parents[2]
POISONED_STEP = 3


def main(root: str, out: str, allowed: str) -> None:
    cfg = load_config(Config, REPO / "examples" / "tiny_stage1.yaml", [
        f"data.mix={REPO / 'examples/mixes/tiny_stage1.yaml'}", f"data.root={root}", "data.prepare=null",
        "train.steps=6", "parallel.tp=1", "parallel.sequence_parallel=false", "model.vocab_size=512",
        f"checkpoint.dir={out}/ckpt", "checkpoint.interval=2", f"logging.metrics_file={out}/m.jsonl",
        f"train.skip_nonfinite_steps={allowed}"])
    state = {"step": 0, "changed": None}
    real_loss, real_step = trainer_module.token_loss, trainer_module.Trainer.train_step

    def poisoned(loss_mask, domains, num_domains, per_token_loss):
        if state["step"] == POISONED_STEP:
            web = (domains.reshape(per_token_loss.shape) == 2).float()  # the mix's third domain
            per_token_loss = per_token_loss * torch.where(web > 0, torch.tensor(float("nan")), torch.tensor(1.0))
        return real_loss(loss_mask, domains, num_domains, per_token_loss)

    def step(self, *args, **kwargs):
        state["step"] = self.step + 1
        before = [p.detach().clone() for c in self.model for p in c.parameters()]
        m = real_step(self, *args, **kwargs)
        if state["step"] == POISONED_STEP:
            state["changed"] = not all(torch.equal(a, p) for a, p in zip(before, (p for c in self.model
                                                                                  for p in c.parameters())))
        return m

    trainer_module.token_loss, trainer_module.Trainer.train_step = poisoned, step
    error, lines = None, []
    try:
        trainer_module.run(cfg, lambda: build_dataset(cfg), log=lines.append)
    except trainer_module.NonFiniteLoss as e:
        error = str(e)
    rows = [json.loads(line) for line in Path(out, "m.jsonl").read_text().splitlines()]
    print(json.dumps({"error": error, "rows": rows, "changed": state["changed"], "lines": lines}))


if __name__ == "__main__":
    main(*sys.argv[1:])
