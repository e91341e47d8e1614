"""CLAP sees a generated clip shorter than its 10-s window the way CLAP was trained and the way
laion_clap and audiocraft's CLAP metric feed it: the feature extractor's ``repeatpad`` (the clip
repeated as many whole times as fit, then silence), not silence alone
(lora.scoring.metrics.clap_windows / clap_scores). For an 8-s clip repeatpad fits one copy, so it
carries 2 s of silence in the reference too; a 3-s clip is repeated three times."""

from __future__ import annotations

import numpy as np
import pytest
import torch

SR = 32000


def _clip(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * 440 * t) * (1 + np.sin(2 * np.pi * 0.7 * t))).astype(np.float32)


def test_a_short_clip_is_repeat_padded_as_clap_s_own_processing_not_padded_with_silence(tmp_path):
    import torch.nn.functional as F
    from transformers import ClapModel, ClapProcessor

    from lora.scoring import metrics
    from tests.helpers import make_tiny_clap

    d = make_tiny_clap(tmp_path / "clap")
    model, proc = ClapModel.from_pretrained(d).eval(), ClapProcessor.from_pretrained(d)
    clip = _clip(3.0)
    wins = metrics.clap_windows(clip, SR)
    assert [len(w) for w in wins] == [3 * 48000]  # the clip itself, resampled: no silence appended
    score = metrics.clap_scores(model, proc, ["lofi piano"], [clip], SR)["scores"][0]

    def cosine(audio_windows):
        with torch.no_grad():
            t = F.normalize(metrics._features(model.get_text_features(
                **proc(text=["lofi piano"], return_tensors="pt", padding=True))), dim=-1)[0]
            a = proc.feature_extractor(audio_windows, sampling_rate=48000, return_tensors="pt",
                                       truncation="rand_trunc", padding="repeatpad")
            e = F.normalize(metrics._features(model.get_audio_features(**a)), dim=-1)[0]
        return float(t @ e)

    resampled = wins[0]
    repeated = np.pad(np.tile(resampled, 3), (0, 48000))  # laion_clap's repeatpad: 3 copies + 1 s
    assert score == pytest.approx(cosine([repeated]), abs=1e-5)
    silence = np.pad(resampled, (0, 7 * 48000))  # the clip then 7 s of silence
    assert abs(score - cosine([silence])) > 1e-4
