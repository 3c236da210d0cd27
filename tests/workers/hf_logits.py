"""Logits of a converted checkpoint under a parallel layout vs transformers (run under torchrun).

Usage: hf_logits.py HF_DIR MCORE_DIR [HF_DIR MCORE_DIR ...] [packed=1] [key=value ...]: each pair is checked
in turn under the same layout (one launch). Prints HF_LOGITS_OK HF_DIR for each pair whose logits agree within
1e-4 and whose per-token training loss equals transformers' cross-entropy (a padded vocabulary included).
``packed=1``: through the path training takes instead (a packed sample of three documents, the trainer's
micro-batch: PackedBatch, per-document CP padding and zigzag split, our attention and RoPE rows), the logits
of every rank's rows gathered back into sequence order and compared, document by document, with
transformers run on each document alone.
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


def check_packed(hf_dir, mcore_dir, overrides):
    import numpy as np
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from transformers import AutoModelForCausalLM

    from megaprolong.data.packing import make_sample
    from megaprolong.model.context_parallel import padded_lengths, partition_index

    m = model_config_from_hf(HFCheckpoint(hf_dir).config)
    cfg = load_config(Config, None, [
        f"model.{k}={json.dumps(v)}" for k, v in vars(m).items()] + ["train.precision=fp32", "train.recompute=none",
                                                          "train.seq_length=64", "train.global_batch_size=1",
                                                          *overrides])
    trainer = Trainer(cfg)
    checkpoint.load(trainer, resolve_checkpoint(mcore_dir), resume=False)
    lengths = [29, 6, 29]  # uneven, one shorter than 2 * CP * TP
    docs = [torch.randint(0, m.vocab_size, (n,), generator=torch.Generator().manual_seed(7 + i)).numpy()
            for i, n in enumerate(lengths)]
    sample = make_sample([(i, 0, n) for i, n in enumerate(lengths)], lambda d, a, b: docs[d][a:b])
    batch = trainer._micro_batches([sample])[0]
    with torch.no_grad():
        local = trainer.model[0](batch["tokens"], batch["position_ids"], attention_mask=None,
                                 packed_seq_params=batch["packed_seq_params"])  # [1, t, vocab / tp]
    local = gather_from_tensor_model_parallel_region(local.transpose(0, 1).contiguous())[:, 0].float()
    cp, p = ps.get_context_parallel_world_size(), cfg.parallel
    parts = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(parts, local.contiguous(), group=ps.get_context_parallel_group())
    padded = padded_lengths(np.array(lengths), cp, (2 * cp if cp > 1 else 1) * (p.tp if p.sequence_parallel else 1))
    cu = np.concatenate([[0], np.cumsum(padded)])
    whole = torch.empty(int(cu[-1]), local.shape[1])
    for rank, part in enumerate(parts):  # every rank's rows back in sequence order
        whole[torch.from_numpy(partition_index(cu, cp, rank))] = part.cpu()
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    worst = 0.0
    with torch.no_grad():
        for doc, start in zip(docs, cu[:-1]):
            ref = hf(input_ids=torch.from_numpy(doc)[None].long(), use_cache=False).logits[0]
            got = whole[int(start):int(start) + len(doc), :m.vocab_size]
            worst = max(worst, (got - ref).abs().max().item())
    assert worst < 1e-4, worst
    if dist.get_rank() == 0:
        print(f"HF_LOGITS_OK {hf_dir} packed (max difference {worst:.1e})", flush=True)


if __name__ == "__main__":
    paths = [a for a in sys.argv[1:] if "=" not in a]
    overrides = [a for a in sys.argv[1:] if "=" in a and a != "packed=1"]
    for hf_dir, mcore_dir in zip(paths[::2], paths[1::2], strict=True):
        (check_packed if "packed=1" in sys.argv[1:] else check)(hf_dir, mcore_dir, overrides)
    dist.destroy_process_group()
