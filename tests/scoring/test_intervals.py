"""The bootstrap intervals behind every verdict (lora.scoring.intervals): the paired bootstrap
covers a known difference at its nominal rate, the cluster bootstrap resamples recordings (and widens
by sqrt(clips per recording)), and the set-distance bootstrap equals the distance of each
resample."""

from __future__ import annotations

import numpy as np
import pytest

from lora.scoring import intervals, metrics


# ------------------------------------------------------------------------------------ bootstrap
def test_paired_bootstrap_covers_known_difference():
    rng = np.random.default_rng(5)
    n = 60
    # large between-clip spread: pairing is what makes it detectable
    base = rng.normal(5.0, 1.0, size=n)
    lora = base - 0.3 + rng.normal(0, 0.2, size=n)
    r = intervals.paired_bootstrap_ci(base, lora, n_boot=3000, seed=1)
    assert r["n"] == n and r["n_boot"] == 3000
    assert r["ci_low"] < -0.3 < r["ci_high"]
    assert r["ci_high"] < 0  # excludes zero
    assert r["diff"] == pytest.approx(np.mean(lora - base))
    assert r["p_two_sided"] < 0.01


def test_paired_bootstrap_coverage_rate_and_weights():
    rng = np.random.default_rng(6)
    hits = 0
    reps = 200
    for i in range(reps):
        base = rng.normal(0, 1, size=25)
        other = base + 0.1 + rng.normal(0, 0.5, size=25)
        r = intervals.paired_bootstrap_ci(base, other, n_boot=400, seed=i)
        hits += r["ci_low"] <= 0.1 <= r["ci_high"]
    # nominal 95 % (percentile bootstrap is a bit narrow at n=25)
    assert 0.85 <= hits / reps <= 0.99
    # weighted: the estimate is the token-weighted mean difference
    w = np.array([1, 3, 6.0])
    r = intervals.paired_bootstrap_ci([1, 1, 1], [2, 1, 0], weights=w, n_boot=100)
    assert r["diff"] == pytest.approx((1 * 1 + 3 * 0 + 6 * -1) / 10)
    with pytest.raises(ValueError):
        intervals.paired_bootstrap_ci([1, 2], [1, 2, 3])


def test_cluster_bootstrap_widens_by_sqrt_clips_per_recording_and_covers():
    """Clips cut from one recording share that recording's effect on the difference. Resampling
    clips treats 120 correlated clips as independent: the interval is too narrow by ~sqrt(4) and
    misses the true difference far more often than 5 %. Resampling recordings (the cluster
    bootstrap) is wider by ~sqrt(clips per recording) and covers at about the nominal rate."""
    rng = np.random.default_rng(7)
    n_rec, per_rec, true_diff, reps = 30, 4, -0.2, 200
    recording = np.repeat(np.arange(n_rec), per_rec)
    ratios, hits_cluster, hits_clip = [], 0, 0
    for i in range(reps):
        base = rng.normal(5.0, 1.0, size=n_rec * per_rec)
        # the recording's own difference
        effect = np.repeat(rng.normal(0.0, 0.5, size=n_rec), per_rec)
        other = base + true_diff + effect + rng.normal(0.0, 0.05, size=base.size)
        tokens = rng.integers(100, 200, size=base.size)
        c = intervals.paired_bootstrap_ci(base, other, tokens,
                                          clusters=[f"song{r}" for r in recording], n_boot=500, seed=i)
        p = intervals.paired_bootstrap_ci(base, other, tokens, n_boot=500, seed=i)
        assert c["n"] == p["n"] == 120 and c["n_clusters"] == 30 and p["n_clusters"] == 120
        # the token-weighted estimate is the same; only its spread
        assert c["diff"] == pytest.approx(p["diff"])
        ratios.append((c["ci_high"] - c["ci_low"]) / (p["ci_high"] - p["ci_low"]))
        hits_cluster += c["ci_low"] <= true_diff <= c["ci_high"]
        hits_clip += p["ci_low"] <= true_diff <= p["ci_high"]
    assert np.median(ratios) == pytest.approx(np.sqrt(per_rec), rel=0.15)
    # nominal 95 % (percentile bootstrap: a bit narrow at 30 recordings)
    assert 0.88 <= hits_cluster / reps <= 0.99
    assert hits_clip / reps < 0.80  # the clip bootstrap overstates: ~68 % at a design effect of ~4


def test_cluster_bootstrap_one_clip_per_recording_is_the_clip_bootstrap():
    rng = np.random.default_rng(8)
    base = rng.normal(size=40)
    other = base - 0.1 + rng.normal(0, 0.3, size=40)
    w = rng.integers(50, 100, size=40)
    plain = intervals.paired_bootstrap_ci(base, other, w, n_boot=800, seed=3)
    own = intervals.paired_bootstrap_ci(base, other, w, clusters=[f"rec{i}" for i in range(40)],
                                        n_boot=800, seed=3)
    assert own == plain  # same draws, same interval
    unnamed = intervals.paired_bootstrap_ci(base, other, w, clusters=[None] * 40, n_boot=800, seed=3)
    assert unnamed == plain  # a clip without a source is a recording of its own
    # one recording: every resample is that recording, the interval has no width (the report names
    # no winner)
    one = intervals.paired_bootstrap_ci(base, other, w, clusters=["album/track"] * 40, n_boot=200)
    assert one["n_clusters"] == 1 and one["ci_low"] == pytest.approx(one["ci_high"])
    with pytest.raises(ValueError):
        intervals.paired_bootstrap_ci(base, other, clusters=["a"] * 39)


# ------------------------------------------------------------------------------------ set-distance bootstrap
def test_set_distance_bootstrap_equals_the_distance_of_each_resample():
    """frechet_bootstrap / kernel_bootstrap give, per resample (multiplicities of clips), the FAD /
    KAD of the concatenated frames of that resample (for KAD without pairs of a frame with its own
    copy)."""
    rng = np.random.default_rng(1)
    clips = [rng.normal(0.2 * i, 1.0, size=(30, 5)) for i in range(6)]
    ref = rng.normal(size=(200, 5))
    ones = np.ones((1, 6))
    x = np.concatenate(clips)
    assert intervals.frechet_bootstrap(clips, ref,
                                       ones)[0] == pytest.approx(metrics.frechet_audio_distance(x,
                                                                                                ref), rel=1e-8)
    for kernel in ("rbf", "poly"):
        got = intervals.kernel_bootstrap(clips, ref, ones, kernel=kernel, max_rows=120)[0]
        want = metrics.kernel_audio_distance(metrics.subsample_rows(x, 120),
                                             metrics.subsample_rows(ref, 120), kernel=kernel)["value"]
        assert got == pytest.approx(want, rel=1e-8)
    counts = intervals.bootstrap_counts(6, 50, seed=2)
    assert counts.shape == (50, 6) and np.all(counts.sum(axis=1) == 6)
    row = counts[0]
    drawn = np.concatenate([clips[i] for i in range(6) for _ in range(row[i])])
    assert intervals.frechet_bootstrap(clips, ref,
                                       counts[:1])[0] == pytest.approx(metrics.frechet_audio_distance(drawn, ref),
                                                                           rel=1e-8)
    # KAD of the resample: the unbiased estimate over the drawn frames, pairs of a frame with itself
    # left out
    h = metrics.median_pairwise_distance(ref)
    k = lambda a, b: np.exp(-metrics._sq_dists(a, b) / (2 * h * h))  # noqa: E731
    owner = np.concatenate([np.full(30 * row[i], i) for i in range(6)])
    frame = np.concatenate([np.tile(np.arange(30), row[i]) for i in range(6)])
    same = (owner[:, None] == owner[None]) & (frame[:, None] == frame[None])
    kyy = k(ref, ref)
    want = (k(drawn, drawn)[~same].mean() + (kyy.sum() - np.trace(kyy)) / (200 * 199) - 2
            * k(drawn, ref).mean())
    assert intervals.kernel_bootstrap(clips, ref, counts[:1])[0] == pytest.approx(metrics.KAD_SCALE
                                                                                  * want, rel=1e-8)
