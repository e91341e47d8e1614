"""The report (lora.scoring.report): every user text escaped in report.html, players and
spectrograms linked side by side, and the summary table's verdicts: a winner is named only from its
test (lora.scoring.verdicts), never from one held-out clip or recording, never on the copy row."""

from __future__ import annotations

import math
import re

import pytest

from lora.scoring.report import format_table, render_html, summary_rows


# ------------------------------------------------------------------------------------ report (unit)
def _fake_results(caption: str) -> dict:
    return {
        "models_evaluated": ["base", "lora"],
        "identity": {"base": {"name_or_path": "<b>model</b>"},
                     "lora": {"path": "x\"><script>1</script>"}},
        "likelihood": {"base": {"ce": 5.0, "ppl": math.exp(5.0), "ce_per_codebook": [5.0, 5.0]},
                       "lora": {"ce": 4.5, "ppl": math.exp(4.5), "ce_per_codebook": [4.4, 4.6]},
                       "difference": {"diff": -0.5, "ci_low": -0.6, "ci_high": -0.4,
                                      "confidence": 0.95, "n": 10, "p_permutation": 0.004,
                                      "n_clips": 10, "n_recordings": 8}},
        "generation": {"prompts": [caption], "seeds": [0],
                       "clips": [{"model": m, "prompt_index": 0, "prompt": caption, "seed": 0,
                                  "wav": f"audio/{m}/p000_s0.wav",
                                  "spectrogram": f"spectrograms/{m}/p000_s0.png",
                                  "checks": {"failures": []}} for m in ("base", "lora")],
                       "signal": {},
                       "distances": {"base": {"encodec": {"fad": 2.0, "kad": {"value": 1.0}}},
                                                   "lora": {"encodec": {"fad": 1.0,
                                                                        "kad": {"value": 0.5}}}},
                       "intervals": {"metrics": {
                           "encodec.fad": {"diff": -1.0, "ci_low": -1.5, "ci_high": -0.5,
                                           "confidence": 0.95, "p_adjusted": 0.008, "n_units": 8,
                                           "n_boot": 200, "excludes_zero": True, "n_pairs": 8},
                           "encodec.kad": {"diff": -0.5, "ci_low": -0.9, "ci_high": 0.1,
                                           "confidence": 0.95, "p_adjusted": 0.3, "n_units": 8,
                                           "n_boot": 200, "excludes_zero": False, "n_pairs": 8}}},
                       "clap": {"skipped": "no <clap>"}},
        "settings": {"prompt": caption}, "versions": {},
    }


def test_report_escapes_every_user_text():
    evil = '<script>alert("pwned")</script> & lofi "beat"'
    res = _fake_results(evil)
    html = render_html(res, charts={})
    assert "<script>" not in html and "alert(\"pwned\")" not in html
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt; &amp; lofi" in html
    assert "<b>model</b>" not in html and "&lt;b&gt;model&lt;/b&gt;" in html
    assert "no &lt;clap&gt;" in html
    # players and spectrograms with relative links, side by side per prompt
    assert html.count("<audio controls") == 2 and "src='audio/base/p000_s0.wav'" in html
    assert "src='spectrograms/lora/p000_s0.png'" in html


def test_summary_rows_direction_and_table():
    rows = {r["metric"]: r for r in summary_rows(_fake_results("x"))}
    ce = rows["held-out cross-entropy (nats)"]
    assert ce["delta"] == pytest.approx(-0.5) and ce["better"] == "LoRA"
    assert "CI [-0.6000, -0.4000]" in ce["note"] and "n=10 clips from 8 recordings" in ce["note"]
    assert "permutation p 0.004 (over recordings; a winner needs <= 0.025)" in ce["note"]
    assert rows["held-out perplexity"]["better"] == "LoRA"
    assert rows["FAD (EnCodec latents)"]["better"] == "LoRA"  # its adjusted p is under 2.5%
    assert ("CI [-1.5000, -0.5000], n=8 (prompt, seed) pairs from 8 prompts, 200 resamples"
            in rows["FAD (EnCodec latents)"]["note"])
    assert rows["KAD ×100 (EnCodec)"]["better"] == "unclear"  # lower, but its adjusted p is 0.3
    table = format_table(summary_rows(_fake_results("x")))
    assert re.match(r"metric\s+\| base\s+\| LoRA\s+\| Δ\s+\| better\?", table.splitlines()[0])


def test_rows_name_a_winner_only_from_their_test():
    """FAD 1.036e-4 vs 1.029e-4 is no win unless its family-adjusted permutation p (over prompts)
    is at most 2.5% (the generated-audio rows' share of the summary's 5%), with at least 7 prompts;
    no test at all is "unclear" too. The held-out likelihood: its permutation p over recordings,
    with at least 7 recordings (one recording: its bootstrap has no width), and perplexity says
    what cross-entropy says (lora.scoring.verdicts)."""
    res = _fake_results("x")
    gen = res["generation"]
    gen["distances"] = {"base": {"encodec": {"fad": 1.036e-4}}, "lora": {"encodec": {"fad": 1.029e-4}}}
    gen["clap"] = {"base": {"mean": 0.20}, "lora": {"mean": 0.25}}
    gen["intervals"] = {"metrics": {
        "encodec.fad": {"diff": -7e-7, "ci_low": -2.1e-6, "ci_high": -1e-7, "confidence": 0.95,
                        "n_boot": 200, "excludes_zero": True, "n_pairs": 16, "p_adjusted": 0.06,
                        "n_units": 8},
        "clap": {"diff": 0.05, "ci_low": 0.01, "ci_high": 0.09, "confidence": 0.95, "n_boot": 2000,
                 "excludes_zero": True, "n_pairs": 16, "p_adjusted": 0.008, "n_units": 8}}}
    rows = {r["metric"]: r for r in summary_rows(res)}
    assert rows["FAD (EnCodec latents)"]["better"] == "unclear"  # its interval alone would say LoRA
    assert "CI [-2.100e-06, -1.000e-07]" in rows["FAD (EnCodec latents)"]["note"]
    assert rows["CLAP text-audio score"]["better"] == "LoRA"  # higher is better
    gen["intervals"]["metrics"]["clap"]["n_units"] = 5
    rows = {r["metric"]: r for r in summary_rows(res)}
    assert rows["CLAP text-audio score"]["better"] == "too few prompts: needs 7 (2 more)"
    del gen["intervals"]
    rows = {r["metric"]: r for r in summary_rows(res)}
    assert rows["FAD (EnCodec latents)"]["better"] == "unclear" and rows["CLAP text-audio "
                                                                         "score"]["better"] == "unclear"
    res["likelihood"]["difference"].update(n_recordings=1, ci_low=-0.5, ci_high=-0.5, p_permutation=1.0)
    rows = {r["metric"]: r for r in summary_rows(res)}
    assert rows["held-out cross-entropy (nats)"]["better"] == "too few recordings: needs 7 (6 more)"
    assert rows["held-out perplexity"]["better"] == rows["held-out cross-entropy (nats)"]["better"]
    res["likelihood"]["difference"].update(n_recordings=8, ci_low=-0.6, ci_high=0.1, p_permutation=0.2)
    rows = {r["metric"]: r for r in summary_rows(res)}
    assert rows["held-out cross-entropy (nats)"]["better"] == "unclear" == rows["held-out "
                                                                                "perplexity"]["better"]
    res["generation"] = {"skipped": "likelihood only"}  # the likelihood alone has the whole 5%
    res["likelihood"]["difference"].update(n_recordings=6, p_permutation=0.03)
    assert summary_rows(res)[0]["better"] == "LoRA"


