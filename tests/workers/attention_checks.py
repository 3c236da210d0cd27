"""Document masking on packed sequences, checked on one rank (run under torchrun --nproc-per-node 1).

1. A packed multi-document sequence gives, for every document, the logits of that document run alone.
2. Changing the tokens of one document leaves the other documents' logits unchanged.
3. A document alone in THD form gives the logits of the ordinary (BSHD, causal) forward.
4. RoPE from the micro-batch's per-token frequencies (our path) gives exactly the logits of megatron-core's
   own THD RoPE (its per-document loop, used when the batch is a plain PackedSeqParams).
Prints ATTENTION_CHECKS_OK when all hold.
"""

import numpy as np
import torch

from megaprolong.config import load_config
from megaprolong.data.packing import make_sample
from megaprolong.model.attention import packed_batch
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


def main():
    trainer = Trainer(load_config(Config, None, TINY))
    model = trainer.model[0]
    rng = np.random.default_rng(5)
    docs = [rng.integers(0, 256, size=n) for n in (5, 17, 1, 9)]
    packed = logits(model, sample_of(docs))
    bounds = np.cumsum([0] + [len(d) for d in docs])
    for i, d in enumerate(docs):
        alone = logits(model, sample_of([d]))
        torch.testing.assert_close(packed[bounds[i]:bounds[i + 1]], alone, rtol=1e-5, atol=1e-5)
    changed = [d.copy() for d in docs]
    changed[1] = rng.integers(0, 256, size=len(docs[1]))
    other = logits(model, sample_of(changed))
    for i in (0, 2, 3):
        assert torch.equal(other[bounds[i]:bounds[i + 1]], packed[bounds[i]:bounds[i + 1]]), i
    assert not torch.allclose(other[bounds[1]:bounds[2]], packed[bounds[1]:bounds[2]])
    d = torch.from_numpy(docs[1])[None].to(device())
    with torch.no_grad():
        bshd = model(d, torch.arange(d.shape[1], device=device())[None], attention_mask=None)[0]
    torch.testing.assert_close(bshd, logits(model, sample_of([docs[1]])), rtol=1e-5, atol=1e-5)
    assert torch.equal(packed, logits(model, sample_of(docs), our_rope=False))
    print("ATTENTION_CHECKS_OK")


if __name__ == "__main__":
    main()
