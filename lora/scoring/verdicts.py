"""The verdicts of the evaluation's summary: on which rows a model is named better, so that with no
true difference the summary names ANY winner at most ``ALPHA`` (5%) of the time.

* **The independent unit.** Clips cut from one recording are correlated, and so are the clips of
  one prompt (its seeds) or of one tune (melody models): the tests permute whole units, never
  clips or (prompt, seed) pairs one by one: recordings for the held-out likelihood, prompts for the
  generated audio (prompts that share a caption or a tune are one unit: ``unit_ids``).
* **A paired sign-flip permutation test per row.** With no difference between the models, the
  LoRA and base labels of a unit's clips are exchangeable: swapping them on any set of units gives
  a statistic as likely as the observed one. A pattern of swaps is a sign per unit
  (``sign_patterns``): every one of the 2^(n-1) patterns (a pattern and its mirror give the same
  |statistic|) when they are few, else the observed one and ``max_patterns - 1`` random ones. For
  a mean over clips (cross-entropy, CLAP, chroma similarity, failure share) the statistic is the
  weighted mean difference with the units' signs flipped (``paired_statistics``); for a set
  distance (FAD, KAD) both models' distances to the reference are recomputed on the relabelled
  sets (``set_statistics``).
* **Several rows together.** The generated-audio rows are one family, tested by the single-step
  max-T procedure (Westfall & Young, 1993) on the same patterns: a row's adjusted p is the share of
  patterns whose largest standardised statistic over all the family's rows reaches the row's
  observed one (``max_t``). It bounds the chance of any false winner among those rows whatever
  their correlation (FAD and KAD move together). The summary's families (held-out likelihood;
  generated audio) share ``ALPHA`` equally (Bonferroni): 2.5% each when both are there.
* **A minimum sample.** With n units the smallest p a sign-flip test can give is 2^-(n-1): below
  ``min_units(alpha)`` units no data could name a winner, and the row says how many it needs
  (``verdict``): 6 at 5%, 7 at 2.5%.

tests/scoring/test_verdicts.py simulates evaluations with no true difference through the
evaluation's own functions; bench/bench_verdicts.py runs the long simulation (BENCHMARKS.md).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

# the chance that the summary names any winner when nothing differs
ALPHA = 0.05
# patterns at most per test (evaluation.permutations is the user's setting)
DEFAULT_PATTERNS = 1000


def unit_ids(keys: Sequence[Sequence]) -> np.ndarray:
    """The independent unit of each item: items that share any key (e.g. the prompt's text, or the
    tune's file) are one unit (connected components), numbered 0.. in order of first appearance."""
    parent: dict = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    nodes = []
    for i, ks in enumerate(keys):
        ks = [("key", k) for k in ks if k is not None] or [("item", i)]
        for k in ks[1:]:
            parent[find(k)] = find(ks[0])
        nodes.append(ks[0])
    ids: dict = {}
    return np.asarray([ids.setdefault(find(n), len(ids)) for n in nodes], dtype=np.int64)


def min_units(alpha: float) -> int:
    """The fewest units with which a sign-flip test can reach ``alpha``: 2^-(n-1) <= alpha."""
    return 1 + math.ceil(math.log2(1.0 / alpha) - 1e-12)


def sign_patterns(n_units: int, max_patterns: int = DEFAULT_PATTERNS,
                  seed: int = 0) -> tuple[np.ndarray, bool]:
    """(patterns (P, n_units) of +-1 with the observed labelling (all +1) first, exact): all 2^(n-1)
    patterns with the first unit's sign fixed when they are at most ``max_patterns``, else the
    observed one and ``max_patterns - 1`` drawn at random (seeded)."""
    n = int(n_units)
    if n == 0:
        return np.ones((1, 0)), True
    if 2 ** (n - 1) <= max_patterns:
        bits = (np.arange(2 ** (n - 1))[:, None] >> np.arange(n - 1)) & 1
        return np.concatenate([np.ones((len(bits), 1)), 1.0 - 2.0 * bits], axis=1), True
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(int(max_patterns), n))
    signs[0] = 1.0
    return signs, False


def paired_statistics(base, other, units, patterns: np.ndarray, weights=None) -> np.ndarray:
    """The weighted mean of ``other - base`` over items (row 0: as observed) with each unit's
    differences multiplied by its sign, for every pattern: (P,)."""
    d = np.asarray(other, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    w = np.ones_like(d) if weights is None else np.asarray(weights, dtype=np.float64)
    per_unit = np.bincount(np.asarray(units), weights=w * d, minlength=patterns.shape[1])
    return patterns @ per_unit / w.sum()


def swap_counts(units, patterns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a pool of clips [base clips of N pairs, then LoRA clips of the same pairs]: which clips
    each relabelled set holds under each pattern, as (P, 2N) 0/1 counts: (the set labelled LoRA,
    the set labelled base). Row 0 is the observed labelling."""
    keep = patterns[:, np.asarray(units)] > 0  # (P, N): the unit keeps its labels
    lora = np.concatenate([~keep, keep], axis=1).astype(np.float64)
    return lora, 1.0 - lora


def set_statistics(distance, base_clips: list, lora_clips: list, units, patterns: np.ndarray,
                   chunk: int = 200) -> np.ndarray:
    """``distance(pool, counts) -> (P,)`` (a set distance to the fixed reference of each row of
    counts over ``pool``, e.g. intervals.frechet_bootstrap) of the set labelled LoRA minus that of
    the set labelled base, for every pattern: (P,). Computed ``chunk`` patterns at a time (each
    FAD needs a d x d matrix per pattern)."""
    pool = list(base_clips) + list(lora_clips)
    out = []
    for start in range(0, len(patterns), chunk):
        lora, base = swap_counts(units, patterns[start:start + chunk])
        out.append(distance(pool, lora) - distance(pool, base))
    return np.concatenate(out)


def p_value(stat: np.ndarray) -> float:
    """Two-sided permutation p of the observed statistic (``stat[0]``): the share of patterns (the
    observed one included) whose |statistic| reaches it."""
    stat = np.asarray(stat, dtype=np.float64)
    if not np.isfinite(stat).all():
        return 1.0
    obs = abs(stat[0])
    return float(np.mean(np.abs(stat) >= obs * (1 - 1e-9))) if obs > 0 else 1.0


def max_t(stats: dict) -> dict:
    """Single-step max-T adjusted p of each row of a family (row -> its statistics (P,) on the same
    patterns, row 0 observed): each row standardised by its root mean square over the patterns (0
    under no difference, by symmetry), the largest |t| over rows taken per pattern, and a row's p =
    the share of patterns whose largest |t| reaches the row's observed |t|. A row whose statistic
    is not finite for every pattern gets p 1 and does not enter the maximum."""
    t = {}
    for key, s in stats.items():
        s = np.asarray(s, dtype=np.float64)
        if not np.isfinite(s).all():
            continue
        rms = float(np.sqrt(np.mean(s * s)))
        t[key] = np.abs(s) / rms if rms > 0 else np.zeros_like(s)
    if not t:
        return {key: 1.0 for key in stats}
    top = np.max(np.stack(list(t.values())), axis=0)
    return {key: float(np.mean(top >= t[key][0] * (1 - 1e-9))) if key in t and t[key][0] > 0 else 1.0
            for key in stats}


def verdict(delta: Optional[float], p: Optional[float], n_units: Optional[int], alpha: float,
            lower_is_better: bool, unit: str) -> str:
    """A row's "better?": "LoRA" or "base" when its (family-adjusted) p is at most ``alpha``; else
    "unclear"; "too few <unit>s: needs N (k more)" below ``min_units(alpha)`` units, where no data
    could name a winner."""
    need = min_units(alpha)
    if n_units is None or n_units < need:
        have = 0 if n_units is None else int(n_units)
        return f"too few {unit}s: needs {need} ({need - have} more)"
    if p is None or delta is None or delta == 0 or p > alpha:
        return "unclear"
    return "LoRA" if (delta < 0) == lower_is_better else "base"


def sign_flip_test(base, other, units, weights=None, max_patterns: int = DEFAULT_PATTERNS,
                   seed: int = 0) -> dict:
    """The paired sign-flip test of one row on its own (the held-out likelihood: clips weighted by
    tokens, units = recordings): {"p", "n_units", "n_patterns", "exact"}."""
    units = np.asarray(units, dtype=np.int64)
    n = int(units.max()) + 1 if units.size else 0
    patterns, exact = sign_patterns(n, max_patterns, seed)
    stat = paired_statistics(base, other, units, patterns, weights)
    return {"p": p_value(stat), "n_units": n, "n_patterns": int(len(patterns)), "exact": exact}


def alphas(has_likelihood: bool, has_generated: bool) -> dict:
    """ALPHA shared equally (Bonferroni) by the families the summary holds: {"likelihood",
    "generated"}."""
    k = max(1, int(has_likelihood) + int(has_generated))
    return {"likelihood": ALPHA / k, "generated": ALPHA / k}
