"""Metrics: closed-form checks of FAD/KAD, bootstrap coverage, signal checks, CE against
transformers, CLAP path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora.scoring import intervals, metrics


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


def make_tiny_clap(directory):
    """A tiny random CLAP model + processor saved with save_pretrained (what a user's local folder
    looks like)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizerFast
    from transformers.models.clap.configuration_clap import ClapAudioConfig, ClapTextConfig

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["lofi piano beat", "hip hop 808 trap drums", "ambient synth pad"],
                            trainers.BpeTrainer(vocab_size=300,
                                                special_tokens=["<s>", "<pad>", "</s>", "<unk>",
                                                                "<mask>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    rt = RobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                              unk_token="<unk>", mask_token="<mask>")
    tc = ClapTextConfig(vocab_size=len(rt), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2, projection_dim=16)
    ac = ClapAudioConfig(num_mel_bins=64, window_size=8, spec_size=256, patch_size=4,
                         patch_stride=4, hidden_size=32,
                         patch_embeds_hidden_size=16, projection_dim=16, depths=[1, 1],
                         num_attention_heads=[2, 2], intermediate_size=37)
    torch.manual_seed(0)
    model = ClapModel(ClapConfig(text_config=tc.to_dict(), audio_config=ac.to_dict(), projection_dim=16))
    proc = ClapProcessor(feature_extractor=ClapFeatureExtractor(feature_size=64,
                                                                sampling_rate=48000, max_length_s=10),
                         tokenizer=rt)
    model.save_pretrained(directory)
    proc.save_pretrained(directory)
    return directory


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
