"""The LoRA - base differences of the evaluation's generated-audio rows (failure share, FAD, KAD,
CLAP, chroma similarity): each with a bootstrap interval over the independent units (prompts: the
seeds of a prompt are correlated) and its sign-flip statistics on the family's shared patterns; at
the end, every row's max-T adjusted p (lora.scoring.verdicts), which the summary's verdicts use.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from lora.scoring import intervals, verdicts

METHOD = ("paired sign-flip permutation test over prompts (the LoRA and base labels of all clips "
          "of a prompt swapped together), the rows tested together by single-step max-T: the "
          "chance of naming any winner among them when nothing differs is at most the family's "
          "alpha")


class Family:
    """The generated-audio rows tested together: the unit of every (prompt, seed) pair, the sign
    patterns over the units (the same for every row), and each row's statistics."""

    def __init__(self, units: Sequence[int], max_patterns: int, seed: int):
        self.units = np.asarray(units, dtype=np.int64)
        self.n = int(self.units.max()) + 1 if self.units.size else 0
        self.patterns, self.exact = verdicts.sign_patterns(self.n, max_patterns, seed)
        self.stats: dict = {}
        self.n_units: dict = {}

    def add(self, key: str, stat: np.ndarray, pairs: Sequence[int]) -> None:
        self.stats[key] = np.asarray(stat, dtype=np.float64)
        self.n_units[key] = len(set(self.units[list(pairs)].tolist()))

    def finish(self, rows: dict) -> dict:
        """Adds ``p_permutation`` (the row alone), ``p_adjusted`` (max-T over the family) and
        ``n_units`` to each row's interval in ``rows`` (key -> interval); returns what the test
        was."""
        adjusted = verdicts.max_t(self.stats)
        for key, iv in rows.items():
            if key in adjusted:
                iv.update(p_permutation=verdicts.p_value(self.stats[key]), p_adjusted=adjusted[key],
                          n_units=self.n_units[key])
        return {"method": METHOD, "unit": "prompt", "n_units": self.n,
                "n_patterns": int(len(self.patterns)), "exact": bool(self.exact),
                "rows": sorted(adjusted)}


def paired_row(family: Family, key: str, base: Sequence[float], lora: Sequence[float],
               pairs: Sequence[int], n_boot: int, seed: int, what: str) -> dict:
    """A row that is a mean over (prompt, seed) pairs (failure share, CLAP, chroma similarity): the
    bootstrap interval of LoRA minus base resampling whole prompts, and the row's statistics in the
    family. ``pairs``: the pair index of each value."""
    units = family.units[list(pairs)]
    r = intervals.paired_bootstrap_ci(base, lora, clusters=units.tolist(), n_boot=n_boot, seed=seed)
    family.add(key, verdicts.paired_statistics(base, lora, units, family.patterns), pairs)
    return {"diff": r["diff"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
            "confidence": r["confidence"], "n_boot": r["n_boot"],
            "excludes_zero": bool(r["ci_high"] < 0 or r["ci_low"] > 0), "n_pairs": r["n"],
            "what": what}


def unit_counts(units: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, len(units)) bootstrap multiplicities of items when whole units are resampled: an
    item enters a resample as often as its unit is drawn."""
    local = np.unique(units, return_inverse=True)[1]
    return intervals.bootstrap_counts(int(local.max()) + 1, n_boot, seed)[:, local]


def _resolve(dist: dict, keys: tuple):
    v = dist
    for k in keys:
        v = v[k]
    return v


def distance_rows(family: Family, emb: dict, dist: dict, ref: list[dict], transform: dict,
                  pairs: Sequence[int], n_boot: int, seed: int, *, kad: Callable,
                  kad_pool: Callable, clip_statistics: Callable) -> dict:
    """FAD and KAD (both spaces, and KAD of the librosa clip statistics) of LoRA minus base on the
    shared pairs: the bootstrap interval resampling whole prompts (both models on the same
    resample, the reference fixed) and the row's statistics in the family (both models' distances
    recomputed on the sets relabelled by each pattern). ``kad(clips, y, counts)`` is the KAD of
    every row of counts (intervals.kernel_bootstrap with the evaluation's kernel and frame cap),
    ``kad_pool`` the same for the pool of both models' clips (twice the cap); ``emb`` model ->
    per-clip embeddings of ``pairs``."""
    units = family.units[list(pairs)]
    counts = unit_counts(units, n_boot, seed)
    rows: dict = {}

    def add(key: str, clips: dict, y: np.ndarray, distance: Callable, point: tuple, label: str,
            pooled: Callable):
        boot = {m: distance(clips[m], y, counts) for m in ("base", "lora")}
        point_diff = _resolve(dist["lora"], point) - _resolve(dist["base"], point)
        iv = intervals.percentile_interval(boot["lora"] - boot["base"], point_diff)
        iv.update(n_pairs=len(units),
                  what=f"LoRA minus base {label}; negative = LoRA closer to the reference")
        rows[key] = iv
        family.add(key, verdicts.set_statistics(lambda pool, c: pooled(pool, y, c), clips["base"],
                                                clips["lora"], units, family.patterns), pairs)

    for space in ("encodec", "librosa"):
        y = transform[space](np.concatenate([r[space] for r in ref]))
        clips = {m: [transform[space](e[space]) for e in emb[m]] for m in ("base", "lora")}
        add(f"{space}.fad", clips, y, intervals.frechet_bootstrap, (space, "fad"), f"FAD ({space})",
            intervals.frechet_bootstrap)
        add(f"{space}.kad", clips, y, kad, (space, "kad", "value"), f"KAD x100 ({space})", kad_pool)
    if dist["base"]["librosa"]["kad_clip_statistics"] is not None:
        y = np.stack([clip_statistics(transform["librosa"](r["librosa"])) for r in ref])
        clips = {m: [clip_statistics(transform["librosa"](e["librosa"]))[None] for e in emb[m]]
                 for m in ("base", "lora")}
        add("librosa.kad_clip_statistics", clips, y, kad,
            ("librosa", "kad_clip_statistics", "value"), "KAD x100 (librosa clip statistics)", kad)
    return rows
