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


def test_dying_twice_during_start_up_stops(tmp_path):
    """A failure before step 1 (an OOM while loading, a crash building the model) is recorded as start-up;
    twice in a row stops the run."""
    Attempt(tmp_path, enabled=True)  # dies during start-up: no step begun
    second = Attempt(tmp_path, enabled=True)
    assert second.failed_before == 0
    with pytest.raises(RepeatedFailure, match="start-up failed in two attempts in a row"):
        Attempt(tmp_path, enabled=True)


def test_fatal_errors_are_honoured_in_their_own_launch_only(tmp_path, monkeypatch):
    from megaprolong.runtime.attempts import fatal_error, record_fatal, requeue_verdict

    monkeypatch.setenv("SLURM_JOB_ID", "41")
    record_fatal(tmp_path, "domain web: weight 0 must be > 0")
    assert fatal_error(tmp_path) == "domain web: weight 0 must be > 0"
    assert main([str(tmp_path)]) == 1
    assert requeue_verdict(tmp_path, 3) == (False, "domain web: weight 0 must be > 0")
    monkeypatch.setenv("SLURM_JOB_ID", "42")  # the user fixed the data and resubmitted
    assert fatal_error(tmp_path) is None and main([str(tmp_path)]) == 0
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert fatal_error(tmp_path) is None  # a plain process has no launch to honour it in


def test_requeue_budget_counts_failures_without_progress(tmp_path, monkeypatch):
    """Preemption requeues never reach the verdict; failure requeues count until the run gets past the step
    that failed, then the count starts again."""
    from megaprolong.runtime.attempts import requeue_verdict

    monkeypatch.setenv("SLURM_RESTART_COUNT", "7")  # many time-limit requeues before: irrelevant
    a = Attempt(tmp_path, enabled=True)
    a.step_starts(120)
    assert requeue_verdict(tmp_path, 2)[0]  # failure 1 at step 120
    a = Attempt(tmp_path, enabled=True)
    a.step_starts(118)  # resumed from 110's checkpoint, died again before passing 120
    allowed, why = requeue_verdict(tmp_path, 2)
    assert allowed and "2 of 2" in why
    a = Attempt(tmp_path, enabled=True)
    a.step_starts(120)
    allowed, why = requeue_verdict(tmp_path, 2)
    assert not allowed and "MAX_REQUEUES=2" in why and main([str(tmp_path), "--requeue", "2"]) == 1
    a = Attempt(tmp_path, enabled=True)
    a.step_starts(121)  # progress: the budget is whole again
    allowed, why = requeue_verdict(tmp_path, 2)
    assert allowed and "1 of 2" in why
