"""The LR schedule against ProLong's formula, written here independently of megatron-core's scheduler."""

import math

import pytest
import torch

from megaprolong.training.config import OptimizerConfig


def prolong_lr(step: int, steps: int, peak: float, warmup_fraction: float = 0.1, min_ratio: float = 0.1) -> float:
    """LR used for optimizer step ``step`` (0-based): linear from 0 over the warmup, then cosine to
    min_ratio * peak at ``steps``."""
    warmup = round(warmup_fraction * steps)
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / (steps - warmup)
    return peak * min_ratio + (peak - peak * min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def scheduled_lrs(o: OptimizerConfig, steps: int, start: int = 0, state=None) -> tuple[list[float], dict]:
    """The LR of each step from ``start`` (with the scheduler ``state`` saved at ``start``), and the state
    saved after 40 steps."""
    from megaprolong.training.trainer import lr_scheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=o.lr)
    scheduler = lr_scheduler(optimizer, o, steps)
    if state is not None:
        scheduler.load_state_dict(state)
    lrs = []
    for _ in range(start, steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(increment=1)
        if len(lrs) == 40:
            state = scheduler.state_dict()
    return lrs, state


@pytest.mark.parametrize("steps", [100, 5000])
def test_schedule_is_prolongs_formula(steps):
    o = OptimizerConfig()  # peak 1e-5, 10% warmup, cosine to 1e-6
    lrs, _ = scheduled_lrs(o, steps)
    for step in (0, 1, steps // 20, steps // 10 - 1, steps // 10, steps // 10 + 1, steps // 2, steps - 1):
        assert lrs[step] == pytest.approx(prolong_lr(step, steps, 1e-5), rel=1e-9, abs=1e-15), step
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(1e-5) and lrs[-1] > 1e-6


def test_schedule_after_resume_and_after_a_stage_start():
    o = OptimizerConfig()
    full, state = scheduled_lrs(o, 100)
    resumed, _ = scheduled_lrs(o, 100, start=40, state=state)  # a resume restores the scheduler's state
    assert resumed == pytest.approx(full[40:], rel=1e-12)
    stage2 = OptimizerConfig(lr=5e-6)  # a new stage: fresh schedule with its own peak, from step 0
    lrs, _ = scheduled_lrs(stage2, 50)
    assert lrs == pytest.approx([prolong_lr(s, 50, 5e-6) for s in range(50)], rel=1e-9, abs=1e-15)
