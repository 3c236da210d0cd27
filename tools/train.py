#!/usr/bin/env python3
"""``python tools/train.py ...``: the same as ``megaprolong-train`` (a script of the checkout, Megatron-LM style; the
command itself is megaprolong.train's main)."""

import sys

from megaprolong.train import main

if __name__ == "__main__":
    sys.exit(main())
