"""The summary's verdicts are wrong at most 5% of the time when nothing differs
(lora.scoring.verdicts): simulated evaluations run through the evaluation's own functions
(lora.scoring.null_simulation), at the default prompt and seed counts and with few recordings;
bench/bench_verdicts.py runs the long simulation (BENCHMARKS.md, "Evaluation verdicts")."""

from __future__ import annotations

import math

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from lora.scoring import null_simulation as ns
from lora.scoring import verdicts


def _bound(n: int, alpha: float = verdicts.ALPHA) -> float:
    """alpha plus two Monte-Carlo standard errors of a share of n at alpha: what n simulations of a
    procedure whose true rate is at most alpha stay under (the bench runs 2000 per scenario)."""
    return alpha + 2 * math.sqrt(alpha * (1 - alpha) / n)


@pytest.fixture(autouse=True)
def one_blas_thread():
    with threadpool_limits(1):  # small matrices: threads only contend on a shared CPU
        yield


# --------------------------------------------------------------------------------------------
# The pieces
# --------------------------------------------------------------------------------------------
def test_units_merge_items_that_share_a_key():
    keys = [[("prompt", "a")], [("prompt", "a")], [("prompt", "b"), ("melody", "x")],
            [("prompt", "c"), ("melody", "x")], [None], [("prompt", "d")]]
    assert verdicts.unit_ids(keys).tolist() == [0, 0, 1, 1, 2, 3]


def test_minimum_units_is_where_a_sign_flip_test_can_reach_alpha():
    assert verdicts.min_units(0.05) == 6 and verdicts.min_units(0.025) == 7
    for n in range(1, 12):
        patterns, exact = verdicts.sign_patterns(n, 10 ** 6)
        assert exact and len(patterns) == 2 ** (n - 1) and (patterns[0] == 1).all()
        assert len({tuple(p) for p in patterns}) == len(patterns)
        # the smallest p: only the observed labelling reaches the largest |statistic|
        stat = verdicts.paired_statistics(np.zeros(n), np.ones(n), np.arange(n), patterns)
        assert verdicts.p_value(stat) == pytest.approx(2.0 ** -(n - 1))
        assert (verdicts.p_value(stat) <= 0.05) == (n >= verdicts.min_units(0.05))


def test_max_t_of_one_row_is_its_own_p_and_grows_with_more_rows():
    rng = np.random.default_rng(0)
    patterns, _ = verdicts.sign_patterns(9, 10 ** 6)
    d = rng.normal(0.8, 1.0, size=9)
    one = verdicts.paired_statistics(np.zeros(9), d, np.arange(9), patterns)
    assert verdicts.max_t({"a": one})["a"] == pytest.approx(verdicts.p_value(one))
    noise = {f"n{i}": verdicts.paired_statistics(np.zeros(9), rng.normal(size=9), np.arange(9), patterns)
             for i in range(5)}
    assert verdicts.max_t({"a": one, **noise})["a"] >= verdicts.p_value(one)
    # a copy of a row (FAD and KAD move together) costs nothing
    assert verdicts.max_t({"a": one, "b": one})["a"] == pytest.approx(verdicts.p_value(one))


def test_the_verdict_says_how_many_more_units_it_needs():
    assert verdicts.verdict(-0.5, 0.001, 3, 0.025, True, "recording") == \
        "too few recordings: needs 7 (4 more)"
    assert verdicts.verdict(-0.5, 0.02, 7, 0.025, True, "recording") == "LoRA"
    assert verdicts.verdict(-0.5, 0.03, 7, 0.025, True, "recording") == "unclear"
    assert verdicts.verdict(0.2, 0.01, 8, 0.025, False, "prompt") == "LoRA"  # higher is better
    assert verdicts.verdict(0.2, 0.01, 8, 0.025, True, "prompt") == "base"


# --------------------------------------------------------------------------------------------
# Simulated evaluations
# --------------------------------------------------------------------------------------------
@pytest.mark.slow  # (over ~2 s: the full suite runs it, the fast loop leaves it out)
def test_no_true_difference_names_a_winner_at_most_5_percent_at_the_defaults():
    """8 prompts x 2 seeds whose clips correlate at 0.8 within a prompt, 10 held-out recordings of
    3 clips, CLAP: nine rows with a verdict. bench/bench_verdicts.py: 2000 evaluations."""
    r = ns.run(ns.Scenario(), 120, seed=7)
    assert len(r["rows_with_a_verdict"]) == 9
    assert r["any_winner"] <= _bound(120), r


def test_few_recordings_name_no_winner_and_say_how_many_they_need():
    """The held-out likelihood alone (--skip_generation: its test gets the whole 5%): 2-5 recordings
    can never name a winner and say so; 6 and 10 name one at most 5% of the time."""
    for n_rec in (2, 3, 5):
        rows = ns.simulate(ns.Scenario(recordings=n_rec, generation=False, effect=3.0), 0)
        ce = rows[0]
        assert ce["metric"] == "held-out cross-entropy (nats)" and ce["delta"] < 0
        assert ce["better"] == f"too few recordings: needs 6 ({6 - n_rec} more)" == rows[1]["better"]
    for n_rec in (6, 10):
        r = ns.run(ns.Scenario(recordings=n_rec, generation=False), 400, seed=n_rec)
        assert r["any_winner"] <= _bound(400), (n_rec, r)
    # beside the generated-audio rows the likelihood has 2.5%: 7 recordings at least
    rows = ns.simulate(ns.Scenario(recordings=2), 0)
    assert rows[0]["better"] == "too few recordings: needs 7 (5 more)"


def test_treating_clips_as_independent_names_too_many_winners():
    """The check can fail: the same test with every held-out clip as its own unit (clips of a
    recording correlate at 0.8) names a winner far more often than 5%."""
    r = ns.run(ns.Scenario(recordings=10, generation=False, units="clip/pair"), 400, seed=3)
    assert r["any_winner"] > 0.12, r


def test_a_true_difference_is_found_and_the_right_model_named():
    r = ns.run(ns.Scenario(effect=1.0), 20, seed=5)
    assert r["lora_named"] >= 0.6 and r["lora_named"] == r["any_winner"], r
