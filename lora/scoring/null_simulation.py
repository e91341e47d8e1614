"""Simulated evaluations run through the evaluation's own functions (``likelihood_difference``,
``score_generated``, ``differences``, ``summary_rows``): the check that the summary names any
winner at most ``verdicts.ALPHA`` (5%) of the time when nothing differs, and that it finds a real
difference (tests/scoring/test_verdicts.py; bench/bench_verdicts.py runs it long).

What is simulated is what made the earlier intervals name too many winners:

* held-out clips cut from recordings: the clips of one recording share a recording-level difference
  between the models (a share ``rho`` of its variance), and hold different numbers of tokens;
* generated clips of one prompt share a prompt-level model effect (its seeds correlate at ``rho``),
  in their embeddings (EnCodec and librosa stand-ins), their CLAP scores and their failures;
* "no difference" (``effect`` 0): the two models' outputs are exchangeable, drawn from one
  distribution; ``effect`` > 0 moves LoRA's clips toward the reference, its CLAP scores up and its
  held-out cross-entropy down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lora.scoring import differences, metrics, verdicts
from lora.scoring.generated import score_generated
from lora.scoring.likelihood import likelihood_difference
from lora.scoring.report import summary_rows


@dataclass
class Scenario:
    """One kind of evaluation: the evaluation's defaults are 8 prompts x 2 seeds."""

    prompts: int = 8
    seeds: int = 2
    recordings: int = 10
    clips_per_recording: int = 3
    rho: float = 0.8          # share of the variance at the prompt / recording level
    generation: bool = True   # False: --skip_generation (the held-out likelihood alone)
    clap: bool = True
    effect: float = 0.0       # 0 = no true difference
    fail: float = 0.1         # mean share of clips failing a signal check
    frames: int = 10          # embedding frames per clip
    dims: int = 4
    n_boot: int = 100         # bootstrap resamples of the intervals (shown, not used by verdicts)
    permutations: int = verdicts.DEFAULT_PATTERNS
    # the unit the tests swap: "recording/prompt" as the evaluation does; "clip/pair" treats every
    # held-out clip and every (prompt, seed) pair as independent (the mistake the tests must catch)
    units: str = "recording/prompt"


def _likelihood(s: Scenario, rng: np.random.Generator) -> dict:
    clips = s.recordings * s.clips_per_recording
    rec = np.repeat(np.arange(s.recordings), s.clips_per_recording)
    level = rng.normal(size=s.recordings)[rec]
    ce = {}
    for m, shift in (("base", 0.0), ("lora", -s.effect * 0.05)):
        model_rec = rng.normal(size=s.recordings)[rec] * math.sqrt(s.rho)
        model_clip = rng.normal(size=clips) * math.sqrt(1 - s.rho)
        ce[m] = 5.0 + 0.3 * level + 0.05 * (model_rec + model_clip) + shift
    tokens = rng.integers(200, 400, size=clips)
    keys = rec.tolist() if s.units == "recording/prompt" else [None] * clips
    diff = likelihood_difference(ce["base"].tolist(), ce["lora"].tolist(), tokens.tolist(), keys,
                                 n_boot=s.n_boot, seed=0, max_patterns=s.permutations)
    out = {m: {"ce": float(np.sum(tokens * ce[m]) / tokens.sum())} for m in ce}
    for m in out:
        out[m]["ppl"] = math.exp(out[m]["ce"])
        out[m]["n_clips"] = clips
    out["difference"] = diff
    return out


def _clip_means(s: Scenario, rng: np.random.Generator, dims: int) -> dict:
    """Per model, the mean of each (prompt, seed) pair's frames, prompt-major."""
    content = np.repeat(rng.normal(size=(s.prompts, dims)), s.seeds, axis=0)
    out = {}
    for m, pull in (("base", 1.0), ("lora", 1.0 - s.effect)):
        prompt_level = np.repeat(rng.normal(size=(s.prompts, dims)), s.seeds, axis=0)
        pair_level = rng.normal(size=(s.prompts * s.seeds, dims))
        shared = math.sqrt(s.rho) * prompt_level + math.sqrt(1 - s.rho) * pair_level
        out[m] = pull * (content + shared)
    return out


def _generated(s: Scenario, rng: np.random.Generator) -> dict:
    n = s.prompts * s.seeds
    means = {space: _clip_means(s, rng, s.dims) for space in ("encodec", "librosa")}
    emb = {m: [{space: means[space][m][j] + 0.5 * rng.normal(size=(s.frames, s.dims))
                for space in means} for j in range(n)] for m in ("base", "lora")}
    ref = [{space: rng.normal(size=(s.frames, s.dims)) for space in means} for _ in range(12)]
    transform = {"encodec": lambda x: x,
                 "librosa": metrics.standardizer(np.concatenate([r["librosa"] for r in ref]))}
    risk = np.repeat(rng.uniform(0, 2 * s.fail, size=s.prompts), s.seeds)
    checks = {m: [{"finite": True, "failures": ["silent"] if rng.random() < risk[j] else []}
                  for j in range(n)] for m in ("base", "lora")}
    per_prompt = s.units == "recording/prompt"
    units = [j // s.seeds if per_prompt else j for j in range(n)]
    family = differences.Family(units, s.permutations, 0)
    gen = score_generated(lambda m, idx: [emb[m][j] for j in idx], checks, ref, transform, s.seeds,
                          True, s.n_boot, 0, family)
    gen["signal"] = {m: {"failure_rate": float(np.mean([bool(c["failures"]) for c in checks[m]]))}
                     for m in checks}
    shared = gen["distance_set"]["pair_indices"]
    if s.clap and gen["intervals"] is not None and len(shared) >= 2:
        topic = np.repeat(rng.normal(size=s.prompts), s.seeds)
        score = {}
        for m, shift in (("base", 0.0), ("lora", 0.05 * s.effect)):
            level = np.repeat(rng.normal(size=s.prompts), s.seeds) * math.sqrt(s.rho)
            pair = rng.normal(size=n) * math.sqrt(1 - s.rho)
            score[m] = 0.2 + 0.05 * (topic + level + pair) + shift
        gen["clap"] = {m: {"mean": float(np.mean(score[m][shared]))} for m in score}
        gen["intervals"]["metrics"]["clap"] = differences.paired_row(
            family, "clap", score["base"][shared].tolist(), score["lora"][shared].tolist(), shared,
            s.n_boot, 0, "CLAP")
    if gen["intervals"] is not None:
        gen["intervals"]["test"] = family.finish(gen["intervals"]["metrics"])
    return gen


def simulate(s: Scenario, seed: int) -> list[dict]:
    """The summary rows of one simulated evaluation (seeded)."""
    rng = np.random.default_rng(seed)
    results = {"models_evaluated": ["base", "lora"], "likelihood": _likelihood(s, rng)}
    results["generation"] = _generated(s, rng) if s.generation else {"skipped": "likelihood only"}
    return summary_rows(results)


def winners(rows: list[dict]) -> set:
    """The models the summary names better on some row."""
    return {r["better"] for r in rows if r["better"] in ("LoRA", "base")}


def run(s: Scenario, n: int, seed: int = 0) -> dict:
    """``n`` simulated evaluations: the share naming any winner with its Monte-Carlo standard error,
    the share naming LoRA (and never base), and the number of rows with a test."""
    any_winner = lora_only = 0
    rows = None
    for i in range(n):
        rows = simulate(s, seed * 1_000_003 + i)
        w = winners(rows)
        any_winner += bool(w)
        lora_only += w == {"LoRA"}
    share = any_winner / n
    tested = [r["metric"] for r in rows or []
              if r["lower_is_better"] is not None and r["delta"] is not None]
    return {"n": n, "any_winner": share, "mc_error": math.sqrt(max(share * (1 - share), 1e-12) / n),
            "lora_named": lora_only / n, "rows_with_a_verdict": tested}
