#!/usr/bin/env python3
"""``python tools/pipeline.py ...``: the same as ``megaprolong-pipeline`` (a script of the checkout, Megatron-LM
style; the command itself is megaprolong.pipeline.cli's main)."""

import sys

from megaprolong.pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
