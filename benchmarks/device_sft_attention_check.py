"""GPU check of the SFT stage's attention (megaprolong-sft without flash-attn): a packed bf16 row of 64K tokens
(conversations of uneven lengths) through attn_implementation="megaprolong_varlen" (torch's varlen kernel)
and through transformers' sdpa path (a dense per-conversation mask): loss and gradients agree to bf16
tolerance; peak memory of each (torch.cuda.max_memory_allocated) is printed. Prints SFT_ATTENTION_OK."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megaprolong.sft.varlen_attention import NAME, register

LENGTHS = [20000, 311, 9000, 4096, 17000, 123, 15006]  # 65,536 tokens


def model(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=65536)
    config._attn_implementation = attn
    return LlamaForCausalLM(config).to("cuda", torch.bfloat16)


def main() -> None:
    register()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 4096, (1, sum(LENGTHS)), generator=g).cuda()
    batch = {"input_ids": ids, "labels": ids, "use_cache": False,
             "position_ids": torch.cat([torch.arange(n) for n in LENGTHS])[None].cuda()}
    results = {}
    for attn in (NAME, "sdpa"):
        m = model(attn)
        torch.cuda.reset_peak_memory_stats()
        loss = m(**batch).loss
        loss.backward()
        torch.cuda.synchronize()
        results[attn] = (loss.float().item(), {n: p.grad.float() for n, p in m.named_parameters()},
                         torch.cuda.max_memory_allocated() / 2**30)
        print(f"{attn:<20} loss {results[attn][0]:.5f} peak {results[attn][2]:.2f} GiB", flush=True)
        del m, loss
    (lv, gv, _), (ls, gs, _) = results[NAME], results["sdpa"]
    assert abs(lv - ls) <= 2e-2 * abs(ls), (lv, ls)
    worst = max(((gv[k] - gs[k]).norm() / gs[k].norm().clamp_min(1e-12)).item() for k in gs)
    print(f"largest relative gradient difference (norm) {worst:.2e}")
    assert worst < 5e-2, worst
    print("SFT_ATTENTION_OK")


if __name__ == "__main__":
    main()
