"""The attempt record: a failure that repeats at the same step stops the run; anything else restarts."""

import pytest

from megaprolong.runtime.attempts import Attempt, RepeatedFailure, main, repeated_failure


def test_same_step_twice_stops_other_failures_do_not(tmp_path, capsys):
    first = Attempt(tmp_path, enabled=True)
    for step in (1, 2, 3):
        first.step_starts(step)
    # killed during step 3 (no record of its end): the next attempt may run
    second = Attempt(tmp_path, enabled=True)
    assert second.failed_before == 3 and repeated_failure(tmp_path) is None
    for step in (2, 3, 4):  # resumed from step 1's checkpoint, passes step 3, dies in step 4
        second.step_starts(step)
    third = Attempt(tmp_path, enabled=True)
    assert third.failed_before == 4
    for step in (3, 4):
        third.step_starts(step)
    third.failed(4, ValueError("bad batch"))  # step 4 again
    reason = repeated_failure(tmp_path)
    assert reason and "step 4" in reason and "ValueError: bad batch" in reason
    with pytest.raises(RepeatedFailure, match="step 4"):
        Attempt(tmp_path, enabled=True)
    assert main([str(tmp_path)]) == 1 and "step 4" in capsys.readouterr().out


def test_a_run_that_ended_by_itself_is_clean(tmp_path):
    a = Attempt(tmp_path, enabled=True)
    a.step_starts(5)
    a.ended()
    assert Attempt(tmp_path, enabled=True).failed_before is None and main([str(tmp_path)]) == 0
    assert Attempt(tmp_path / "other", enabled=False).folder is None  # other ranks record nothing


def test_start_attempt_records_on_rank_0_only_and_refuses_a_repeat(tmp_path):
    from megaprolong.runtime.attempts import start_attempt

    assert start_attempt(tmp_path, rank0=False).folder is None
    a = start_attempt(tmp_path, rank0=True)
    a.step_starts(2)
    b = start_attempt(tmp_path, rank0=True)
    b.step_starts(2)
    with pytest.raises(RepeatedFailure, match="step 2"):
        start_attempt(tmp_path, rank0=True)
