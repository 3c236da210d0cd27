"""Console entry point ``megaprolong-eval`` (see megaprolong/eval/cli.py)."""

import sys

from megaprolong.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
