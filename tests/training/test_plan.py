"""The training plan (lora.training.plan): steps and the capped warm-up, when a run validates and
checkpoints (eval_steps / save_steps auto: about ten times a run) and the save_minutes timer."""

from __future__ import annotations


def test_warmup_is_capped_on_short_runs():
    from lora.config import Config
    from lora.training.plan import plan_steps

    cfg = Config()
    cfg.training.num_epochs = 5
    spe, total, warmup, note = plan_steps(cfg, n_batches=24, group=4)
    assert (spe, total, warmup) == (6, 30, 3) and "capped" in note
    cfg.training.max_steps = 5000
    assert plan_steps(cfg, 24, 4)[1:3] == (5000, 100)


# ------------------------------------------------------------------------------------------------
# When the run validates and checkpoints: eval_steps / save_steps auto, save_minutes
# ------------------------------------------------------------------------------------------------
def test_auto_cadence_is_about_ten_per_run():
    from lora.training import plan

    for total in (60, 300):  # ~90 and ~450 clips at the seed's batch 2 x 4 x 5 epochs
        every = plan.auto_interval(total)
        assert len(plan.events_in_run(every, total)) == 10, total
    for total in range(30, 5001):
        n = len(plan.events_in_run(plan.auto_interval(total), total))
        assert 8 <= n <= 13, (total, n)
    # the quick start: steps 10, 20, ..., 90 (30, 60, 90 as before)
    assert plan.auto_interval(90) == 10
    assert plan.events_in_run(7, 20) == [7, 14, 20]  # the last step always
    # An explicit number keeps its meaning (the seed's runs: validations at 100, 200 and the end).
    assert plan.resolve_every("100", 285) == (100, False)
    assert plan.resolve_every("auto", 285) == (30, True)


def test_save_timer_is_due_after_its_minutes():
    from lora.training.plan import SaveTimer

    now = [100.0]
    timer = SaveTimer(2.0, clock=lambda: now[0])
    now[0] += 119
    assert not timer.due()
    now[0] += 1
    assert timer.due()
    timer.reset()
    assert not timer.due()
    now[0] += 1e6
    assert not SaveTimer(0.0, clock=lambda: now[0]).due()  # 0 = off
