"""``megaprolong-plan``: will a recipe fit a cluster, roughly how fast, and which layout to use."""

from __future__ import annotations

import argparse
import sys

from megaprolong.config import ConfigError, load_config
from megaprolong.training.config import Config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="megaprolong-plan",
                                description="Check a recipe's layout against a cluster, estimate per-GPU memory "
                                            "(weights, grads, optimizer shards, activations, logits) and step "
                                            "time, and suggest the fastest layout that fits.")
    p.add_argument("--recipe", required=True, help="recipe YAML (examples/prolong_512k.yaml ...)")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--gpu-mem", type=float, default=80, help="GPU memory in GiB (default 80, H100)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. train.recompute=full")
    a = p.parse_args(argv)
    from megaprolong.training.plan import describe

    try:
        print(describe(load_config(Config, a.recipe, a.overrides), a.nodes, a.gpus_per_node, a.gpu_mem))
    except ConfigError as e:
        print(f"megaprolong-plan: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
