#!/usr/bin/env python3
"""``python tools/sft.py ...``: the same as ``megaprolong-sft`` (a script of the checkout, Megatron-LM style; the
command itself is megaprolong.sft.cli's main)."""

import sys

from megaprolong.sft.cli import main

if __name__ == "__main__":
    sys.exit(main())
