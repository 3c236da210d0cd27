"""Console entry point ``megaprolong-sft`` (see megaprolong/sft/cli.py)."""

import sys

from megaprolong.sft.cli import main

if __name__ == "__main__":
    sys.exit(main())
