"""Metric functions (lora.scoring.metrics): closed-form checks of FAD/KAD and their floor, signal
checks, loudness, librosa features and diversity, the CLAP path. Their intervals:
tests/scoring/test_intervals.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora.scoring import metrics
from tests.helpers import make_tiny_clap


# ------------------------------------------------------------------------------------ Fréchet
def test_frechet_distance_closed_form_diagonal():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_full_covariance_matches_reference_formula():
    rng = np.random.default_rng(1)
    d = 5
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # Reference: tr((s1 s2)^1/2) from the eigenvalues of s1 s2 (real, non-negative for SPD pairs).
    ev = np.linalg.eigvals(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(ev))
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    # symmetric in its arguments
    assert metrics.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-8)


def test_fad_identical_sets_is_zero_and_rank_deficient_is_stable():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 16))
    assert metrics.frechet_audio_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    # fewer samples than dimensions: singular covariances, still finite, non-negative, ~0 for
    # identical sets
    small = rng.normal(size=(5, 32))
    assert metrics.frechet_audio_distance(small, small) == pytest.approx(0.0, abs=1e-6)
    shifted = metrics.frechet_audio_distance(x, x + 2.0)
    assert shifted == pytest.approx(16 * 4.0, rel=1e-6)


# ------------------------------------------------------------------------------------ KAD
@pytest.mark.parametrize("kernel", ["rbf", "poly"])
def test_kad_same_distribution_near_zero_shifted_clearly_positive(kernel):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same = metrics.kernel_audio_distance(x, y, kernel=kernel)["value"]
    shifted = metrics.kernel_audio_distance(x + 1.0, y, kernel=kernel)["value"]
    # Noise of the unbiased estimator: spread of the statistic over independent same-distribution
    # draws.
    null = [metrics.kernel_audio_distance(rng.normal(size=(400, 8)), rng.normal(size=(400, 8)),
                                          kernel=kernel)["value"]
            for _ in range(5)]
    noise = max(abs(v) for v in null) + 1e-12
    assert abs(same) < 5 * noise
    assert shifted > 50 * noise
    assert shifted > 0


def test_kad_unbiased_matches_direct_definition():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(9, 3)) + 0.5
    h = 1.3
    k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * h * h))  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
    xy = sum(k(a, b) for a in x for b in y) / (7 * 9)
    got = metrics.kernel_audio_distance(x, y, bandwidth=h)
    assert got["value"] == pytest.approx(metrics.KAD_SCALE * (xx + yy - 2 * xy), rel=1e-10)
    assert got["n_x"] == 7 and got["n_y"] == 9


# ------------------------------------------------------------------------------------ distances vs their floor
def _tone_clip(rng, f0, seconds=1.0, sr=16000):
    t = np.arange(int(seconds * sr)) / sr
    x = sum(0.3 / k * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi)) for k in (1, 2, 3))
    return (x + 0.003 * rng.normal(size=t.size)).astype(np.float32)


def test_fad_kad_reference_halves_near_floor_noise_and_shifted_tone_far_above():
    """What evaluate does (loudness-normalised clips, librosa frame features standardised on the
    reference): a reference set against itself is 0, a disjoint half of it against the other half is
    the floor, and noise or the same tones three octaves up are at least 10x above that floor."""
    rng = np.random.default_rng(0)
    sr = 16000

    def feats(wavs):
        return [metrics.librosa_frame_features(metrics.loudness_normalize(w, sr), sr) for w in wavs]

    ref = feats([_tone_clip(rng, f) for f in rng.uniform(200, 400, size=24)])
    noise = feats([(0.1 * rng.normal(size=sr)).astype(np.float32) for _ in range(12)])
    shifted = feats([_tone_clip(rng, 8 * f) for f in rng.uniform(200, 400, size=12)])
    z = metrics.standardizer(np.concatenate(ref))
    cat = lambda clips: z(np.concatenate(clips))  # noqa: E731
    y, half_a, half_b = cat(ref), cat(ref[0::2]), cat(ref[1::2])
    assert metrics.frechet_audio_distance(y, y) == pytest.approx(0.0, abs=1e-6)
    fad_floor = metrics.frechet_audio_distance(half_a, half_b)
    kad_floor = abs(metrics.kernel_audio_distance(half_a, half_b)["value"])
    for far in (cat(noise), cat(shifted)):
        assert metrics.frechet_audio_distance(far, y) > 10 * fad_floor
        assert metrics.kernel_audio_distance(far, y)["value"] > 10 * kad_floor
        # half vs whole too
        assert metrics.frechet_audio_distance(far, y) > 10 * metrics.frechet_audio_distance(half_a, y)


# ------------------------------------------------------------------------------------ signal checks
SR = 16000


def _tone(seconds=2.0, amp=0.3, f=440.0):
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * f * t)).astype(np.float32)


def test_signal_checks_pass_clean_tone():
    r = metrics.signal_checks(_tone(), SR)
    assert r["failures"] == []
    assert r["peak"] == pytest.approx(0.3, abs=1e-3)
    assert r["rms_dbfs"] == pytest.approx(20 * np.log10(0.3 / np.sqrt(2)), abs=0.05)
    assert np.isfinite(r["lufs"]) and r["trailing_silence_s"] == 0.0
    assert r["spectral_flatness"] < 0.05  # tonal


@pytest.mark.parametrize("plant,failure", [
    ("silence", "silent"), ("clip", "clipping"), ("nan", "non_finite"), ("inf", "non_finite"),
    ("dc", "dc_offset"), ("tail", "mostly_silent"),
])
def test_signal_checks_flag_planted_defects(plant, failure):
    x = _tone()
    if plant == "silence":
        x = np.zeros_like(x)
    elif plant == "clip":
        x = np.clip(4 * x, -1, 1)
    elif plant == "nan":
        x[100] = np.nan
    elif plant == "inf":
        x[5] = np.inf
    elif plant == "dc":
        x = x + 0.2
    elif plant == "tail":
        x[int(0.3 * len(x)):] = 0
    r = metrics.signal_checks(x, SR)
    assert failure in r["failures"]
    if plant == "tail":
        assert r["trailing_silence_s"] == pytest.approx(1.4, abs=0.06)
    summary = metrics.summarize_checks([r, metrics.signal_checks(_tone(), SR)])
    assert summary["n"] == 2 and summary["n_failed"] == 1
    assert summary["failure_rates"][failure] == 0.5


def test_loudness_normalize_hits_target_and_keeps_shape():
    x = np.stack([_tone(amp=0.05), _tone(amp=0.05, f=220)])
    y = metrics.loudness_normalize(x, SR, target_lufs=-23.0)
    assert y.shape == x.shape and y.dtype == np.float32
    assert metrics.integrated_loudness(y, SR) == pytest.approx(-23.0, abs=0.1)
    loud = metrics.loudness_normalize(_tone(amp=0.001), SR, target_lufs=-1.0)
    assert np.max(np.abs(loud)) <= 0.99 + 1e-6  # peak guard
    silent = metrics.loudness_normalize(np.zeros(SR), SR)
    assert not np.any(silent)


def test_librosa_features_and_diversity():
    f = metrics.librosa_frame_features(_tone(), SR)
    assert f.shape[1] == 64 + 20 + 12 and f.shape[0] > 50 and np.all(np.isfinite(f))
    # chroma of A440 peaks at pitch class A (index 9)
    assert np.argmax(f[:, 84:].mean(0)) == 9
    assert metrics.clip_statistics(f).shape == (2 * f.shape[1],)
    rng = np.random.default_rng(0)
    protos = rng.normal(size=(3, 10))
    emb = np.stack([protos[p] + 0.01 * rng.normal(size=10) for p in range(3) for _ in range(2)])
    d = metrics.diversity(emb, prompt_ids=[0, 0, 1, 1, 2, 2], seed_ids=[0, 1, 0, 1, 0, 1])
    # collapse across seeds is visible
    assert d["across_prompts"] > 0.3 and d["across_seeds"] < 0.01


# ------------------------------------------------------------------------------------ CLAP
def test_clap_windows_resample_and_fixed_length():
    x = _tone(seconds=23.0)
    w = metrics.clap_windows(x, SR)
    assert [len(v) for v in w] == [480000, 480000]  # 3 s tail (< half a window) dropped
    w = metrics.clap_windows(_tone(seconds=26.0), SR)
    # the 6 s tail kept at its length (the CLAP processor repeat-pads it)
    assert [len(v) for v in w] == [480000, 480000, 6 * 48000]
    short = metrics.clap_windows(_tone(seconds=2.0), SR)
    assert [len(v) for v in short] == [96000]
    # resampled, not repeated: still a 440 Hz tone at 48 kHz
    spec = np.abs(np.fft.rfft(short[0][:96000]))
    assert np.fft.rfftfreq(96000, 1 / 48000)[np.argmax(spec)] == pytest.approx(440, abs=1)


def test_clap_scores_with_tiny_local_model(tmp_path):
    from transformers import ClapModel, ClapProcessor

    d = make_tiny_clap(tmp_path / "clap")
    model, proc = ClapModel.from_pretrained(d), ClapProcessor.from_pretrained(d)
    rng = np.random.default_rng(0)
    wavs = [0.1 * rng.normal(size=SR * 3).astype(np.float32) for _ in range(2)] + [_tone(seconds=12.0)]
    # the last one is longer than the text encoder
    texts = ["lofi piano", "trap drums", "ambient pad " * 60]
    r = metrics.clap_scores(model, proc, texts, wavs, SR)
    assert r["n"] == 3 and len(r["scores"]) == 3
    assert all(-1.0 <= s <= 1.0 for s in r["scores"])
    assert r["mean"] == pytest.approx(np.mean(r["scores"]))
    assert r["shuffled_mean"] is not None and np.isfinite(r["shuffled_mean"])
    # the score is the cosine of the model's own embeddings for a single 10 s window
    import torch.nn.functional as F

    with torch.no_grad():
        t = proc(text=["lofi piano"], return_tensors="pt", padding=True)
        te = F.normalize(metrics._features(model.get_text_features(**t)), dim=-1)
        win = metrics.clap_windows(wavs[0], SR)
        a = proc.feature_extractor(list(win), sampling_rate=48000, return_tensors="pt",
                                   truncation="rand_trunc")
        ae = F.normalize(metrics._features(model.get_audio_features(**a)), dim=-1)[0]
    assert r["scores"][0] == pytest.approx(float(te[0] @ ae), abs=1e-5)
