"""Confidence intervals of the evaluation: the paired (cluster) bootstrap of a per-clip difference,
percentile intervals, and the bootstrap of the set distances (FAD / KAD) over generated clips.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from lora.scoring.metrics import (
    KAD_SCALE,
    _sq_dists,
    _sym_sqrt,
    embedding_statistics,
    median_pairwise_distance,
    subsample_index,
)


# --------------------------------------------------------------------------------------------
# Held-out likelihood (the per-clip cross-entropy itself is the model family's one loss:
# lora.modeling.musicgen.codebook_loss)
# --------------------------------------------------------------------------------------------
def _cluster_ids(clusters, n: int) -> tuple[np.ndarray, int]:
    """Integer ids 0..G-1 of each item's cluster (first-seen order); None, or a None entry, = an
    item of its own."""
    if clusters is None:
        return np.arange(n), n
    keys = list(clusters)
    if len(keys) != n:
        raise ValueError(f"clusters must name one cluster per item: {len(keys)} for {n} items")
    ids: dict = {}
    idx = [ids.setdefault(("item", i) if k is None else ("key", k), len(ids)) for i, k in enumerate(keys)]
    return np.asarray(idx, dtype=np.int64), len(ids)


def paired_bootstrap_ci(base: Sequence[float], other: Sequence[float],
                        weights: Optional[Sequence[float]] = None, *,
                        clusters: Optional[Sequence] = None, n_boot: int = 2000, confidence: float = 0.95,
                        seed: int = 0) -> dict:
    """Paired (cluster) bootstrap for mean(other) - mean(base), e.g. per-clip CE of LoRA minus base.

    base[i] and other[i] are the same item (clip) under two models. With weights (e.g. tokens per
    clip) the means are weighted means, resampled together, so the estimate equals the token-level
    mean difference. With ``clusters`` (one key per item, e.g. the recording a clip was cut from;
    None = an item of its own) whole clusters are resampled: items of one cluster are not
    independent, and resampling them one by one gives an interval too narrow by up to the square
    root of the items per cluster. Without clusters every item is its own cluster (the plain paired
    bootstrap, the same draws). Returns {"diff", "ci_low", "ci_high", "confidence", "n",
    "n_clusters", "n_boot", "p_two_sided"} where n counts items, n_clusters the units resampled, and
    p_two_sided is the bootstrap share of resamples on the other side of zero (x2, capped at 1).
    """
    a = np.asarray(base, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired samples must be two equal-length 1-D sequences, got {a.shape} "
                         f"and {b.shape}")
    w = np.ones_like(a) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != a.shape:
        raise ValueError("weights must match the samples")
    d = b - a
    diff = float(np.sum(w * d) / np.sum(w))
    cid, g = _cluster_ids(clusters, a.size)
    cw = np.bincount(cid, weights=w, minlength=g)          # weight of each cluster
    # weighted difference summed over the cluster
    cwd = np.bincount(cid, weights=w * d, minlength=g)
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    chunk = max(1, 2_000_000 // max(g, 1))
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, g, size=(stop - start, g))
        out[start:stop] = np.sum(cwd[idx], axis=1) / np.sum(cw[idx], axis=1)
    res = percentile_interval(out, diff, confidence)
    return {"diff": diff, "ci_low": res["ci_low"], "ci_high": res["ci_high"], "confidence": confidence,
            "n": int(a.size), "n_clusters": int(g), "n_boot": int(n_boot),
            "p_two_sided": res["p_two_sided"]}


def percentile_interval(boot: np.ndarray, point: float, confidence: float = 0.95) -> dict:
    """Percentile interval of bootstrap replicates of a difference, whether it excludes 0, and the
    two-sided bootstrap p (twice the share of replicates on the other side of 0 from the point
    estimate, capped at 1)."""
    boot = np.asarray(boot, dtype=np.float64)
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return {"diff": float(point), "ci_low": None, "ci_high": None, "confidence": confidence,
                "n_boot": 0, "excludes_zero": False, "p_two_sided": None}
    alpha = 1.0 - confidence
    lo, hi = (float(v) for v in np.quantile(boot, [alpha / 2, 1 - alpha / 2]))
    if point > 0:
        p = 2 * np.mean(boot <= 0)
    elif point < 0:
        p = 2 * np.mean(boot >= 0)
    else:
        p = 1.0
    return {"diff": float(point), "ci_low": lo, "ci_high": hi, "confidence": confidence,
            "n_boot": int(boot.size),
            "excludes_zero": bool(hi < 0 or lo > 0), "p_two_sided": float(min(1.0, p))}


# --------------------------------------------------------------------------------------------
# Bootstrap of set distances over the generated clips (FAD / KAD of a resample, both models on the same one)
# --------------------------------------------------------------------------------------------
def bootstrap_counts(n: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_boot, n) multiplicities: row b says how often each of n items is drawn in resample b (n
    draws with replacement)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    counts = np.zeros((n_boot, n), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(n_boot), n), idx.ravel()), 1)
    return counts


def frechet_bootstrap(clips: Sequence[np.ndarray], reference: np.ndarray,
                      counts: np.ndarray) -> np.ndarray:
    """FAD between the frames of each resample of ``clips`` (rows of ``counts``: how often each clip
    is drawn; a clip's frames enter as often as it is drawn) and the fixed reference frames. One
    value per resample.

    Per-clip sums and outer products make each resample O(clips x d²) plus one d x d
    eigendecomposition; the reference's covariance root is computed once."""
    c = np.asarray(counts, dtype=np.float64)
    frames = [np.asarray(x, dtype=np.float64) for x in clips]
    centre = np.concatenate(frames).mean(axis=0)
    n_i = np.array([len(x) for x in frames], dtype=np.float64)
    s_i = np.stack([(x - centre).sum(axis=0) for x in frames])
    q_i = np.stack([(x - centre).T @ (x - centre) for x in frames])
    mu_r, sig_r = embedding_statistics(reference)
    root = _sym_sqrt(sig_r)
    b, dim = c.shape[0], s_i.shape[1]
    n = c @ n_i                                              # frames per resample
    mean = (c @ s_i) / n[:, None]                            # centred
    cov = (c @ q_i.reshape(len(frames), -1)).reshape(b, dim, dim)
    cov -= n[:, None, None] * mean[:, :, None] * mean[:, None, :]
    cov /= np.maximum(n - 1, 1)[:, None, None]
    # root @ cov_b @ root for every b as two plain matrix products (numpy's broadcast matmul is far
    # slower here)
    half = (cov.reshape(b * dim, dim) @ root).reshape(b, dim, dim)
    # (root cov root)^T, symmetric
    m = (np.swapaxes(half, 1, 2).reshape(b * dim, dim) @ root).reshape(b, dim, dim)
    tr_covmean = np.array([np.sqrt(np.clip(np.linalg.eigvalsh((mb + mb.T) / 2), 0, None)).sum()
                           for mb in m])
    dmu = mean + centre - mu_r
    d = np.sum(dmu * dmu, axis=1) + np.trace(sig_r) + np.trace(cov, axis1=1, axis2=2) - 2 * tr_covmean
    return np.maximum(d, 0.0)


def kernel_bootstrap(clips: Sequence[np.ndarray], reference: np.ndarray, counts: np.ndarray, *,
                     kernel: str = "rbf",
                     max_rows: Optional[int] = None, scale: float = KAD_SCALE) -> np.ndarray:
    """KAD (unbiased MMD² x scale) of each resample of ``clips`` against the fixed reference, as
    kernel_audio_distance computes it on the concatenated frames (the same subsample of at most
    ``max_rows`` rows per set, seed 0, the same bandwidth): with all counts 1 it returns that value.
    Pairs of a frame with a copy of itself (a clip drawn more than once) are left out of the
    within-set term, as the diagonal is."""
    x = np.concatenate([np.asarray(v, dtype=np.float64) for v in clips])
    label = np.concatenate([np.full(len(v), i) for i, v in enumerate(clips)])
    y = np.asarray(reference, dtype=np.float64)
    if max_rows is not None:
        keep = subsample_index(len(x), max_rows)
        x, label = x[keep], label[keep]
        y = y[subsample_index(len(y), max_rows)]
    if kernel == "rbf":
        h = median_pairwise_distance(y)
        h = h if np.isfinite(h) and h >= 1e-12 else 1.0
        k = lambda a, b: np.exp(-_sq_dists(a, b) / (2.0 * h * h))  # noqa: E731
    elif kernel == "poly":
        k = lambda a, b: (a @ b.T / x.shape[1] + 1.0) ** 3  # noqa: E731
    else:
        raise ValueError(f"unknown kernel {kernel!r}: use 'rbf' or 'poly'")
    g = len(clips)
    onehot = np.zeros((len(x), g))
    onehot[np.arange(len(x)), label] = 1.0
    kxx = k(x, x)
    # kernel summed over frames of clip i x clip j
    block = onehot.T @ kxx @ onehot
    # k(f, f) summed over the frames of clip i
    diag = onehot.T @ np.diag(kxx)
    n_i = onehot.sum(axis=0)
    # kernel to every reference frame, per clip
    kxy = onehot.T @ k(x, y).sum(axis=1)
    kyy = k(y, y)
    m = len(y)
    yy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    c = np.asarray(counts, dtype=np.float64)
    n = c @ n_i
    # a resample of one single-row clip has no pairs: NaN
    with np.errstate(invalid="ignore", divide="ignore"):
        xx = (np.einsum("bi,ij,bj->b", c, block, c) - (c * c) @ diag) / (n * n - (c * c) @ n_i)
    xy = (c @ kxy) / (n * m)
    return scale * (xx + yy - 2.0 * xy)
