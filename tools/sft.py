"""Console entry point ``megaprolong-sft``: the HF-format SFT stage (not available yet)."""

from tools._unavailable import unavailable


def main() -> int:
    return unavailable("megaprolong-sft", "the HF-format SFT stage")
