"""The CPU compatibility layer does what it says, and refuses to touch a CUDA machine."""

import subprocess
import sys

import pytest
import torch

CHECKS = r"""
import torch
from megaprolong.runtime import cpu_compat
cpu_compat.apply()
assert torch.empty(2, device="cuda").device.type == "cpu"
assert torch.zeros(2, device=torch.device("cuda", 0)).device.type == "cpu"
assert torch.ones(2).to("cuda").device.type == "cpu"
assert torch.ones(2).cuda().device.type == "cpu"
assert torch.nn.Linear(2, 2).cuda().weight.device.type == "cpu"
assert torch.ones(2, pin_memory=True).is_pinned() is False
assert torch.ones(2).type() == "torch.cuda.FloatTensor"
assert torch.ones(2).type(torch.float64).dtype == torch.float64   # type(dtype) still converts
torch.cuda.synchronize(); torch.cuda.current_stream().wait_stream(torch.cuda.default_stream())

# megatron's model-parallel RNG tracker forks and restores the (CPU) generator like the CUDA one
from megatron.core.tensor_parallel import random as r
torch.manual_seed(0)
r.get_cuda_rng_tracker().reset()
r.get_cuda_rng_tracker().add("model-parallel-rng", 123)
before = torch.get_rng_state()
with r.get_cuda_rng_tracker().fork():
    a = torch.rand(3)
assert torch.equal(torch.get_rng_state(), before), "fork must restore the default generator"
torch.manual_seed(123); b = torch.rand(3)
assert torch.equal(a, b), "the forked generator is seeded with the tracker's seed"
print("OK")
"""


def test_patches_in_fresh_process():
    out = subprocess.run([sys.executable, "-c", CHECKS], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK")


def test_refuses_on_cuda_machine(monkeypatch):
    from megaprolong.runtime import cpu_compat

    if cpu_compat.is_applied():
        pytest.skip("already applied in this process")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="only for CPU"):
        cpu_compat.apply()
    assert not cpu_compat.is_applied()


def test_device_selection_in_one_place(monkeypatch):
    """device() follows CUDA's availability and the current device, whatever this machine has."""
    from megaprolong.runtime import device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert device.device() == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.device() == torch.device("cpu")
