#!/usr/bin/env python3
"""``python tools/eval.py ...``: the same as ``megaprolong-eval`` (a script of the checkout, Megatron-LM style; the
command itself is megaprolong.eval.cli's main)."""

import sys

from megaprolong.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
