"""Console entry point ``megaprolong-eval``: long-context evaluation (not available yet)."""

from tools._unavailable import unavailable


def main() -> int:
    return unavailable("megaprolong-eval", "long-context evaluation")
