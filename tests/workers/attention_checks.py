"""Document masking on packed sequences, checked on one rank (run under torchrun --nproc-per-node 1).

Usage: attention_checks.py [key=value ...] (e.g. ``train.precision=bf16``: the kernel ``auto`` picks in 16 bits,
torch's varlen attention on a GPU; logits then agree to bf16 rounding instead of float32's).

1. A packed multi-document sequence gives, for every document, the logits of that document run alone.
2. Changing the tokens of one document leaves the other documents' logits unchanged.
3. A document alone in THD form gives the logits of the ordinary (BSHD, causal) forward.
4. RoPE from the micro-batch's per-token frequencies (our path) gives exactly the logits of megatron-core's
   own THD RoPE (its per-document loop, used when the batch is a plain PackedSeqParams).
Prints ATTENTION_CHECKS_OK when all hold.
"""

import sys

import numpy as np
import torch

from megaprolong.config import load_config
from megaprolong.data.packing import make_sample
from megaprolong.model.attention import packed_batch
from megaprolong.model.attention.kernels import HALF_PRECISION_TOLERANCE
from megaprolong.model.context_parallel import split_for_context_parallel
from megaprolong.model.state import unwrap_model
from megaprolong.runtime.device import device
from megaprolong.training.config import Config
from megaprolong.training.trainer import Trainer

from parity import TINY


def logits(model, sample, our_rope=True):
    local = split_for_context_parallel(sample, 1, 0)
    tokens = torch.from_numpy(local.tokens)[None].to(device())
    pos = torch.from_numpy(local.position_ids)[None].to(device())
    rotary = unwrap_model(model).rotary_pos_emb if our_rope else None
    with torch.no_grad():
        return model(tokens, pos, attention_mask=None,
                     packed_seq_params=packed_batch(local, tokens.device, 1, 0, rotary))[0]


def sample_of(docs):
    segments = [(i, 0, len(d)) for i, d in enumerate(docs)]
    return make_sample(segments, lambda d, a, b: docs[d][a:b])


def main(overrides: list[str]):
    trainer = Trainer(load_config(Config, None, TINY + overrides))
    model = trainer.model[0]

    errors = []

    def assert_same(got, want):  # float32: to rounding; 16 bits: within what its rounding allows a correct kernel
        errors.append(((got - want).abs().max() / want.abs().max()).item())
        if trainer.cfg.train.precision == "fp32":
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            assert errors[-1] <= HALF_PRECISION_TOLERANCE, f"{errors[-1]:.2e} of max |logit|"

    rng = np.random.default_rng(5)
    docs = [rng.integers(0, 256, size=n) for n in (5, 17, 1, 9)]
    packed = logits(model, sample_of(docs))
    bounds = np.cumsum([0] + [len(d) for d in docs])
    for i, d in enumerate(docs):
        alone = logits(model, sample_of([d]))
        assert_same(packed[bounds[i]:bounds[i + 1]], alone)
    changed = [d.copy() for d in docs]
    changed[1] = rng.integers(0, 256, size=len(docs[1]))
    other = logits(model, sample_of(changed))
    for i in (0, 2, 3):
        assert torch.equal(other[bounds[i]:bounds[i + 1]], packed[bounds[i]:bounds[i + 1]]), i
    assert not torch.allclose(other[bounds[1]:bounds[2]], packed[bounds[1]:bounds[2]])
    d = torch.from_numpy(docs[1])[None].to(device())
    with torch.no_grad():
        bshd = model(d, torch.arange(d.shape[1], device=device())[None], attention_mask=None)[0]
    assert_same(bshd, logits(model, sample_of([docs[1]])))
    assert torch.equal(packed, logits(model, sample_of(docs), our_rope=False))
    print(f"RESULT document masking ({trainer.attention['attention_kernel'].split(':')[0]}, "
          f"{trainer.cfg.train.precision}): packed = alone = BSHD within {max(errors):.1e} of max |logit|, "
          "other documents' logits unchanged, our RoPE = megatron's")
    print("ATTENTION_CHECKS_OK")


if __name__ == "__main__":
    main(sys.argv[1:])
