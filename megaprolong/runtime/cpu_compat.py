"""Run megatron-core on a machine without CUDA (CPU tensors, gloo collectives).

megatron-core assumes CUDA in a handful of places (listed below). So that the *same* training
code can dry-run a recipe on a laptop and CI can test every parallel layout for real, this module patches
exactly those places, and nothing else:

- tensors and modules asked for on "cuda" (``device=`` keywords, ``.to("cuda")``, ``.cuda()``) stay on the
  CPU; ``pin_memory=True`` becomes False (pinning needs a CUDA driver);
- the CUDA RNG (``torch.cuda.manual_seed``/``get_rng_state``/``set_rng_state`` and megatron's
  ``_get_cuda_rng_state``/``_set_cuda_rng_state``) is the CPU generator, so megatron's model-parallel RNG
  tracker forks and restores it as it would the GPU's;
- streams, events, ``synchronize`` and NVTX ranges are no-ops (everything on CPU is already ordered);
- CPU float tensors report ``torch.cuda.*Tensor`` from ``Tensor.type()``, which megatron's grad clipping
  and distributed optimizer assert on.

``apply()`` is called by :func:`megaprolong.runtime.device.init_distributed` and refuses to run where
CUDA is available: on a GPU nothing here is ever active.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

_applied = False


def _cpu_if_cuda(device):
    """Map any spelling of a CUDA device (``"cuda"``, ``"cuda:1"``, ``torch.device("cuda")``, an int) to CPU."""
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"  # an integer device index can only mean a CUDA device
    return device


class _CudaOnCpu(TorchFunctionMode):
    """Rewrites CUDA placement requests in every torch call into CPU ones."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to:
            args = tuple(_cpu_if_cuda(a) for a in args)
        elif func is torch.Tensor.cuda:
            return args[0]
        elif func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            # megatron asserts grads are 'torch.cuda.FloatTensor' before clipping / sharding
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        return func(*args, **kwargs)


class _NoStream:
    """Stands in for ``torch.cuda.Stream``: CPU work is already ordered, so waits are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NoEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _NoEvent(_NoStream):
    def record(self, *args, **kwargs):
        pass

    def elapsed_time(self, other):
        return 0.0


def _cpu_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(new_state)


class _DropCpuRngWarning(logging.Filter):
    # The tracker compares the CPU RNG before/after a fork of the "CUDA" RNG; here they are the same one.
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def apply() -> None:
    """Install the patches (idempotent). Raises if CUDA is available: they must never touch a GPU run."""
    global _applied
    if _applied:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu_compat.apply() called on a machine with CUDA; it is only for CPU runs")

    cuda = torch.cuda
    # a device object, not an index: code in backward passes runs outside the torch-function mode
    cuda.current_device = lambda: torch.device("cpu")
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly
    cuda.manual_seed = cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.get_rng_state = _cpu_rng_state
    cuda.set_rng_state = _set_cpu_rng_state
    cuda.random.get_rng_state = _cpu_rng_state
    cuda.random.set_rng_state = _set_cpu_rng_state
    cuda.Stream = _NoStream
    cuda.Event = _NoEvent
    cuda.current_stream = lambda *a, **k: _NoStream()
    cuda.default_stream = lambda *a, **k: _NoStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    torch.nn.Module.cuda = lambda self, device=None: self

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _cpu_rng_state
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state
    logging.getLogger(mcore_random.__name__).addFilter(_DropCpuRngWarning())

    _CudaOnCpu().__enter__()  # stays active for the life of the process
    _applied = True


def is_applied() -> bool:
    return _applied
