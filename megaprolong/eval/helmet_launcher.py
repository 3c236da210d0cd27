"""Run HELMET's ``eval.py`` with the attention the machine has; HELMET's files stay untouched.

Run by HELMET's own interpreter, in its checkout (``python helmet_launcher.py --config FILE``), so it imports
nothing of megaprolong. HELMET loads every HF model with ``attn_implementation="flash_attention_2"``
(``model_utils.HFModel``), which fails where flash-attn is not installed (CPUs, many GPU clusters); its
constructor takes the implementation as a keyword that ``load_LLM`` never passes, so this sets it: flash-attn
when it imports and a GPU is present, else torch's sdpa (causal, no mask for a single prompt).
"""

import importlib.util
import os
import runpy
import sys


def attention() -> str:
    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def main() -> None:
    sys.path.insert(0, os.getcwd())
    import model_utils

    chosen = os.environ.get("MEGAPROLONG_HELMET_ATTENTION") or attention()
    original = model_utils.HFModel.__init__

    def init(self, *args, **kwargs):
        kwargs.setdefault("attn_implementation", chosen)
        original(self, *args, **kwargs)

    model_utils.HFModel.__init__ = init
    print(f"helmet_launcher: attn_implementation={chosen}", flush=True)
    sys.argv = ["eval.py", *sys.argv[1:]]
    runpy.run_path("eval.py", run_name="__main__")


if __name__ == "__main__":
    main()
