"""Console entry point ``megaprolong-train`` (the logic lives in megaprolong.train)."""

from megaprolong.train import main

__all__ = ["main"]
