#!/usr/bin/env python3
"""``python tools/convert.py ...``: the same as ``megaprolong-convert`` (a script of the checkout, Megatron-LM style; the
command itself is megaprolong.cli.convert's main)."""

import sys

from megaprolong.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
