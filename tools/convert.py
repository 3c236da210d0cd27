"""Console entry point ``megaprolong-convert``: HF Llama <-> megatron-core checkpoint conversion (not available yet)."""

from tools._unavailable import unavailable


def main() -> int:
    return unavailable("megaprolong-convert", "HF Llama <-> megatron-core checkpoint conversion")
