"""GPU check of the SFT stage's attention (megaprolong-sft without flash-attn): a packed bf16 row of 64K tokens
(conversations of uneven lengths) through ``attn_implementation="megaprolong_varlen"`` (torch's varlen kernel)
and through transformers' sdpa path (a dense per-conversation mask), judged by what attention changes: the
logits (max difference / max |logit|) and every parameter's gradient (relative norm). The loss is not the
test: a random model's loss is ~ln(vocab) whatever attention does.

Negative control: the same row with the position ids of one conversation (nothing restarts), so that
conversations see each other, must be flagged. Peak memory of each path (torch.cuda.max_memory_allocated) is
printed. Prints SFT_ATTENTION_OK.

    python benchmarks/device_sft_attention_check.py [--device cpu --tokens 4096]
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megaprolong.sft.varlen_attention import NAME, prepare_per_batch, register

LENGTHS_64K = [20000, 311, 9000, 4096, 17000, 123, 15006]  # 65,536 tokens
LOGITS_TOLERANCE, GRAD_TOLERANCE = 2e-2, 5e-2  # bf16 (the model's weights and activations), O(1) when wrong


def model(attn: str, device: str, dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=65536)
    config._attn_implementation = attn
    m = LlamaForCausalLM(config).to(device, dtype)
    if attn == NAME:
        prepare_per_batch(m)
    return m


def run(attn: str, batch: dict, device: str, dtype) -> tuple[torch.Tensor, dict, float]:
    m = model(attn, device, dtype)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = m(**batch)
    out.loss.backward()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return out.logits.detach().float(), {n: p.grad.float() for n, p in m.named_parameters()}, peak


def differences(a, b) -> tuple[float, float]:
    """(max logit difference / max |logit|, largest relative gradient-norm difference) of two runs."""
    (la, ga, _), (lb, gb, _) = a, b
    logits = ((la - lb).abs().max() / lb.abs().max()).item()
    grads = max(((ga[k] - gb[k]).norm() / gb[k].norm().clamp_min(1e-12)).item() for k in gb)
    return logits, grads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=65536, help="packed row length (the conversations scaled to it)")
    a = ap.parse_args()
    register()
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    lengths = [max(1, n * a.tokens // 65536) for n in LENGTHS_64K]
    lengths[-1] += a.tokens - sum(lengths)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 4096, (1, sum(lengths)), generator=g).to(a.device)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(a.device)
    batch = {"input_ids": ids, "labels": ids, "use_cache": False, "position_ids": positions}
    varlen, sdpa = run(NAME, batch, a.device, dtype), run("sdpa", batch, a.device, dtype)
    logits, grads = differences(varlen, sdpa)
    ok = logits <= LOGITS_TOLERANCE and grads <= GRAD_TOLERANCE
    print(f"RESULT sft attention {NAME} vs sdpa on a packed {sum(lengths):,}-token row: logits {logits:.2e} of max, "
          f"gradients {grads:.2e} (relative norm); peak {varlen[2]:.2f} GiB vs {sdpa[2]:.2f} GiB "
          f"{'ok' if ok else 'MISMATCH'}", flush=True)
    merged = dict(batch, position_ids=torch.arange(sum(lengths), device=a.device)[None])  # one conversation
    control_logits, control_grads = differences(run(NAME, merged, a.device, dtype), sdpa)
    flagged = control_logits > LOGITS_TOLERANCE and control_grads > GRAD_TOLERANCE
    print(f"RESULT negative control (conversations seeing each other): logits {control_logits:.2e}, gradients "
          f"{control_grads:.2e} {'flagged' if flagged else 'NOT FLAGGED: the check cannot see this error'}", flush=True)
    if not (ok and flagged):
        sys.exit(1)
    print("SFT_ATTENTION_OK")


if __name__ == "__main__":
    main()
