"""Peak memory of the LM head + cross-entropy (forward and backward) with and without chunking
(``train.loss_chunk_tokens``), on CPU: the logits of all local tokens vs one chunk at a time.

    python benchmarks/loss_memory.py [--tokens 32768 --vocab 32000 --hidden 512]

Each configuration runs in its own process (peak RSS of a fresh process); the table shows the peak and
the fp32 logits size it implies. The chunked path is megaprolong.model.chunked_loss, the one training uses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from _measure import run_measured  # noqa: E402

WORKER = """
import sys, torch
from megaprolong.model.chunked_loss import chunked_lm_loss
tokens, vocab, hidden, chunk = map(int, sys.argv[1:])
torch.manual_seed(0)
head = torch.nn.Linear(hidden, vocab, bias=False)
h = torch.randn(tokens, 1, hidden, requires_grad=True)
labels = torch.randint(0, vocab, (1, tokens))
def out(x, weight=None, runtime_gather_output=None):
    return head(x), None
def ce(lab, logits):  # [s, b, v] logits, [b, s] labels -> [b, s]
    return torch.nn.functional.cross_entropy(logits.permute(1, 2, 0), lab, reduction="none")
if chunk:
    loss = chunked_lm_loss(chunk)(hidden_states=h, output_layer=out, output_weight=None, labels=labels,
                                  runtime_gather_output=None, compute_language_model_loss=ce,
                                  scale_logits=lambda x: x)
else:
    loss = ce(labels, out(h)[0])
loss.sum().backward()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32768, help="local tokens (S / CP)")
    ap.add_argument("--vocab", type=int, default=32000, help="local vocabulary (V / TP)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--chunks", default="0,8192,2048", help="chunk sizes to compare (0: unchunked)")
    args = ap.parse_args()
    logits_gib = args.tokens * args.vocab * 4 / 2**30
    print(f"{args.tokens:,} tokens x {args.vocab:,} vocab (fp32 logits {logits_gib:.2f} GiB), hidden {args.hidden}")
    print(f"{'chunk':>8} {'seconds':>8} {'peak RSS GiB':>13}")
    for chunk in (int(c) for c in args.chunks.split(",")):
        seconds, peak = run_measured([sys.executable, "-c", WORKER, str(args.tokens), str(args.vocab),
                                      str(args.hidden), str(chunk)], REPO)
        print(f"{chunk or 'none':>8} {seconds:>8.1f} {peak / 2**30:>13.2f}")


if __name__ == "__main__":
    main()
