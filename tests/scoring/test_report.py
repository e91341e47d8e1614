"""lora/scoring/report.py"""

from __future__ import annotations


def test_one_held_out_clip_names_no_winner():
    from lora.scoring.report import summary_rows

    def results(n):
        lk = {m: {"ce": ce, "ppl": 2.0 ** ce, "n_clips": n} for m, ce in (("base", 7.5), ("lora", 6.9))}
        lk["difference"] = {"diff": -0.6, "ci_low": -0.7, "ci_high": -0.5, "confidence": 0.95, "n": n}
        return {"models_evaluated": ["base", "lora"], "likelihood": lk}

    assert {r["better"] for r in summary_rows(results(1))} == {"too few clips"}
    assert summary_rows(results(5))[0]["better"] == "LoRA"
    wide = results(5)
    wide["likelihood"]["difference"].update(ci_low=-0.7, ci_high=0.1)
    assert summary_rows(wide)[0]["better"] == "unclear"
