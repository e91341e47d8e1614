"""Evaluation metrics: pure functions on arrays, used by evaluate.py (no model loading here).

* Distribution distances between embedding sets: Fréchet distance (FAD) computed stably in float64
  via a symmetric eigendecomposition, and Kernel Audio Distance (KAD, unbiased MMD² as in Chung et
  al. 2025, "KAD: No More FAD!", kadtk: Gaussian RBF kernel with the median-distance bandwidth,
  scale ×100; or the cubic polynomial kernel of KID).
* Held-out likelihood: a paired cluster bootstrap confidence interval for the difference between two
  models on the same clips, resampling whole recordings (their per-clip cross-entropy is the model
  family's one loss, lora.modeling.musicgen.codebook_loss).
* Bootstrap of FAD / KAD over the generated clips: each resample's distance from per-clip sufficient
  statistics (FAD) or per-clip kernel block sums (KAD), so both models can be scored on the same
  resamples cheaply.
* Signal checks for generated audio (NaN/Inf, clipping, DC offset, loudness, silence, flatness).
* Loudness normalisation and librosa feature embeddings (log-mel, MFCC, chroma).
* Diversity (mean pairwise embedding distance across prompts / across seeds).
* CLAP helpers: resample to 48 kHz and cut fixed 10-second windows; text–audio cosine scores.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from lora.modeling.clap import CLAP_SAMPLE_RATE, clap_windows, features

if TYPE_CHECKING:
    import torch
    from torch import nn

# --------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------


def embedding_statistics(emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of an (n, d) embedding matrix, in float64."""
    x = np.asarray(emb, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need an (n>=2, d) embedding matrix, got shape {x.shape}")
    mu = x.mean(axis=0)
    sigma = np.cov(x, rowvar=False)
    return mu, np.atleast_2d(sigma)


def _sym_sqrt(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix via eigh (negative eigenvalues
    clamped)."""
    a = (a + a.T) / 2.0
    w, v = np.linalg.eigh(a)
    w = np.clip(w, 0.0, None)
    return (v * np.sqrt(w)) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    d² = |mu1 - mu2|² + tr(sigma1) + tr(sigma2) - 2 tr( (sigma1^½ sigma2 sigma1^½)^½ )

    The cross term is computed with symmetric eigendecompositions in float64 (never
    scipy.linalg.sqrtm, whose complex/non-symmetric path is unstable for the rank-deficient
    covariances small sets produce).
    """
    mu1 = np.asarray(mu1, dtype=np.float64).ravel()
    mu2 = np.asarray(mu2, dtype=np.float64).ravel()
    s1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs "
                         f"{s2.shape}")
    r1 = _sym_sqrt(s1)
    m = r1 @ ((s2 + s2.T) / 2.0) @ r1
    m = (m + m.T) / 2.0
    w = np.clip(np.linalg.eigvalsh(m), 0.0, None)
    tr_covmean = float(np.sum(np.sqrt(w)))
    diff = mu1 - mu2
    d = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(d, 0.0)


def frechet_audio_distance(x: np.ndarray, y: np.ndarray) -> float:
    """FAD between two sets of (frame) embeddings, each (n, d)."""
    return frechet_distance(*embedding_statistics(x), *embedding_statistics(y))


# --------------------------------------------------------------------------------------------
# Kernel Audio Distance (unbiased MMD²)
# --------------------------------------------------------------------------------------------
KAD_SCALE = 100.0  # kadtk reports MMD² × 100


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    aa = np.sum(a * a, axis=1)[:, None]
    bb = np.sum(b * b, axis=1)[None, :]
    return np.maximum(aa + bb - 2.0 * a @ b.T, 0.0)


def median_pairwise_distance(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    d = np.sqrt(_sq_dists(x, x)[np.triu_indices(len(x), k=1)])
    return float(np.median(d)) if d.size else 0.0


def kernel_audio_distance(x: np.ndarray, y: np.ndarray, *, kernel: str = "rbf",
                          bandwidth: Optional[float] = None, scale: float = KAD_SCALE) -> dict:
    """Unbiased MMD² between embedding sets x (n, d) and y (m, d) (y = the reference set).

    kernel "rbf": k(a, b) = exp(-|a-b|² / (2 h²)), h = median pairwise distance of y unless given
    (KAD paper, kadtk). kernel "poly": k(a, b) = (a·b / d + 1)³ (KID). The unbiased estimator can be
    slightly negative for samples of one distribution; it is returned as is (clamping would bias
    it). Returns {"value": scale × MMD², "kernel", "bandwidth", "n_x", "n_y"}.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, m = len(x), len(y)
    if n < 2 or m < 2 or x.ndim != 2 or y.shape[1:] != x.shape[1:]:
        raise ValueError(f"need two (n>=2, d) sets with the same d, got {x.shape} and {y.shape}")
    if kernel == "rbf":
        h = float(bandwidth) if bandwidth is not None else median_pairwise_distance(y)
        if not np.isfinite(h) or h < 1e-12:
            h = 1.0
        gamma = 1.0 / (2.0 * h * h)

        def k(a, b):
            return np.exp(-gamma * _sq_dists(a, b))
    elif kernel == "poly":
        h = None
        dim = x.shape[1]

        def k(a, b):
            return (a @ b.T / dim + 1.0) ** 3
    else:
        raise ValueError(f"unknown kernel {kernel!r}: use 'rbf' or 'poly'")
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    mmd = ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
           - 2.0 * kxy.mean())
    return {"value": float(scale * mmd), "kernel": kernel, "bandwidth": h, "n_x": n, "n_y": m}


def subsample_index(n: int, max_rows: int, seed: int = 0) -> np.ndarray:
    """Indices of at most max_rows of n rows, chosen deterministically (without replacement), in
    order."""
    if n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))


def subsample_rows(x: np.ndarray, max_rows: int, seed: int = 0) -> np.ndarray:
    """At most max_rows rows of x, chosen deterministically (without replacement)."""
    x = np.asarray(x)
    return x[subsample_index(len(x), max_rows, seed)]


# --------------------------------------------------------------------------------------------
# Signal checks
# --------------------------------------------------------------------------------------------
@dataclass
class SignalThresholds:
    clip_level: float = 0.999  # |x| at or above this counts as a clipped sample
    max_clip_fraction: float = 0.001  # more clipped samples than this = "clipping"
    max_dc_offset: float = 0.05  # |mean| above this = "dc_offset"
    silence_db: float = -60.0  # frames (and whole clips) below this RMS level (dBFS) are silent
    max_silent_fraction: float = 0.5  # more silent frames than this = "mostly_silent"
    frame_seconds: float = 0.05


CHECK_FAILURES = ("non_finite", "silent", "clipping", "dc_offset", "mostly_silent")


def _db(x: float) -> float:
    return float(20.0 * math.log10(x)) if x > 0 else float("-inf")


def _as_channels_first(wav) -> np.ndarray:
    x = np.asarray(wav, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"audio must be (samples,) or (channels, samples), got shape {x.shape}")
    return x


def integrated_loudness(wav, sample_rate: int) -> float:
    """ITU-R BS.1770 integrated loudness (LUFS) with pyloudnorm; -inf for silence, nan when shorter
    than 0.4 s."""
    import pyloudnorm

    x = _as_channels_first(wav)
    if x.shape[1] < int(0.4 * sample_rate) + 1:
        return float("nan")
    meter = pyloudnorm.Meter(sample_rate)
    import warnings

    with warnings.catch_warnings():
        # pyloudnorm warns on possible clipping; reported separately
        warnings.simplefilter("ignore")
        return float(meter.integrated_loudness(x.T if x.shape[0] > 1 else x[0]))


def signal_checks(wav, sample_rate: int, thresholds: SignalThresholds = SignalThresholds()) -> dict:
    """Health of one clip (channels, samples) or (samples,). Returns the measurements and a list of
    failures."""
    t = thresholds
    x = _as_channels_first(wav)
    finite = bool(np.all(np.isfinite(x)))
    res: dict = {"duration_s": x.shape[1] / sample_rate, "finite": finite}
    if not finite:
        res["non_finite_fraction"] = float(np.mean(~np.isfinite(x)))
        res["failures"] = ["non_finite"]
        return res
    mono = x.mean(axis=0)
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    rms = float(np.sqrt(np.mean(x ** 2))) if x.size else 0.0
    hop = max(1, int(t.frame_seconds * sample_rate))
    n_frames = max(1, len(mono) // hop)
    frames = mono[: n_frames * hop].reshape(n_frames, -1) if len(mono) >= hop else mono[None]
    frame_db = 10.0 * np.log10(np.mean(frames ** 2, axis=1) + 1e-20)
    silent = frame_db < t.silence_db
    trailing = 0
    for s in silent[::-1]:
        if not s:
            break
        trailing += 1
    res.update(
        peak=peak,
        peak_dbfs=_db(peak),
        clip_fraction=float(np.mean(np.abs(x) >= t.clip_level)),
        dc_offset=float(np.max(np.abs(x.mean(axis=1)))),
        rms_dbfs=_db(rms),
        lufs=integrated_loudness(x, sample_rate),
        silent_fraction=float(np.mean(silent)),
        trailing_silence_s=trailing * hop / sample_rate,
        spectral_flatness=spectral_flatness(mono, sample_rate),
    )
    failures = []
    if rms == 0.0 or res["rms_dbfs"] < t.silence_db:
        failures.append("silent")
    if res["clip_fraction"] > t.max_clip_fraction:
        failures.append("clipping")
    if res["dc_offset"] > t.max_dc_offset:
        failures.append("dc_offset")
    if "silent" not in failures and res["silent_fraction"] > t.max_silent_fraction:
        failures.append("mostly_silent")
    res["failures"] = failures
    return res


def spectral_flatness(mono: np.ndarray, sample_rate: int) -> float:
    """Mean spectral flatness (0 = tonal, 1 = white noise) over non-silent frames (librosa)."""
    import librosa

    y = np.asarray(mono, dtype=np.float32)
    if len(y) < 2048 or not np.any(y):
        return float("nan")
    flat = librosa.feature.spectral_flatness(y=y, n_fft=2048, hop_length=512)[0]
    rms = librosa.feature.rms(y=y, frame_length=2048, hop_length=512)[0]
    keep = rms > 1e-4
    return float(np.mean(flat[keep])) if np.any(keep) else float("nan")


def summarize_checks(checks: Sequence[dict]) -> dict:
    """Failure rates and mean measurements over clips (non-finite values left out of the means)."""
    n = len(checks)
    out: dict = {"n": n, "n_failed": sum(1 for c in checks if c["failures"])}
    out["failure_rate"] = out["n_failed"] / n if n else float("nan")
    out["failure_rates"] = {f: (sum(1 for c in checks if f in c["failures"]) / n if n else float("nan"))
                            for f in CHECK_FAILURES}
    for key in ("peak", "clip_fraction", "dc_offset", "rms_dbfs", "lufs", "silent_fraction",
                "trailing_silence_s", "spectral_flatness"):
        vals = [c[key] for c in checks if key in c and np.isfinite(c[key])]
        out[f"mean_{key}"] = float(np.mean(vals)) if vals else None
        out[f"n_{key}"] = len(vals)
    return out


# --------------------------------------------------------------------------------------------
# Loudness normalisation and librosa features
# --------------------------------------------------------------------------------------------
def loudness_normalize(wav, sample_rate: int, target_lufs: float = -23.0,
                       max_peak: float = 0.99) -> np.ndarray:
    """Gain a clip to target_lufs (BS.1770); then scale down if its peak would exceed max_peak.

    Silent clips and clips too short to measure are returned unchanged (as float32).
    """
    x = _as_channels_first(wav)
    lufs = integrated_loudness(x, sample_rate)
    if np.isfinite(lufs):
        x = x * (10.0 ** ((target_lufs - lufs) / 20.0))
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak > max_peak:
        x = x * (max_peak / peak)
    out = x.astype(np.float32)
    return out if np.ndim(wav) == 2 else out[0]


def librosa_frame_features(wav, sample_rate: int, *, n_mels: int = 64, n_mfcc: int = 20,
                           n_fft: int = 2048, hop_length: int = 512) -> np.ndarray:
    """Per-frame features (frames, n_mels + n_mfcc + 12): log-mel (dB), MFCC and chroma of the mono
    mix."""
    import librosa

    y = _as_channels_first(wav).mean(axis=0).astype(np.float32)
    if len(y) < n_fft:
        y = np.pad(y, (0, n_fft - len(y)))
    mel = librosa.feature.melspectrogram(y=y, sr=sample_rate, n_fft=n_fft, hop_length=hop_length,
                                         n_mels=n_mels)
    logmel = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None)
    mfcc = librosa.feature.mfcc(S=logmel, n_mfcc=n_mfcc)
    chroma = librosa.feature.chroma_stft(S=np.abs(librosa.stft(y, n_fft=n_fft,
                                                               hop_length=hop_length)) ** 2,
                                         sr=sample_rate, n_fft=n_fft, hop_length=hop_length,
                                         # fixed A440 tuning: deterministic, no pitch tracking
                                         tuning=0.0)
    t = min(logmel.shape[1], mfcc.shape[1], chroma.shape[1])
    return np.concatenate([logmel[:, :t], mfcc[:, :t], chroma[:, :t]], axis=0).T.astype(np.float64)


def clip_statistics(frames: np.ndarray) -> np.ndarray:
    """One vector per clip: mean and standard deviation of its frame features."""
    f = np.asarray(frames, dtype=np.float64)
    return np.concatenate([f.mean(axis=0), f.std(axis=0)])


def standardizer(reference: np.ndarray):
    """An affine map z = (x - mean) / std fitted on reference rows (applied to every set alike)."""
    ref = np.asarray(reference, dtype=np.float64)
    mu = ref.mean(axis=0)
    sd = ref.std(axis=0)
    sd[sd < 1e-8] = 1.0
    return lambda x: (np.asarray(x, dtype=np.float64) - mu) / sd


# --------------------------------------------------------------------------------------------
# Diversity
# --------------------------------------------------------------------------------------------
def mean_pairwise_cosine_distance(emb: np.ndarray) -> Optional[float]:
    e = np.asarray(emb, dtype=np.float64)
    if len(e) < 2:
        return None
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    sim = e @ e.T
    iu = np.triu_indices(len(e), k=1)
    return float(np.mean(1.0 - sim[iu]))


def diversity(clip_emb: np.ndarray, prompt_ids: Sequence[int], seed_ids: Sequence[int]) -> dict:
    """Mean pairwise cosine distance of clip embeddings across prompts (same seed) and across seeds
    (same prompt).

    A model that ignores its prompt has a small across-prompt value; a collapsed model (same output
    for every seed) has an across-seed value near 0.
    """
    e = np.asarray(clip_emb, dtype=np.float64)
    p = np.asarray(prompt_ids)
    s = np.asarray(seed_ids)
    across_p = [v for sd in np.unique(s)
                if (v := mean_pairwise_cosine_distance(e[s == sd])) is not None]
    across_s = [v for pr in np.unique(p)
                if (v := mean_pairwise_cosine_distance(e[p == pr])) is not None]
    return {
        "across_prompts": float(np.mean(across_p)) if across_p else None,
        "n_across_prompts": len(across_p),
        "across_seeds": float(np.mean(across_s)) if across_s else None, "n_across_seeds": len(across_s),
    }


# --------------------------------------------------------------------------------------------
# CLAP
# --------------------------------------------------------------------------------------------
# (CLAP_SAMPLE_RATE, clap_windows and features live in lora.modeling.clap, shared with the
# auto-captions)
_features = features


def clap_scores(model: nn.Module, processor, texts: Sequence[str], wavs: Sequence, sample_rate: int,
                *, device: torch.device | str = "cpu",
                window_seconds: float = 10.0, shuffle_seed: int = 0) -> dict:
    """Cosine similarity between each text and its audio (mean of 10 s window embeddings,
    re-normalised).

    Also returns a shuffled-prompt baseline: each audio scored against another item's text (a
    derangement), which a model that follows its prompts should beat.
    """
    import torch
    import torch.nn.functional as F

    model.eval()
    # The feature extractor must match the model: fused models take 4 stacked mel views, others one.
    fused = bool(getattr(getattr(model.config, "audio_config", None), "enable_fusion", False))
    truncation = "fusion" if fused else "rand_trunc"
    with torch.no_grad():
        # Long captions are cut to what the text encoder can take (RoBERTa positions start after the
        # pad id).
        max_pos = int(getattr(getattr(model.config, "text_config", None), "max_position_embeddings",
                              514)) - 2
        max_len = min(max_pos,
                      int(getattr(processor.tokenizer, "model_max_length", max_pos) or max_pos))
        tin = processor.tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True,
                                  max_length=max_len)
        tin = {k: v.to(device) for k, v in tin.items()}
        temb = F.normalize(_features(model.get_text_features(**tin)).float(), dim=-1)
        aembs = []
        for wav in wavs:
            wins = clap_windows(wav, sample_rate, window_seconds=window_seconds)
            ain = processor.feature_extractor(wins, sampling_rate=CLAP_SAMPLE_RATE,
                                              return_tensors="pt",
                                             truncation=truncation, padding="repeatpad")
            ain = {k: v.to(device) for k, v in ain.items()}
            a = F.normalize(_features(model.get_audio_features(**ain)).float(), dim=-1).mean(dim=0)
            aembs.append(F.normalize(a, dim=-1))
        aemb = torch.stack(aembs)
    sims = (aemb * temb).sum(-1).cpu().numpy().astype(np.float64)
    n = len(texts)
    out = {"scores": sims.tolist(), "mean": float(np.mean(sims)), "n": n}
    if n >= 2:
        rng = np.random.default_rng(shuffle_seed)
        perm = rng.permutation(n)
        while np.any(perm == np.arange(n)):  # a derangement: nobody keeps its own prompt
            perm = rng.permutation(n)
        shuf = (aemb * temb[torch.as_tensor(perm)]).sum(-1).cpu().numpy().astype(np.float64)
        out["shuffled_mean"] = float(np.mean(shuf))
    else:
        out["shuffled_mean"] = None
    return out


def thresholds_dict(t: SignalThresholds = SignalThresholds()) -> dict:
    return asdict(t)
