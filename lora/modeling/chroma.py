"""The melody condition of MusicGen-Melody: a 12-bin one-hot chroma, computed without torchaudio.

``MusicgenMelodyFeatureExtractor`` (transformers) needs torchaudio for one call, its
``Spectrogram``. This module computes the same features with ``torch.stft`` and transformers' own
``audio_utils.chroma_filter_bank``:

* a centred power spectrogram: n_fft = window = 16384, hop 4096 (7.8125 frames/s at 32 kHz),
  periodic Hann window, reflect padding, as torchaudio's ``Spectrogram(center=True)`` calls
  ``torch.stft``; audio shorter than one window is first zero-padded to it on both sides, as the
  extractor does;
* the chroma filter bank (librosa's, ported by transformers: tuning 0, Gaussian weighting around
  octave 5);
* per frame, the bin with the largest energy set to 1 and the others to 0 (the extractor's
  max-normalisation does not change the argmax; ties go to the first bin, as with ``torch.argmax``).

A frame whose window holds no energy (silence, or padding) has every bin 0 before the argmax, so it
becomes bin 0: the same vector as the model's null melody. ``frames(n)`` = 1 + n // hop for n >=
n_fft.

Input: float audio (N,) or (C, N) at the model's rate (channels are averaged, as the extractor does
with stereo), cut at ``max_seconds`` (30 s = ``chroma_length`` 235 frames for the released models).
Output: float32 (T, 12).
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np

N_FFT = 16384
HOP = 4096
NUM_CHROMA = 12
MAX_SECONDS = 30.0
# bin order (starts at C)
PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


@functools.lru_cache(maxsize=4)
def chroma_filters(sample_rate: int, n_fft: int = N_FFT, num_chroma: int = NUM_CHROMA):
    """(num_chroma, n_fft // 2 + 1) float32 torch tensor: the extractor's filter bank."""
    import torch
    from transformers.audio_utils import chroma_filter_bank

    bank = chroma_filter_bank(sampling_rate=sample_rate, num_frequency_bins=n_fft, tuning=0,
                              num_chroma=num_chroma)
    return torch.from_numpy(np.asarray(bank)).float()


def frames(n_samples: int, hop: int = HOP, n_fft: int = N_FFT) -> int:
    """Chroma frames of ``n_samples`` of audio (after the cut at max_seconds)."""
    return 1 + max(int(n_samples), n_fft) // hop


def power_spectrogram(wav, n_fft: int = N_FFT, hop: int = HOP):
    """(..., N) float audio -> (..., n_fft // 2 + 1, T) power spectrogram, as torchaudio's
    Spectrogram(power=2, center=True, pad_mode='reflect') computes it (up to a constant scale, which
    the argmax ignores)."""
    import torch

    x = torch.as_tensor(wav, dtype=torch.float32)
    n = x.shape[-1]
    if n < n_fft:  # the extractor's own padding of short inputs, before the STFT's centring
        pad = n_fft - n
        x = torch.nn.functional.pad(x, (pad // 2, pad // 2 + pad % 2))
    lead = x.shape[:-1]
    spec = torch.stft(x.reshape(-1, x.shape[-1]), n_fft=n_fft, hop_length=hop, win_length=n_fft,
                      window=torch.hann_window(n_fft), center=True, pad_mode="reflect",
                      return_complex=True)
    return spec.abs().pow(2).reshape(*lead, *spec.shape[-2:])


def raw_chroma(wav, sample_rate: int, max_seconds: Optional[float] = MAX_SECONDS):
    """Chroma energies (T, 12) float32 of one clip (N,) or (C, N) at ``sample_rate``, before the
    argmax (``max_seconds`` None: the whole clip)."""
    import torch

    x = torch.as_tensor(np.asarray(wav, dtype=np.float32))
    if x.dim() == 2:
        x = x.mean(dim=0)
    if x.dim() != 1:
        raise ValueError(f"chroma expects audio (N,) or (C, N), got shape {tuple(x.shape)}")
    if max_seconds is not None:
        x = x[: int(round(max_seconds * sample_rate))]
    return (chroma_filters(sample_rate) @ power_spectrogram(x)).T


def chroma(wav, sample_rate: int, max_seconds: Optional[float] = MAX_SECONDS):
    """One-hot chroma (T, 12) float32 torch tensor of one clip (N,) or (C, N) at ``sample_rate``."""
    import torch

    idx = raw_chroma(wav, sample_rate, max_seconds).argmax(dim=-1)
    return torch.nn.functional.one_hot(idx, NUM_CHROMA).float()


def periodic_indices(n_frames: int, n_samples: int, start: int, length: int, hop: int = HOP) -> np.ndarray:
    """Frame indices into a tune's chroma (``n_frames`` frames of a recording of ``n_samples``
    samples) for ``length`` frames of that recording extended periodically (wrapped around its end
    back to its start), from sample ``start``: how audiocraft's ``MusicGen._generate_tokens`` gives
    a melody to the windows of a piece longer than the model's context (it wraps the waveform:
    ``wav[..., positions % wav_length]``). Frame j sits at sample ``start + j * hop`` of the
    extended recording, position ``p = (start + j * hop) mod n_samples`` of the tune; it takes the
    tune's frame nearest to p (audiocraft recomputes the chroma of the wrapped audio: the frames
    whose window straddles the wrap point may differ)."""
    n_samples = max(1, int(n_samples))
    p = (int(start) + np.arange(int(length), dtype=np.int64) * hop) % n_samples
    idx = np.rint(p / hop).astype(np.int64)
    last = n_frames - 1
    over = idx > last  # past the last frame: the nearer of the last frame and the next period's first
    idx[over] = np.where(n_samples - p[over] < p[over] - last * hop, 0, last)
    return idx


def dominant_pitch_classes(one_hot) -> list[str]:
    """The pitch class of each frame, for messages and tests."""
    return [PITCH_CLASSES[int(i)] for i in one_hot.argmax(dim=-1)]


def cosine_similarity(generated, reference) -> float:
    """audiocraft's ChromaCosineSimilarityMetric for one pair: the per-frame cosine of two one-hot
    chromas (T, 12), over the frames both have, averaged. Both come from ``chroma`` of audio at the
    same rate."""
    import torch

    n = min(int(generated.shape[0]), int(reference.shape[0]))
    if n == 0:
        raise ValueError("cosine_similarity needs at least one chroma frame in both signals")
    a, b = generated[:n].float(), reference[:n].float()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8).mean())
