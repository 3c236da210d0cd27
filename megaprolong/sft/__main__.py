"""``python -m megaprolong.sft`` (torchrun/srun target): the same as ``megaprolong-sft``."""

import sys

from megaprolong.sft.cli import main

sys.exit(main())
