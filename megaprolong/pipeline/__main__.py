"""``python -m megaprolong.pipeline``: the same as ``megaprolong-pipeline``."""

import sys

from megaprolong.pipeline.cli import main

sys.exit(main())
