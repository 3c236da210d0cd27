#!/usr/bin/env python3
"""``python tools/preprocess_data.py ...``: the same as ``megaprolong-preprocess`` (a script of the checkout, Megatron-LM style; the
command itself is megaprolong.cli.preprocess's main)."""

import sys

from megaprolong.cli.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
