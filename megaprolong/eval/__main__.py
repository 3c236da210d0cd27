"""``python -m megaprolong.eval``: the same as ``megaprolong-eval``."""

import sys

from megaprolong.eval.cli import main

sys.exit(main())
