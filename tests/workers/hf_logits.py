"""Logits of a converted checkpoint under a parallel layout vs transformers (run under torchrun).

Usage: hf_logits.py HF_DIR MCORE_DIR [HF_DIR MCORE_DIR ...] [key=value ...]: each pair is checked in turn
under the same layout (one launch). Prints HF_LOGITS_OK HF_DIR for each pair whose logits agree within 1e-4
and whose per-token training loss equals transformers' cross-entropy (a padded vocabulary included).
"""

import json
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megaprolong.config import load_config
from megaprolong.convert.jobs import resolve_checkpoint
from megaprolong.convert.hf import HFCheckpoint, model_config_from_hf
from megaprolong.runtime.device import device
from megaprolong.training import checkpoint
from megaprolong.training.config import Config
from megaprolong.training.trainer import Trainer


def check(hf_dir, mcore_dir, overrides):
    m = model_config_from_hf(HFCheckpoint(hf_dir).config)
    cfg = load_config(Config, None, [
        f"model.{k}={json.dumps(v)}" for k, v in vars(m).items()] + ["train.precision=fp32", "train.recompute=none",
                                                          "train.seq_length=32", "train.global_batch_size=4",
                                                          *overrides])
    trainer = Trainer(cfg)
    checkpoint.load(trainer, resolve_checkpoint(mcore_dir), resume=False)
    ids = torch.randint(0, m.vocab_size, (1, 33), generator=torch.Generator().manual_seed(1))
    labels, ids = ids[:, 1:], ids[:, :-1]
    out = {}

    def step(data_iterator, model):
        tokens = next(data_iterator).to(device())
        positions = torch.arange(tokens.shape[1], device=device())[None]
        logits = model(tokens, positions, attention_mask=None)
        if ps.is_pipeline_last_stage():  # the training path: labels in, per-token loss out
            out["loss"] = model(tokens, positions, attention_mask=None, labels=labels.to(device()),
                                output_processor=trainer._output_processor).detach().float().cpu()[0]
        return logits, lambda x: (x.sum() * 0, {"logits": x.detach()})

    results = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([ids]), model=trainer.model,
                                          num_microbatches=1, seq_length=32, micro_batch_size=1, forward_only=True,
                                          collect_non_loss_data=False)
    if ps.is_pipeline_last_stage():
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        logits = gather_from_tensor_model_parallel_region(results[0]["logits"]).float().cpu()[0]
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = hf(input_ids=ids, use_cache=False).logits[0]
        diff = (logits[:, :m.vocab_size] - ref).abs().max().item()
        assert diff < 1e-4, diff
        ce = torch.nn.functional.cross_entropy(ref, labels[0], reduction="none")
        torch.testing.assert_close(out["loss"], ce, rtol=1e-5, atol=1e-5)
        out["ok"] = True
    flag = torch.tensor([1.0 if out.get("ok") else 0.0], device=device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0 and flag.item() == 1.0:
        print(f"HF_LOGITS_OK {hf_dir}", flush=True)


if __name__ == "__main__":
    paths = [a for a in sys.argv[1:] if "=" not in a]
    overrides = [a for a in sys.argv[1:] if "=" in a]
    for hf_dir, mcore_dir in zip(paths[::2], paths[1::2], strict=True):
        check(hf_dir, mcore_dir, overrides)
    dist.destroy_process_group()
