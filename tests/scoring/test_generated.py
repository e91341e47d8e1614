"""The measurements of generated audio (lora.scoring.generated): failed clips are left out of the
distances for both models at once, so a model that fails more clips is not rewarded."""

from __future__ import annotations

import numpy as np

from lora.scoring import generated, metrics
from lora.scoring.report import summary_rows


def _frames(rng, shift, n=20, d=4):
    return rng.normal(shift, 1.0, size=(n, d))


def test_a_model_that_fails_more_clips_is_not_rewarded():
    """LoRA breaks its clips on the hard prompts (the ones no model gets close to the reference) and
    is a little worse than base on the easy ones. Scored each on its own passing clips, LoRA looks
    better (base carries its hard-prompt clips, LoRA dropped its own); scored both on the pairs that
    pass for both, base is better."""
    from lora.scoring import differences

    rng = np.random.default_rng(0)
    n_prompts, n_seeds = 10, 2
    hard = set(range(14, 20))  # pairs of prompts 7, 8 and 9
    ref = [{"encodec": _frames(rng, 0.0), "librosa": _frames(rng, 0.0)} for _ in range(40)]
    shift = {"base": lambda j: 3.0 if j in hard else 0.3, "lora": lambda j: 3.0 if j in hard else 0.6}
    emb = {m: [{"encodec": _frames(rng, shift[m](j)), "librosa": _frames(rng, shift[m](j))}
               for j in range(n_prompts * n_seeds)] for m in ("base", "lora")}
    ok = {"finite": True, "failures": []}
    checks = {"base": [dict(ok) for _ in range(20)],
              "lora": [{"finite": True, "failures": ["silent"]} if j in hard else dict(ok)
                       for j in range(20)]}
    transform = {"encodec": lambda x: x,
                 "librosa": metrics.standardizer(np.concatenate([r["librosa"] for r in ref]))}
    # the old rule: each model on its own usable clips
    own = {m: generated._distances([emb[m][j] for j in generated.usable_clips(checks[m])], ref, transform)
           for m in ("base", "lora")}
    for space in ("encodec", "librosa"):
        # the premise: LoRA would be rewarded
        assert own["lora"][space]["fad"] < own["base"][space]["fad"]
        assert own["lora"][space]["kad"]["value"] < own["base"][space]["kad"]["value"]
    family = differences.Family([j // n_seeds for j in range(20)], 1000, 0)
    scored = generated.score_generated(lambda m, idx: [emb[m][j] for j in idx], checks, ref,
                                       transform, n_seeds, True, 500, 0, family)
    scored["intervals"]["test"] = family.finish(scored["intervals"]["metrics"])
    assert scored["distance_set"]["n_pairs"] == 14
    assert scored["distance_set"]["pair_indices"] == list(range(14))
    assert scored["distance_set"]["n_usable_alone"] == {"base": 20, "lora": 14}
    for space in ("encodec", "librosa"):
        d = scored["distances"]
        assert d["base"][space]["n_clips"] == d["lora"][space]["n_clips"] == 14
        assert d["base"][space]["fad"] < d["lora"][space]["fad"]
        assert d["base"][space]["kad"]["value"] < d["lora"][space]["kad"]["value"]
    res = {"models_evaluated": ["base", "lora"], "likelihood": {},
           "generation": {"distances": scored["distances"], "intervals": scored["intervals"],
                          "signal": {"base": {"failure_rate": 0.0}, "lora": {"failure_rate": 6 / 20}}}}
    rows = {r["metric"]: r for r in summary_rows(res)}
    for metric in ("FAD (EnCodec latents)", "KAD ×100 (EnCodec)", "FAD (librosa features)",
                   "KAD ×100 (librosa)"):
        assert rows[metric]["better"] == "base", (metric, rows[metric])
    # the failures are counted apart, with their interval and test: three prompts' failures are
    # not evidence of a worse model (over prompts, a quarter of the sign patterns give the same)
    assert rows["failed clips (share)"]["better"] == "unclear"
    iv = scored["intervals"]
    assert iv["n_pairs"] == 14 and iv["n_boot_fad_kad"] == generated.GEN_BOOTSTRAP_MAX
    assert iv["metrics"]["encodec.fad"]["ci_low"] > 0 and iv["metrics"]["failed_share"]["n_pairs"] == 20
    assert iv["metrics"]["failed_share"]["p_adjusted"] >= 0.25 and iv["test"]["n_patterns"] == 512


def test_usable_clips_leave_failed_and_non_finite_out():
    checks = [{"finite": True, "failures": []}, {"finite": True, "failures": ["dc_offset"]},
              {"finite": False, "failures": ["non_finite"]},
              {"finite": True, "failures": ["silent", "clipping"]},
              {"finite": True, "failures": []}]
    assert generated.usable_clips(checks) == [0, 4]
    assert generated.usable_clips(checks, exclude_failed=False) == [0, 1, 3, 4]
