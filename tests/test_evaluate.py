"""evaluate.py end to end on the tiny model + report.py (escaping, links) + config errors."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from lora import evaluate
from lora.common.fields import ConfigError
from lora.scoring import generated, likelihood, metrics
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


def test_heldout_window_is_the_adapters_training_window(tmp_path, trained_output_dir, tiny_model_dir,
                                                        example_data_dir, compare_run):
    import shutil

    from lora.config import parse_config

    cfg, _ = parse_config([], sections=("evaluation", "model", "generation", "data"))
    adapter = tmp_path / "adapter"
    shutil.copytree(trained_output_dir / "best_model", adapter)
    text = (adapter / "config.yaml").read_text(encoding="utf-8")
    assert "max_duration: 30.0" in text
    (adapter / "config.yaml").write_text(text.replace("max_duration: 30.0", "max_duration: 1.5"),
                                         encoding="utf-8")
    seconds, source = likelihood.heldout_window(cfg, adapter)
    assert seconds == 1.5 and "adapter's training config" in source and str(adapter) in source
    # and evaluate scores that window (the example clips are 4 s: a 1.5 s window is a different
    # number)
    out = tmp_path / "ev"
    assert evaluate.main(["--base_model_path", str(tiny_model_dir), "--lora_model_path", str(adapter),
                          "--output_dir", str(out), "--data_dir", str(example_data_dir),
                          "--skip_generation", "--compare", "--bootstrap_samples", "200"]) == 0
    lk = json.loads((out / "results.json").read_text(encoding="utf-8"))["likelihood"]
    assert lk["window_seconds"] == pytest.approx(1.5, abs=0.02) and lk["window"]["source"] == source
    assert lk["lora"]["n_tokens"] < compare_run[2]["likelihood"]["lora"]["n_tokens"]
    (adapter / "config.yaml").unlink()
    seconds, source = likelihood.heldout_window(cfg, adapter)
    assert seconds == cfg.training.max_duration and source.startswith("config.yaml")
    assert likelihood.heldout_window(cfg, None) == (seconds, source)


# ------------------------------------------------------------------------------------ config / inputs
def test_user_errors_are_collected(tmp_path):
    with pytest.raises(ConfigError) as e:
        evaluate.main(["--compare", "--lora_model_path", str(tmp_path / "nope"), "--num_prompts", "0",
                       "--clap_model_path", str(tmp_path / "no_clap"), "--output_dir",
                       str(tmp_path / "ev"), "--guidance_scale", "0.5"])
    msg = str(e.value)
    assert all(w in msg for w in ("guidance_scale", "num_prompts", "no_clap", "nope", "does not exist"))
    assert not (tmp_path / "ev").exists()


def test_read_prompts_file_formats(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\nlofi piano\n\n  trap beat \n", encoding="utf-8")
    (tmp_path / "p.json").write_text(json.dumps(["a", {"prompt": "b"}]), encoding="utf-8")
    (tmp_path / "p.jsonl").write_text('{"text": "c"}\n"d"\n', encoding="utf-8")
    from lora.generation.prompts import read_prompt_texts

    assert read_prompt_texts(tmp_path / "p.txt") == ["lofi piano", "trap beat"]
    assert read_prompt_texts(tmp_path / "p.json") == ["a", "b"]
    assert read_prompt_texts(tmp_path / "p.jsonl") == ["c", "d"]
    (tmp_path / "bad.json").write_text("[1]", encoding="utf-8")
    from lora.common.cli import UserError

    with pytest.raises(UserError, match="bad.json item 1"):
        read_prompt_texts(tmp_path / "bad.json")


def test_usable_clips_leave_failed_and_non_finite_out():
    checks = [{"finite": True, "failures": []}, {"finite": True, "failures": ["dc_offset"]},
              {"finite": False, "failures": ["non_finite"]},
              {"finite": True, "failures": ["silent", "clipping"]},
              {"finite": True, "failures": []}]
    assert generated.usable_clips(checks) == [0, 4]
    assert generated.usable_clips(checks, exclude_failed=False) == [0, 1, 3, 4]


def test_choose_prompts_defaults_to_distinct_valid_captions(tmp_path):
    from lora.config import parse_config
    from lora.dataset import ClipRecord

    recs = [ClipRecord(id=str(i), audio=f"valid/{i}.wav", text=t, duration=4.0, split="valid")
            for i, t in enumerate(["a", "", "b", "a", "c"])]
    cfg, _ = parse_config(["--num_prompts", "2"], sections=("evaluation", "model", "generation", "data"))
    assert evaluate.choose_prompts(cfg, recs) == (["a", "b"], "valid captions")
    cfg, _ = parse_config(["--prompts", "x", "y", "z"],
                          sections=("evaluation", "model", "generation", "data"))
    assert evaluate.choose_prompts(cfg, recs) == (["x", "y", "z"][:8], "--prompts")
    (tmp_path / "p.txt").write_text("q1\nq2\nq3\n", encoding="utf-8")
    cfg, _ = parse_config(["--prompts_file", str(tmp_path / "p.txt"), "--num_prompts", "2"],
                          sections=("evaluation", "model", "generation", "data"))
    assert evaluate.choose_prompts(cfg, recs) == (["q1", "q2"], str(tmp_path / "p.txt"))
    from lora.common.cli import UserError

    cfg, _ = parse_config([], sections=("evaluation", "model", "generation", "data"))
    with pytest.raises(UserError, match="no captions"):
        evaluate.choose_prompts(cfg, [recs[1]])


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def compare_run(tmp_path_factory, tiny_model_dir, example_data_dir, trained_output_dir):
    from lora.dataset import load_metadata

    root = tmp_path_factory.mktemp("evaluation")
    valid_caption = next(r.text for r in load_metadata(example_data_dir, split="valid") if r.text)
    prompts = root / "prompts.txt"
    prompts.write_text(f"{valid_caption}\n<script>alert(1)</script> lofi piano\n", encoding="utf-8")
    from tests.test_metrics import make_tiny_clap

    clap = make_tiny_clap(root / "clap")
    out = root / "evaluation"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = evaluate.main(["--base_model_path", str(tiny_model_dir),
                            "--lora_model_path", str(trained_output_dir / "best_model"),
                            "--output_dir", str(out), "--compare", "--data_dir", str(example_data_dir),
                            "--num_prompts", "2", "--eval_duration", "1.0", "--eval_seeds", "2",
                            "--prompts_file", str(prompts), "--clap_model_path", str(clap),
                            "--bootstrap_samples", "500",
                            # a random model's audio may fail signal checks; keep failed-but-finite
                            # clips in the distances so FAD/KAD are computed here whatever the
                            # checks say.
                            "--exclude_failed_clips", "false"])
    assert rc == 0
    return out, buf.getvalue(), json.loads((out / "results.json").read_text(encoding="utf-8"))


def test_compare_heldout_likelihood(compare_run, trained_output_dir, example_data_dir):
    _, stdout, res = compare_run
    lk = res["likelihood"]
    from lora.dataset import load_metadata

    n_valid = len(load_metadata(example_data_dir, split="valid"))
    for m in ("base", "lora"):
        assert lk[m]["n_clips"] == n_valid and lk[m]["n_tokens"] > 0
        assert len(lk[m]["ce_per_codebook"]) == 4 and math.isfinite(lk[m]["ce"])
        assert lk[m]["ppl"] == pytest.approx(math.exp(lk[m]["ce"]))
    # Same numbers as the trainer's own held-out evaluation of this adapter and of the base model
    # (evaluate disables the adapter with peft for the base: one model in memory).
    ev = json.loads((trained_output_dir / "best_model" / "eval_results.json").read_text(encoding="utf-8"))
    assert lk["lora"]["ce"] == pytest.approx(ev["val_loss"], abs=1e-4)
    assert lk["base"]["ce"] == pytest.approx(ev["base_val_loss"], abs=1e-4)
    d = lk["difference"]
    assert d["n"] == d["n_clips"] == n_valid and d["n_boot"] == 500
    # every example clip is a recording of its own
    assert d["n_recordings"] == lk["n_recordings"] == n_valid
    # best_model/config.yaml
    assert lk["window"]["source"].startswith("the adapter's training config")
    assert lk["window_seconds"] == lk["window"]["max_duration"] == 30.0
    assert d["diff"] == pytest.approx(lk["lora"]["ce"] - lk["base"]["ce"], abs=1e-9)
    assert d["ci_low"] <= d["diff"] <= d["ci_high"]
    # training lowered the held-out loss, so the adapter must be better here too, on every clip
    # (interval < 0)
    assert lk["lora"]["ce"] < lk["base"]["ce"]
    assert d["ci_high"] < 0 and d["excludes_zero"] is True
    assert "* CLAP" not in stdout  # a CLAP model was given: no "skipped" note
    assert "held-out cross-entropy" in stdout and re.search(r"metric\s+\| base\s+\| LoRA\s+\| "
                                                            r"Δ\s+\| better\?", stdout)
    assert res["identity"]["lora"]["weights_sha256"] and res["identity"]["base"]["identity"]
    assert res["versions"]["torch"] and res["settings"]["evaluation"]["num_prompts"] == 2


def test_compare_generation_metrics_and_files(compare_run):
    out, stdout, res = compare_run
    gen = res["generation"]
    assert gen["seeds"] == [0, 1] and len(gen["prompts"]) == 2
    assert len(gen["clips"]) == 2 * 2 * 2
    assert gen["exclude_failed_clips"] is False
    for m in ("base", "lora"):
        s = gen["signal"][m]
        assert s["n"] == 4 and 0.0 <= s["failure_rate"] <= 1.0
        assert s["n_used_in_distances"] == s["n_usable_alone"] == 4  # all finite
        for c in (c for c in gen["clips"] if c["model"] == m):
            assert (out / c["wav"]).is_file() and (out / c["spectrogram"]).is_file()
            import soundfile as sf

            info = sf.info(str(out / c["wav"]))
            assert info.samplerate == 32000 and abs(info.duration - 1.0) < 0.01
    n_ref = gen["reference"]["n_clips"]
    # what each floor is made of (their size: tests/test_metrics.py)
    for space in ("encodec", "librosa"):
        noise, codec = gen["floors"]["noise"][space], gen["floors"]["codec"][space]
        assert (noise["n_clips"], noise["n_reference_clips"]) == ((n_ref + 1) // 2, n_ref // 2)
        assert codec["n_clips"] == codec["n_reference_clips"] == n_ref
    # one set for both models, named in results.json; every difference with its paired interval
    ds = gen["distance_set"]
    assert ds["n_pairs"] == ds["n_pairs_generated"] == 4 and ds["pairs"] == [[0, 0], [0, 1], [1, 0],
                                                                             [1, 1]]
    assert all(c.get("used_in_distances") for c in gen["clips"])
    iv = gen["intervals"]
    # capped: 500 asked
    assert iv["n_pairs"] == 4 and iv["n_boot_fad_kad"] == generated.GEN_BOOTSTRAP_MAX
    keys = {"encodec.fad", "encodec.kad", "librosa.fad", "librosa.kad", "librosa.kad_clip_statistics",
            "failed_share", "clap"}
    assert set(iv["metrics"]) == keys
    rows = {r["metric"]: r for r in res["summary"]}
    for metric, key in (("FAD (EnCodec latents)", "encodec.fad"), ("KAD ×100 (librosa)", "librosa.kad"),
                        ("CLAP text-audio score", "clap")):
        m = iv["metrics"][key]
        assert m["ci_low"] <= m["ci_high"] and m["n_pairs"] == 4 and m["n_units"] == 2
        assert 0 < m["p_adjusted"] <= 1 and m["p_permutation"] <= m["p_adjusted"]
        # two prompts: no test could name a winner (lora.scoring.verdicts)
        assert rows[metric]["better"] == "too few prompts: needs 7 (5 more)", (metric, rows[metric])
    assert iv["test"]["n_units"] == 2 and iv["test"]["exact"] and iv["test"]["n_patterns"] == 2
    for m in ("base", "lora"):
        dist = gen["distances"][m]
        assert dist is not None, f"{m}: no clip passed the signal checks: {gen['signal'][m]}"
        for space in ("encodec", "librosa"):
            assert dist[space]["fad"] >= 0 and dist[space]["n_clips"] >= 2
            assert dist[space]["n_reference_clips"] == res["generation"]["reference"]["n_clips"]
        assert gen["diversity"][m]["across_seeds"] is not None
    clap = gen["clap"]
    assert "skipped" not in clap
    for m in ("base", "lora"):
        assert -1 <= clap[m]["mean"] <= 1 and clap[m]["shuffled_mean"] is not None
    assert clap["reference"]["n"] >= 1


def test_compare_report_html(compare_run):
    out, _, res = compare_run
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; lofi piano" in html
    audios = re.findall(r"<audio[^>]*src='([^']+)'", html)
    imgs = re.findall(r"<img[^>]*src='([^']+)'", html)
    assert len(audios) == 8
    spectros = [s for s in imgs if s.startswith("spectrograms/")]
    assert len(spectros) == 8
    for rel in audios + imgs:
        assert (out / rel).is_file(), rel
    assert "charts/likelihood.png" in imgs and "charts/distances.png" in imgs
    assert "charts/training_loss.png" in imgs  # the adapter's logs/metrics.jsonl was found
    assert (out / "config.yaml").is_file()  # the resolved config next to the results
    # the interval is rough
    assert any("4 held-out recordings (4 held-out clips)" in n for n in res["notes"])


def test_single_model_likelihood_only(tmp_path, tiny_model_dir, example_data_dir,
                                      trained_output_dir, compare_run, capsys, caplog):
    """Without --compare: the base alone when no adapter is given; same base CE as the peft-disabled
    base above."""
    import logging
    import platform

    _, _, res = compare_run
    out = tmp_path / "ev"
    lora_log = logging.getLogger("lora")
    # (setup_logging stops "lora" from propagating to the root logger)
    lora_log.addHandler(caplog.handler)
    try:
        rc = evaluate.main(["--base_model_path", str(tiny_model_dir), "--lora_model_path", "none",
                            "--output_dir", str(out), "--data_dir", str(example_data_dir),
                            "--skip_generation"])
    finally:
        lora_log.removeHandler(caplog.handler)
    assert rc == 0
    # a CPU run keeps freed memory (lora.modeling.cpu_speed.keep_freed_memory)
    if platform.libc_ver()[0] == "glibc":
        assert "CPU memory: freed tensors stay in the process" in caplog.text
    r = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert r["models_evaluated"] == ["base"] and "difference" not in r["likelihood"]
    assert r["likelihood"]["base"]["ce"] == pytest.approx(res["likelihood"]["base"]["ce"], abs=1e-6)
    assert "skipped" in r["generation"]
    out_text = capsys.readouterr().out
    assert "held-out cross-entropy" in out_text and "* Generation metrics skipped" in out_text
    assert (out / "report.html").is_file()


def test_text_encoder_adapter_encodes_captions_on_the_fly(tiny_model_dir, example_data_dir):
    """An adapter with LoRA in T5 (train_text_encoder) must not be scored on the base's cached text
    states."""
    import torch

    from lora.config import LoraSection, ModelConfig
    from lora.dataprep.token_cache import build_token_cache
    from lora.dataset import load_metadata
    from lora.modeling.adapter import attach_lora, text_encoder_has_lora
    from lora.modeling.loading import load_base_model

    cpu = torch.device("cpu")
    model, proc, info = load_base_model(ModelConfig(model_path=str(tiny_model_dir)))
    valid = load_metadata(example_data_dir, split="valid")
    clips, _ = build_token_cache(valid, model, proc, info, example_data_dir, show_progress=False)
    plain = likelihood.heldout_likelihood(model, clips, info, 1500, 2, cpu)
    assert not text_encoder_has_lora(model)
    torch.manual_seed(0)  # LoRA A init draws from the global generator
    peft = attach_lora(model, LoraSection(train_text_encoder=True))
    assert text_encoder_has_lora(peft)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name and "text_encoder" in name:
                p.normal_(0.0, 2.0)
    peft.eval()
    cached = likelihood.heldout_likelihood(peft, clips, info, 1500, 2, cpu)
    fly = likelihood.heldout_likelihood(peft, clips, info, 1500, 2, cpu, processor=proc)
    # decoder LoRA is still zero: cache = base
    assert cached["ce"] == pytest.approx(plain["ce"], abs=1e-6)
    # the adapted T5 changes the condition (the random tiny decoder barely listens to text: small
    # but far above the float noise of recomputing the same thing, which is 0 here)
    change = abs(fly["ce"] - cached["ce"])
    assert change > 1e-6 and change > 100 * abs(cached["ce"] - plain["ce"])
    with peft.disable_adapter():
        base_fly = likelihood.heldout_likelihood(peft, clips, info, 1500, 2, cpu, processor=proc)
    assert base_fly["ce"] == pytest.approx(plain["ce"], abs=1e-5)


def test_spectrogram_png_with_hostile_title(tmp_path):
    import numpy as np

    from lora.scoring.plots import save_spectrogram

    wav = (0.2 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000)).astype(np.float32)
    # "$\\undefinedcmd$" makes matplotlib's mathtext raise unless "$" is escaped
    p = save_spectrogram(wav, 16000, tmp_path / "s" / "x.png",
                         r"lofi $\undefinedcmd$ beat, costs $5 <b>&")
    assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lora_scale_zero_is_exactly_the_base_model_for_dora(tmp_path, tiny_model_dir, example_data_dir):
    """peft's set_scale(0) zeroes B·A but DoRA's magnitude vector still rescales every adapted
    weight: set_lora_scale(0) switches the adapter off instead, so scale 0 is the base model exactly
    (held-out logits and generated audio, merged or not, and after evaluate's disable_adapter()
    context), and scale 1 is not."""
    import torch
    from peft.tuners.lora import LoraLayer

    from lora.config import LoraSection, ModelConfig, parse_config
    from lora.dataprep.token_cache import build_token_cache
    from lora.dataset import load_metadata
    from lora.generation.model import load_generation_model
    from lora.modeling.adapter import attach_lora, set_lora_scale
    from lora.modeling.loading import load_base_model

    cpu = torch.device("cpu")
    model, proc, info = load_base_model(ModelConfig(model_path=str(tiny_model_dir)))
    clips, _ = build_token_cache(load_metadata(example_data_dir, split="valid"), model, proc, info,
                                 example_data_dir, show_progress=False)

    def per_clip(m):
        return [c["ce"] for c in likelihood.heldout_likelihood(m, clips, info, 200, 2, cpu)["per_clip"]]

    base = per_clip(model)
    torch.manual_seed(0)
    peft = attach_lora(model, LoraSection(use_dora=True))
    # a "trained" DoRA adapter: B non-zero, magnitudes away from the weight norms
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
            elif "lora_magnitude_vector" in name:
                p.mul_(1.5)
    peft.eval()
    full = per_clip(peft)
    assert max(abs(a - b) for a, b in zip(full, base)) > 1e-3
    for module in peft.modules():  # peft's own scale 0 (the old set_lora_scale): not the base model
        if isinstance(module, LoraLayer):
            module.set_scale("default", 0.0)
    assert max(abs(a - b) for a, b in zip(per_clip(peft), base)) > 1e-4
    set_lora_scale(peft, 0.0)
    assert per_clip(peft) == base  # exactly
    with peft.disable_adapter():  # evaluate's base context must not bring the adapter back on exit
        pass
    assert per_clip(peft) == base
    set_lora_scale(peft, 1.0)
    assert per_clip(peft) == pytest.approx(full, abs=1e-6)

    # generation: the saved adapter at lora_scale 0, unmerged and merged, makes the base model's
    # audio
    peft.save_pretrained(tmp_path / "dora")
    argv = ["--base_model_path", str(tiny_model_dir), "--dtype", "float32", "--do_sample", "false",
            "--eval_duration", "0.3"]
    sections = ("evaluation", "model", "generation", "data")
    cfg, _ = parse_config(argv, sections=sections)
    ref_model, ref_proc, _, _ = load_generation_model(cfg, device="cpu", adapter_path=None)
    want = generated.generate_clips(ref_model, ref_proc, info, "base", ["lofi piano"], [0], cfg)[0]
    for scale, merge in (("0", "false"), ("0", "true"), ("1", "false")):
        cfg, _ = parse_config(argv + ["--lora_model_path", str(tmp_path / "dora"), "--lora_scale", scale,
                                      "--merge", merge], sections=sections)
        m, p, _, adapter_info = load_generation_model(cfg, device="cpu")
        assert adapter_info["scale"] == float(scale) and adapter_info["merged"] == (merge == "true")
        got = generated.generate_clips(m, p, info, "lora", ["lofi piano"], [0], cfg)[0]
        if scale == "0":
            assert np.array_equal(got, want), (scale, merge)
        else:
            assert not np.allclose(got, want, atol=1e-4)
