"""The console scripts' entry points (``megaprolong-preprocess``, ``-convert``, ``-plan``; training, SFT and
evaluation have theirs beside their code: ``megaprolong.train``, ``megaprolong.sft.cli``,
``megaprolong.eval.cli``). ``tools/`` holds the same commands as scripts for a checkout."""
