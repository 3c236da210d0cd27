#!/usr/bin/env python3
"""``python tools/plan.py ...``: the same as ``megaprolong-plan`` (a script of the checkout, Megatron-LM style; the
command itself is megaprolong.cli.plan's main)."""

import sys

from megaprolong.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
