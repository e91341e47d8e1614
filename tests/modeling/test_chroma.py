"""The melody's chroma (lora.modeling.chroma), against librosa and transformers' MusicGen-Melody
feature extractor: one-hot pitch classes that follow a tune, cut at 30 seconds, and the chroma
similarity evaluate reports."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import SR, tones, tune_chroma


def test_chroma_of_a_440_hz_sine_lights_bin_a_in_every_frame():
    from lora.modeling import chroma as C

    ch = C.chroma(tones([440.0], 4.0), SR)
    assert ch.shape == (C.frames(4 * SR), 12) == (32, 12)
    assert set(C.dominant_pitch_classes(ch)) == {"A"}
    assert torch.equal(ch.sum(dim=-1), torch.ones(32))  # one-hot


def test_chroma_follows_a_tune_and_is_cut_at_30_seconds():
    from lora.modeling import chroma as C

    names = C.dominant_pitch_classes(tune_chroma(6.0))
    # 7.8125 frames/s, 2 s per note: frames well inside each note carry it (window edges may mix two
    # notes)
    assert names[2:14] == ["A"] * 12 and names[18:29] == ["C"] * 11 and names[34:45] == ["E"] * 11
    # chroma_length of the released models
    assert C.chroma(tones([440.0], 31.0), SR).shape[0] == 235


def test_chroma_equals_an_independent_librosa_computation():
    """librosa's STFT (centred, reflect padding, periodic Hann) and librosa's own chroma filter
    bank, then the argmax: the same frames as lora.modeling.chroma (which uses torch.stft and
    transformers' port of the bank)."""
    librosa = pytest.importorskip("librosa")
    from lora.modeling import chroma as C

    rng = np.random.default_rng(0)
    wav = (tones([196.0, 246.94, 293.66], 5.0) + 0.05 * rng.standard_normal(5 * SR)).astype(np.float32)
    spec = np.abs(librosa.stft(wav, n_fft=C.N_FFT, hop_length=C.HOP, win_length=C.N_FFT, window="hann",
                               center=True, pad_mode="reflect")) ** 2
    bank = librosa.filters.chroma(sr=SR, n_fft=C.N_FFT, tuning=0.0, n_chroma=12)
    expected = (bank @ spec).T
    raw = C.raw_chroma(wav, SR).double().numpy()
    assert raw.shape == expected.shape == (C.frames(5 * SR), 12)
    # energies frame by frame, each frame scaled by its max (the extractor's normalisation), then
    # the one-hot
    np.testing.assert_allclose(raw / raw.max(axis=1, keepdims=True), expected
                               / expected.max(axis=1, keepdims=True), rtol=1e-4, atol=1e-6)
    assert np.array_equal(C.chroma(wav, SR).argmax(dim=-1).numpy(), expected.argmax(axis=1))


def test_chroma_matches_transformers_feature_extractor_when_torchaudio_is_there():
    pytest.importorskip("torchaudio")
    from transformers import MusicgenMelodyFeatureExtractor

    from lora.modeling import chroma as C

    wav = tones([220.0, 277.18], 4.0)
    ref = MusicgenMelodyFeatureExtractor()(wav, sampling_rate=SR, return_tensors="pt").input_features[0]
    assert torch.equal(C.chroma(wav, SR), ref)


def test_chroma_similarity_is_one_for_the_same_tune_and_low_for_another():
    from lora.modeling import chroma as C

    a = C.chroma(tones([440.0], 3.0), SR)
    assert C.cosine_similarity(a, a) == 1.0
    # D# vs A: no frame agrees
    assert C.cosine_similarity(a, C.chroma(tones([311.13], 3.0), SR)) == 0.0
    half = torch.cat([a[:12], C.chroma(tones([311.13], 3.0), SR)[12:]])
    assert C.cosine_similarity(half, a) == pytest.approx(12 / a.shape[0])
