"""Evaluation of HF checkpoints: HELMET/RULER-style recall tasks, long-document perplexity, HELMET adapter."""
