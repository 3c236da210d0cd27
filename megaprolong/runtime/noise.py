"""Silence the start-up messages megatron-core and torch print on every rank that say nothing actionable
here (missing TE/apex on CPU is expected, CPU-irrelevant CUDA advice). Only these exact messages are
filtered; every other warning still shows.

megatron-core's deprecation notices for the APIs we build on (GPTModel, its own asynchronous checkpoint
writer) stay visible, once per process: they are what tells us to migrate (README, "megatron-core
deprecations")."""

from __future__ import annotations

import logging
import warnings

_MESSAGES = [
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"absl\.logging is not installed",
    r"MimoModelConfig is experimental",
    r"full scope is deprecated",
    r"When using sequence parallelism it is recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS",
    r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor|_all_gather_base|_reduce_scatter_base)` is deprecated",
    r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
    r"Could not determine rank from torch\.distributed",
    r"Please use DTensor instead and we are deprecating ShardedTensor",
    r"The argument order of load has been changed",
    r"torch\.distributed is disabled, unavailable or uninitialized",
]
_LOG_MESSAGES = ("full_param_layout not provided", "No CUDA runtime is found")
_DEPRECATIONS = ("GPTModel IS DEPRECATED", "MCore's async save is deprecated")  # shown once per process


class _DropMessages(logging.Filter):
    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        for notice in _DEPRECATIONS:
            if notice in msg:
                first = notice not in self.seen
                self.seen.add(notice)
                return first
        return not any(m in msg for m in _LOG_MESSAGES)


def silence_known_noise() -> None:
    for pattern in _MESSAGES:
        warnings.filterwarnings("ignore", message=f".*{pattern}")
    for name in ("torch.utils.cpp_extension", "megatron.core.models.gpt.gpt_model",
                 "megatron.core.distributed.distributed_data_parallel",
                 "megatron.core.dist_checkpointing.strategies.torch"):
        logging.getLogger(name).addFilter(_DropMessages())
