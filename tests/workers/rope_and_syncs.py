"""RoPE tables and host transfers of the real model's packed path (run under torchrun, 1 rank).

Usage: rope_and_syncs.py
- 40 micro-batches whose largest documents all differ in length: one RoPE table stays alive (the model's,
  at the stage's length), and megatron's per-length cache stays empty.
- no host transfer (``Tensor.cpu / .item / .tolist / .numpy``) inside a transformer layer during a forward of
  a packed micro-batch (our ``PackedBatch``), nor with megatron's plain ``PackedSeqParams`` after the first
  layer built the layout.
Prints ROPE_AND_SYNCS_OK.
"""

import gc
import sys

import numpy as np
import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.transformer_layer import TransformerLayer

from megaprolong.config import load_config
from megaprolong.data.packing import make_sample
from megaprolong.model.state import unwrap_model
from megaprolong.training.config import Config
from megaprolong.training.trainer import Trainer

SEQ, DIM = 2048, 128


def rope_tables(rot_dim: int) -> int:
    """Distinct storages of live fp32 tensors shaped like a RoPE table [len, 1, 1, rot_dim] (len > 64)."""
    seen = set()
    for obj in gc.get_objects():
        if torch.is_tensor(obj) and obj.dim() == 4 and tuple(obj.shape[1:]) == (1, 1, rot_dim) \
                and obj.shape[0] > 64 and obj.dtype == torch.float32:
            seen.add(obj.untyped_storage().data_ptr())
    return len(seen)


class HostTransfers:
    """Records Tensor.cpu/.item/.tolist/.numpy calls made while a transformer layer's forward runs, with the
    file that made them (on the CPU, megatron-core runs under cpu_compat's torch-function mode, which calls
    each method a second time: those calls are not counted)."""

    NAMES = ("cpu", "item", "tolist", "numpy")

    def __init__(self, model):
        self.inside, self.calls = 0, []
        for m in model.modules():
            if isinstance(m, TransformerLayer):
                m.register_forward_pre_hook(lambda *_: setattr(self, "inside", self.inside + 1))
                m.register_forward_hook(lambda *_: setattr(self, "inside", self.inside - 1))
        self.real = {n: getattr(torch.Tensor, n) for n in self.NAMES}
        for name, real in self.real.items():
            setattr(torch.Tensor, name, self._counting(name, real))

    def _counting(self, name, real):
        def call(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if self.inside and not caller.endswith("cpu_compat.py"):
                self.calls.append((name, caller.split("site-packages/")[-1].split("megaprolong/")[-1]))
            return real(tensor, *args, **kwargs)
        return call

    def close(self):
        for name, real in self.real.items():
            setattr(torch.Tensor, name, real)


def main() -> None:
    cfg = load_config(Config, None, [
        "model.num_layers=2", f"model.hidden_size={2 * DIM}", "model.ffn_hidden_size=256",
        "model.num_attention_heads=2", "model.num_query_groups=1", "model.vocab_size=128",
        f"model.max_position_embeddings={SEQ}", f"train.seq_length={SEQ}", "train.global_batch_size=1",
        "train.precision=fp32", "train.recompute=full", "train.steps=40"])
    trainer = Trainer(cfg)
    model = unwrap_model(trainer.model[0])
    rng = np.random.default_rng(0)
    for i in range(40):  # the largest document: 1000 + 7 i tokens, the rest short
        lengths = [1000 + 7 * i] + [int(n) for n in rng.integers(5, 60, size=12)]
        lengths.append(SEQ - sum(lengths))
        sample = make_sample([(d, 0, n) for d, n in enumerate(lengths)], lambda d, a, b: rng.integers(0, 128, size=b - a))
        trainer.forward_backward([sample])
    rot_dim = model.rotary_pos_emb.inv_freq.numel() * 2
    tables = rope_tables(rot_dim)
    assert tables == 1, f"{tables} RoPE tables alive after 40 micro-batches of distinct lengths"
    assert RotaryEmbedding.forward.cache_info().currsize == 0, RotaryEmbedding.forward.cache_info()

    batch = trainer._micro_batches([sample])[0]
    counter = HostTransfers(model)
    try:
        with torch.no_grad():
            model(batch["tokens"], batch["position_ids"], attention_mask=None,
                  packed_seq_params=batch["packed_seq_params"])
        assert counter.calls == [], f"host transfers inside layers (PackedBatch): {counter.calls}"
        plain = batch["packed_seq_params"]
        plain = PackedSeqParams(**{f: getattr(plain, f) for f in PackedSeqParams.__dataclass_fields__})
        with torch.no_grad():
            model(batch["tokens"], batch["position_ids"], attention_mask=None, packed_seq_params=plain)
        ours = [c for c in counter.calls if c[1].startswith("model/")]
        # the first layer's attention builds the layout (one host copy), the second reuses it; megatron's own
        # THD RoPE (applied when no PackedBatch brings the frequencies) still syncs in every layer
        assert ours == [("cpu", "model/attention/core.py"), ("numpy", "model/attention/core.py")], ours
    finally:
        counter.close()
    print("ROPE_AND_SYNCS_OK")


if __name__ == "__main__":
    main()
