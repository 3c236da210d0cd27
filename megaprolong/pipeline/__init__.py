"""The whole recipe as one submission: ``megaprolong-pipeline`` (config, steps, Slurm, local run)."""
