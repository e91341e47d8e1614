"""Did the fine-tune learn to reproduce its training audio? The copy check of generated clips
against the training set's cached codebook-0 tokens.

Two measures, both on the coarse (first) EnCodec codebook of the token cache
(lora/dataprep/token_cache.py), 50 tokens per second for MusicGen:

* **Exact copies**: runs of generated tokens equal to a run of a training clip's tokens. A model
  that memorised a passage and plays it back emits its tokens one for one; the run's length in
  seconds, the training clip and the offsets in both are exact.
* **Near-copies** (tolerant): a window of ``WINDOW_SECONDS`` of generated tokens counts as copied
  where at least ``AGREEMENT`` of its tokens equal those of a training clip at the same place
  (the same alignment). A passage re-encoded after a small change (a gain change of a few dB,
  added noise) keeps most of its coarse tokens but breaks the exact runs into short pieces: the
  near-copy measure still finds it. Consecutive copied windows make one passage.

Which training clip and where: an index over every ``STRIDE``-th position of the training tokens,
keyed by the ``SEED_FRAMES`` tokens that start there (``CopyIndex``). Each generated position is
looked up; every hit proposes an alignment (a training clip and an offset), which is then compared
token by token over the whole overlap. So any exact run of at least ``SEED_FRAMES + STRIDE - 1``
frames is found, with its exact length and offsets, and a near-copy is found when its tokens agree
for that many frames in a row somewhere (measured: BENCHMARKS.md, "Copy check"). Patterns that
occur more than ``MAX_SEED_HITS`` times in the training set (silence, a constant hum) propose no
alignment: too common to point at a passage. Neither measure sees a copy whose coarse tokens
changed throughout (transposed, re-played, re-mixed, time-stretched).

The numbers per generated clip: the longest copied passage (seconds, training clip, where in each)
and the share of the clip's time inside copied passages of at least ``min_seconds``. The base
model is the floor: ``compare`` flags a fine-tune whose share is above the base's, with a paired
bootstrap interval over prompts (clips of one prompt are resampled together).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from lora.common.cli import log
from lora.dataprep.token_cache import build_token_cache
from lora.scoring import intervals

SEED_FRAMES = 4        # tokens in an index key (an exact key: 4 x 16 bits in one uint64)
STRIDE = 4             # every STRIDE-th training position is indexed
MAX_SEED_HITS = 1000   # a key found more often than this in the training set proposes nothing
MIN_SEEDS = 2          # hits an alignment needs before it is compared token by token
MAX_ALIGNMENTS = 4000  # at most this many alignments per generated clip (those with most hits)
WINDOW_SECONDS = 1.0   # the near-copy window
AGREEMENT = 0.7        # share of equal tokens that makes a window a near-copy
MIN_SECONDS = 1.0      # default shortest passage counted in the share (evaluation.copy_min_seconds)
# with fewer prompts the comparison with the base names no verdict: the sign-flip test over 4
# prompts cannot go below p = 1/16
MIN_PROMPTS = 5
_CHUNK = 256           # alignments compared at once


def coarse_tokens(codes) -> np.ndarray:
    """The first codebook of a clip's codes (K, T) (a tensor or an array): what the check compares.
    (Stereo codes interleave the channels: row 0 is the left channel's first codebook.)"""
    a = codes.numpy() if hasattr(codes, "numpy") else np.asarray(codes)
    return np.ascontiguousarray(a[0] if a.ndim == 2 else a).astype(np.int64)


def _keys(tokens: np.ndarray) -> np.ndarray:
    """The SEED_FRAMES-token key starting at every position (len - SEED_FRAMES + 1 of them)."""
    t = tokens.astype(np.uint64)
    n = len(t) - SEED_FRAMES + 1
    if n <= 0:
        return np.zeros(0, dtype=np.uint64)
    k = np.zeros(n, dtype=np.uint64)
    for j in range(SEED_FRAMES):
        k = (k << np.uint64(16)) | t[j:j + n]
    return k


def runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The maximal runs of True in each row of a 2-D bool array: (row, start, length) arrays, in
    row-major order."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim == 1:
        m = m[None]
    d = np.diff(np.pad(m.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    rows, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)
    return rows, starts, ends - starts


@dataclass
class CopyIndex:
    """The training set's coarse tokens, concatenated, with a sorted key index over every STRIDE-th
    position. Build it with ``CopyIndex.build``; ``check`` one generated clip at a time."""

    names: list             # one per training clip (its audio path or id)
    starts: np.ndarray      # (n_clips + 1,) where each clip begins in ``tokens``
    tokens: np.ndarray      # uint16 (N,)
    keys: np.ndarray        # uint64, sorted
    positions: np.ndarray   # uint32/int64 global position of each key
    frame_rate: float

    @classmethod
    def build(cls, names: Sequence[str], token_seqs: Sequence[np.ndarray],
              frame_rate: float) -> "CopyIndex":
        """The index of ``token_seqs`` (one 1-D array of coarse tokens per training clip, tokens
        < 65536)."""
        seqs = [np.asarray(t, dtype=np.int64).ravel() for t in token_seqs]
        if any(len(t) and (t.min() < 0 or t.max() > 0xFFFF) for t in seqs):
            raise ValueError("coarse tokens must lie in [0, 65535]")
        lengths = np.array([len(t) for t in seqs], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = (np.concatenate(seqs) if seqs else np.zeros(0)).astype(np.uint16)
        keys, pos = [], []
        for i, t in enumerate(seqs):
            k = _keys(t)[::STRIDE]
            keys.append(k)
            pos.append(starts[i] + STRIDE * np.arange(len(k), dtype=np.int64))
        keys = np.concatenate(keys) if keys else np.zeros(0, dtype=np.uint64)
        pos = np.concatenate(pos) if pos else np.zeros(0, dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        pos_dtype = np.uint32 if starts[-1] < 2 ** 32 else np.int64
        return cls(names=list(names), starts=starts, tokens=tokens, keys=keys[order],
                   positions=pos[order].astype(pos_dtype), frame_rate=float(frame_rate))

    @property
    def n_clips(self) -> int:
        return len(self.names)

    @property
    def nbytes(self) -> int:
        """Memory of the index's arrays."""
        return int(self.tokens.nbytes + self.keys.nbytes + self.positions.nbytes + self.starts.nbytes)

    def describe(self) -> dict:
        return {"n_clips": self.n_clips, "seconds": float(len(self.tokens) / self.frame_rate),
                "index_mb": round(self.nbytes / 2 ** 20, 2), "seed_frames": SEED_FRAMES,
                "stride": STRIDE, "max_seed_hits": MAX_SEED_HITS}

    # ------------------------------------------------------------------------------------------
    def alignments(self, gen: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Candidate alignments of a generated token sequence: (training clip, diagonal) pairs,
        where a diagonal is training position - generated position, each with at least MIN_SEEDS
        hits, most hits first, at most MAX_ALIGNMENTS; and how many generated positions hit a
        too-common key."""
        k = _keys(gen)
        lo = np.searchsorted(self.keys, k, side="left")
        hi = np.searchsorted(self.keys, k, side="right")
        counts = hi - lo
        common = counts > MAX_SEED_HITS
        counts = np.where(common, 0, counts)
        total = int(counts.sum())
        if total == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), int(common.sum())
        first = np.repeat(lo, counts)
        offset = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        train_pos = self.positions[first + offset].astype(np.int64)
        gen_pos = np.repeat(np.arange(len(k)), counts)
        clip = np.searchsorted(self.starts, train_pos, side="right") - 1
        span = int(self.starts[-1]) + len(gen) + 1
        pair, n = np.unique(clip * (2 * span) + (train_pos - gen_pos + span), return_counts=True)
        keep = n >= MIN_SEEDS
        pair, n = pair[keep], n[keep]
        order = np.argsort(-n, kind="stable")[:MAX_ALIGNMENTS]
        pair = pair[order]
        return pair // (2 * span), pair % (2 * span) - span, int(common.sum())

    def _compare(self, gen: np.ndarray, clip: np.ndarray, diags: np.ndarray):
        """Per alignment (a training clip and a diagonal): (equal tokens (A, T) bool, where the
        alignment overlaps its clip (A, T) bool)."""
        idx = diags[:, None] + np.arange(len(gen))[None, :]
        lo, hi = self.starts[clip][:, None], self.starts[clip + 1][:, None]
        inside = (idx >= lo) & (idx < hi)
        tok = self.tokens[np.clip(idx, 0, max(0, len(self.tokens) - 1))].astype(np.int64)
        return (tok == gen[None, :]) & inside, inside

    def check(self, codes, min_seconds: float = MIN_SECONDS, window_seconds: float = WINDOW_SECONDS,
              agreement: float = AGREEMENT) -> dict:
        """The copy check of one generated clip's codes (K, T) (or its coarse tokens (T,)):
        {"seconds", "exact": passage, "near": passage, "common_positions"}; a passage is
        {"longest_s", "clip", "clip_at_s", "at_s", "share"} (+ "agreement" for near-copies):
        the longest copied passage, the training clip it reproduces and where it starts in that
        clip and in the generated clip, and the share of the generated time inside copied passages
        of at least ``min_seconds``."""
        gen = coarse_tokens(codes)
        T, fr = len(gen), self.frame_rate
        min_frames = max(1, int(round(min_seconds * fr)))
        W = max(1, min(T, int(round(window_seconds * fr))))
        clips, diags, common = self.alignments(gen)
        best = {"exact": _Best(), "near": _Best()}
        covered = {"exact": np.zeros(T, dtype=bool), "near": np.zeros(T, dtype=bool)}
        for c in range(0, len(diags), _CHUNK):
            d, clip = diags[c:c + _CHUNK], clips[c:c + _CHUNK]
            eq, inside = self._compare(gen, clip, d)
            self._passages(eq, d, clip, min_frames, best["exact"], covered["exact"])
            near = _near_windows(eq, inside, W, agreement)
            self._passages(near, d, clip, min_frames, best["near"], covered["near"], eq=eq)
        out = {"seconds": T / fr, "common_positions": common}
        for kind in ("exact", "near"):
            out[kind] = best[kind].as_dict(self, fr)
            out[kind]["share"] = float(covered[kind].mean()) if T else 0.0
        return out

    def _passages(self, mask, diags, clip, min_frames: int, best: "_Best", covered: np.ndarray,
                  eq: Optional[np.ndarray] = None) -> None:
        """Fold the runs of ``mask`` (A, T) into the longest passage and the covered positions. With
        ``eq`` (near-copies) each run is trimmed to its first and last equal token."""
        rows, st, ln = runs(mask)
        if eq is not None and len(ln):
            for i, (r, s, n) in enumerate(zip(rows, st, ln)):
                hit = np.flatnonzero(eq[r, s:s + n])
                st[i], ln[i] = s + hit[0], hit[-1] - hit[0] + 1
        if len(ln) == 0:
            return
        for s, n in zip(st[ln >= min_frames], ln[ln >= min_frames]):
            covered[s:s + n] = True
        j = int(np.argmax(ln))
        if ln[j] > best.frames:
            r, s = int(rows[j]), int(st[j])
            agree = None if eq is None else float(eq[r, s:s + ln[j]].mean())
            best.set(int(ln[j]), int(clip[r]), int(diags[r] + s - self.starts[clip[r]]), s, agree)


@dataclass
class _Best:
    frames: int = 0
    clip: int = -1
    clip_at: int = 0
    at: int = 0
    agreement: Optional[float] = None

    def set(self, frames, clip, clip_at, at, agreement) -> None:
        self.frames, self.clip, self.clip_at, self.at, self.agreement = frames, clip, clip_at, at, agreement

    def as_dict(self, index: CopyIndex, fr: float) -> dict:
        d = {"longest_s": self.frames / fr,
             "clip": index.names[self.clip] if self.frames else None,
             "clip_at_s": self.clip_at / fr if self.frames else None,
             "at_s": self.at / fr if self.frames else None}
        if self.agreement is not None:
            d["agreement"] = self.agreement
        return d


def _near_windows(eq: np.ndarray, inside: np.ndarray, W: int, agreement: float) -> np.ndarray:
    """(A, T) bool: the positions inside some window of W positions, wholly within its alignment's
    overlap, where at least ``agreement`` of the tokens are equal."""
    A, T = eq.shape
    if T < W:
        return np.zeros_like(eq)
    ce = np.concatenate([np.zeros((A, 1), np.int64), np.cumsum(eq, axis=1)], axis=1)
    ci = np.concatenate([np.zeros((A, 1), np.int64), np.cumsum(inside, axis=1)], axis=1)
    hits = ce[:, W:] - ce[:, :-W]
    whole = (ci[:, W:] - ci[:, :-W]) == W
    start = (whole & (hits >= agreement * W)).astype(np.int64)   # (A, T - W + 1) window starts
    cs = np.concatenate([np.zeros((A, 1), np.int64), np.cumsum(start, axis=1)], axis=1)
    # position p is covered when a window starting in [p - W + 1, p] qualifies
    p = np.arange(T)
    lo = np.clip(p - W + 1, 0, start.shape[1])
    hi = np.clip(p + 1, 0, start.shape[1])
    return (cs[:, hi] - cs[:, lo]) > 0


# --------------------------------------------------------------------------------------------
# Sets of clips, and the base model as the floor
# --------------------------------------------------------------------------------------------
def summarize(checks: Sequence[Optional[dict]]) -> dict:
    """One model's clips: mean shares, the longest passage of all (with its clip), and how many
    clips hold a copied passage (a share above 0)."""
    done = [c for c in checks if c is not None]
    out: dict = {"n_clips": len(done)}
    for kind in ("exact", "near"):
        if not done:
            out[kind] = None
            continue
        longest = max(done, key=lambda c: c[kind]["longest_s"])
        out[kind] = {"mean_share": float(np.mean([c[kind]["share"] for c in done])),
                     "clips_with_copies": int(sum(c[kind]["share"] > 0 for c in done)),
                     "longest": dict(longest[kind], generated=longest.get("file"))}
    return out


def sign_flip_p(diffs: Sequence[float], n_random: int = 20000, seed: int = 0) -> float:
    """One-sided p-value of "the mean difference is above 0" by the paired sign-flip (permutation)
    test over independent units (prompts): under no difference each unit's difference is as likely
    negative as positive, so the observed mean is compared with the means of every pattern of
    flipped signs (all 2^n for n <= 16, else ``n_random`` random patterns, the observed one
    counted). Exact at any n; with n units the smallest possible p is 1 / 2^n."""
    d = np.asarray(diffs, dtype=np.float64)
    n = d.size
    if n == 0:
        return 1.0
    obs = d.mean()
    if n <= 16:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)[None, :]) & 1)
        return float(np.mean(signs @ d / n >= obs - 1e-12))
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(n_random, n))
    return float((np.sum(signs @ d / n >= obs - 1e-12) + 1) / (n_random + 1))


def compare(base: Sequence[dict], lora: Sequence[dict], prompt_ids: Sequence[int], *,
            n_boot: int = 2000, seed: int = 0, kind: str = "near", alpha: float = 0.05) -> dict:
    """LoRA against the base on the same (prompt, seed) pairs: the difference in copied share
    (``kind``) with its paired bootstrap interval over prompts (the clips of one prompt resampled
    together), and the verdict. "copies more than the base" needs both the interval above 0 and the
    exact sign-flip test over prompts (``sign_flip_p``, one-sided) at ``alpha``: so a fine-tune that
    copies no more than the base is flagged in at most ``alpha`` of evaluations at any number of
    prompts (the percentile bootstrap alone flags more often with few prompts;
    tests/scoring/test_copy_check.py simulates both). Below MIN_PROMPTS prompts no verdict."""
    a = np.array([c[kind]["share"] for c in base])
    b = np.array([c[kind]["share"] for c in lora])
    ids = np.asarray(prompt_ids)
    units = np.unique(ids)
    per_prompt = [float(np.mean(b[ids == u] - a[ids == u])) for u in units]
    r = intervals.paired_bootstrap_ci(a, b, clusters=list(ids), n_boot=n_boot, seed=seed)
    p = sign_flip_p(per_prompt, seed=seed)
    out = {"diff": r["diff"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
           "confidence": r["confidence"], "n_boot": r["n_boot"], "p_one_sided": p,
           "n_pairs": r["n"], "n_prompts": len(units), "measure": kind,
           "excludes_zero": bool(r["ci_low"] > 0 and p <= alpha),
           "what": f"LoRA minus base share of generated time inside {kind} copies of training "
                   f"audio; positive = the fine-tune reproduces its training audio more"}
    if len(units) < MIN_PROMPTS:
        out["verdict"] = "too few prompts"
        out["note"] = (f"{len(units)} prompt(s): the comparison needs at least {MIN_PROMPTS} "
                       f"(--num_prompts {MIN_PROMPTS} or more) to say whether the fine-tune copies "
                       f"more than the base")
    elif out["excludes_zero"]:
        out["verdict"] = "copies more than the base"
        out["note"] = ("the fine-tune reproduces passages of its training audio more than the base "
                       "model: train fewer epochs, add more data, or use a lower rank")
    else:
        out["verdict"] = "not above the base"
        out["note"] = "the fine-tune copies no more than the base model (within the evidence)"
    out["flag"] = out["verdict"] == "copies more than the base"
    return out


def copy_section(index: CopyIndex, codes: dict, clips: list, n_seeds: int, min_seconds: float,
                 n_boot: int, seed: int) -> dict:
    """The evaluation's copy check: every generated clip's codes (``codes[model][pair]``, None
    where generation failed) against the training set. Each clip's result goes into its entry of
    ``clips`` (the evaluation's clip list, under "copy"); returns the section of results.json:
    the index, each model's summary and, with base and LoRA, their comparison over the pairs both
    generated."""
    t0 = time.perf_counter()
    per = {m: [None if c is None else index.check(c, min_seconds) for c in codes[m]] for m in codes}
    for clip in clips:
        check = per.get(clip["model"], [None] * (clip["pair_index"] + 1))[clip["pair_index"]]
        if check is not None:
            check["file"] = clip.get("wav")
            clip["copy"] = check
    out: dict = {"index": index.describe(), "min_seconds": min_seconds,
                 "window_seconds": WINDOW_SECONDS, "agreement": AGREEMENT,
                 "what": (f"coarse EnCodec tokens of each generated clip against the training "
                          f"clips': exact = runs of equal tokens; near = {WINDOW_SECONDS:g}-s windows "
                          f"with at least {AGREEMENT:.0%} of the tokens equal at one alignment; share = "
                          f"generated time inside such passages of at least {min_seconds:g} s")}
    for m, checks in per.items():
        out[m] = summarize(checks)
    if "base" in per and "lora" in per:
        pairs = [j for j, (a, b) in enumerate(zip(per["base"], per["lora"])) if a and b]
        if len(pairs) >= 2:
            out["comparison"] = compare([per["base"][j] for j in pairs], [per["lora"][j] for j in pairs],
                                        [j // n_seeds for j in pairs], n_boot=n_boot, seed=seed)
    out["seconds"] = time.perf_counter() - t0
    return out


def training_index(records, model, processor, info, data_dir, batch_size: int = 8,
                   device=None) -> Optional[CopyIndex]:
    """The index of the training clips (split "train") of ``records``, from the token cache (built
    where missing: training normally built it); None when there are none."""
    train = [r for r in records if r.split == "train"]
    if not train:
        return None
    t0 = time.perf_counter()
    clips, _ = build_token_cache(train, model, processor, info, data_dir, batch_size=batch_size,
                                 device=device, text_states=False)
    index = CopyIndex.build([r.audio for r in train], [coarse_tokens(c.codes) for c in clips],
                            info.frame_rate)
    log.info("Copy check: index of %d training clip(s) (%.1f min of audio, %.1f MB) in %.1f s",
             index.n_clips, len(index.tokens) / info.frame_rate / 60, index.nbytes / 2 ** 20,
             time.perf_counter() - t0)
    return index
