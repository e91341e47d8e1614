"""evaluate.py end to end on the tiny model + report.py (escaping, links) + config errors."""

from __future__ import annotations

import json
import math
import re
import pytest

from lora import evaluate
from lora.config import ConfigError
from lora.report import format_table, render_html, summary_rows


# ------------------------------------------------------------------------------------ report (unit)
def _fake_results(caption: str) -> dict:
    return {
        "models_evaluated": ["base", "lora"],
        "identity": {"base": {"name_or_path": "<b>model</b>"}, "lora": {"path": "x\"><script>1</script>"}},
        "likelihood": {"base": {"ce": 5.0, "ppl": math.exp(5.0), "ce_per_codebook": [5.0, 5.0]},
                       "lora": {"ce": 4.5, "ppl": math.exp(4.5), "ce_per_codebook": [4.4, 4.6]},
                       "difference": {"diff": -0.5, "ci_low": -0.6, "ci_high": -0.4, "confidence": 0.95, "n": 10}},
        "generation": {"prompts": [caption], "seeds": [0],
                       "clips": [{"model": m, "prompt_index": 0, "prompt": caption, "seed": 0,
                                  "wav": f"audio/{m}/p000_s0.wav", "spectrogram": f"spectrograms/{m}/p000_s0.png",
                                  "checks": {"failures": []}} for m in ("base", "lora")],
                       "signal": {}, "distances": {"base": {"encodec": {"fad": 2.0, "kad": {"value": 1.0}}},
                                                   "lora": {"encodec": {"fad": 1.0, "kad": {"value": 0.5}}}},
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
    assert "CI [-0.6000, -0.4000]" in ce["note"]
    assert rows["FAD (EnCodec latents)"]["better"] == "LoRA"
    table = format_table(summary_rows(_fake_results("x")))
    assert re.match(r"metric\s+\| base\s+\| LoRA\s+\| Δ\s+\| better\?", table.splitlines()[0])


# ------------------------------------------------------------------------------------ config / inputs
def test_user_errors_are_collected(tmp_path):
    with pytest.raises(ConfigError) as e:
        evaluate.main(["--compare", "--lora_model_path", str(tmp_path / "nope"), "--num_prompts", "0",
                       "--clap_model_path", str(tmp_path / "no_clap"), "--output_dir", str(tmp_path / "ev"),
                       "--guidance_scale", "0.5"])
    msg = str(e.value)
    assert "guidance_scale" in msg and "num_prompts" in msg and "no_clap" in msg and "nope" in msg and "does not exist" in msg
    assert not (tmp_path / "ev").exists()


def test_read_prompts_file_formats(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\nlofi piano\n\n  trap beat \n", encoding="utf-8")
    (tmp_path / "p.json").write_text(json.dumps(["a", {"prompt": "b"}]), encoding="utf-8")
    (tmp_path / "p.jsonl").write_text('{"text": "c"}\n"d"\n', encoding="utf-8")
    from lora.prompts import read_prompt_texts

    assert read_prompt_texts(tmp_path / "p.txt") == ["lofi piano", "trap beat"]
    assert read_prompt_texts(tmp_path / "p.json") == ["a", "b"]
    assert read_prompt_texts(tmp_path / "p.jsonl") == ["c", "d"]
    (tmp_path / "bad.json").write_text("[1]", encoding="utf-8")
    from lora.utils import UserError

    with pytest.raises(UserError, match="bad.json item 1"):
        read_prompt_texts(tmp_path / "bad.json")


def test_usable_clips_leave_failed_and_non_finite_out():
    checks = [{"finite": True, "failures": []}, {"finite": True, "failures": ["dc_offset"]},
              {"finite": False, "failures": ["non_finite"]}, {"finite": True, "failures": ["silent", "clipping"]},
              {"finite": True, "failures": []}]
    assert evaluate.usable_clips(checks) == [0, 4]
    assert evaluate.usable_clips(checks, exclude_failed=False) == [0, 1, 3, 4]


def test_choose_prompts_defaults_to_distinct_valid_captions(tmp_path):
    from lora.config import parse_config
    from lora.dataset import ClipRecord

    recs = [ClipRecord(id=str(i), audio=f"valid/{i}.wav", text=t, duration=4.0, split="valid")
            for i, t in enumerate(["a", "", "b", "a", "c"])]
    cfg, _ = parse_config(["--num_prompts", "2"], sections=("evaluation", "model", "generation", "data"))
    assert evaluate.choose_prompts(cfg, recs) == (["a", "b"], "valid captions")
    cfg, _ = parse_config(["--prompts", "x", "y", "z"], sections=("evaluation", "model", "generation", "data"))
    assert evaluate.choose_prompts(cfg, recs) == (["x", "y", "z"][:8], "--prompts")
    (tmp_path / "p.txt").write_text("q1\nq2\nq3\n", encoding="utf-8")
    cfg, _ = parse_config(["--prompts_file", str(tmp_path / "p.txt"), "--num_prompts", "2"],
                          sections=("evaluation", "model", "generation", "data"))
    assert evaluate.choose_prompts(cfg, recs) == (["q1", "q2"], str(tmp_path / "p.txt"))
    from lora.utils import UserError

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
                            # a random model's audio may fail signal checks; keep failed-but-finite clips in the
                            # distances so FAD/KAD are computed here whatever the checks say.
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
    assert d["n"] == n_valid and d["n_boot"] == 500
    assert d["diff"] == pytest.approx(lk["lora"]["ce"] - lk["base"]["ce"], abs=1e-9)
    assert d["ci_low"] <= d["diff"] <= d["ci_high"]
    # training lowered the held-out loss, so the adapter must be better here too, on every clip (interval < 0)
    assert lk["lora"]["ce"] < lk["base"]["ce"]
    assert d["ci_high"] < 0 and d["excludes_zero"] is True
    assert "* CLAP" not in stdout  # a CLAP model was given: no "skipped" note
    assert "held-out cross-entropy" in stdout and re.search(r"metric\s+\| base\s+\| LoRA\s+\| Δ\s+\| better\?", stdout)
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
        assert s["n_used_in_distances"] == 4  # all finite
        for c in (c for c in gen["clips"] if c["model"] == m):
            assert (out / c["wav"]).is_file() and (out / c["spectrogram"]).is_file()
            import soundfile as sf

            info = sf.info(str(out / c["wav"]))
            assert info.samplerate == 32000 and abs(info.duration - 1.0) < 0.01
    for floor in ("noise", "codec"):
        for space in ("encodec", "librosa"):
            f = gen["floors"][floor][space]
            assert f["fad"] >= 0 and math.isfinite(f["kad"]["value"])
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
    assert any("held-out clips" in n for n in res["notes"])  # 4 valid clips: the interval is flagged as rough


def test_single_model_likelihood_only(tmp_path, tiny_model_dir, example_data_dir, trained_output_dir, compare_run,
                                      capsys):
    """Without --compare: the base alone when no adapter is given; same base CE as the peft-disabled base above."""
    _, _, res = compare_run
    out = tmp_path / "ev"
    rc = evaluate.main(["--base_model_path", str(tiny_model_dir), "--lora_model_path", "none",
                        "--output_dir", str(out), "--data_dir", str(example_data_dir), "--skip_generation"])
    assert rc == 0
    r = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert r["models_evaluated"] == ["base"] and "difference" not in r["likelihood"]
    assert r["likelihood"]["base"]["ce"] == pytest.approx(res["likelihood"]["base"]["ce"], abs=1e-6)
    assert "skipped" in r["generation"]
    out_text = capsys.readouterr().out
    assert "held-out cross-entropy" in out_text and "* Generation metrics skipped" in out_text
    assert (out / "report.html").is_file()


def test_text_encoder_adapter_encodes_captions_on_the_fly(tiny_model_dir, example_data_dir):
    """An adapter with LoRA in T5 (train_text_encoder) must not be scored on the base's cached text states."""
    import torch

    from lora.config import LoraSection, ModelConfig
    from lora.dataset import build_token_cache, load_metadata
    from lora.adapter import text_encoder_has_lora, attach_lora
    from lora.loading import load_base_model

    cpu = torch.device("cpu")
    model, proc, info = load_base_model(ModelConfig(model_path=str(tiny_model_dir)))
    valid = load_metadata(example_data_dir, split="valid")
    clips, _ = build_token_cache(valid, model, proc, info, example_data_dir, show_progress=False)
    plain = evaluate.heldout_likelihood(model, clips, info, 1500, 2, cpu)
    assert not text_encoder_has_lora(model)
    torch.manual_seed(0)  # LoRA A init draws from the global generator
    peft = attach_lora(model, LoraSection(train_text_encoder=True))
    assert text_encoder_has_lora(peft)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name and "text_encoder" in name:
                p.normal_(0.0, 2.0)
    peft.eval()
    cached = evaluate.heldout_likelihood(peft, clips, info, 1500, 2, cpu)
    fly = evaluate.heldout_likelihood(peft, clips, info, 1500, 2, cpu, processor=proc)
    assert cached["ce"] == pytest.approx(plain["ce"], abs=1e-6)  # decoder LoRA is still zero: cache = base
    # the adapted T5 changes the condition (the random tiny decoder barely listens to text: small but far above
    # the float noise of recomputing the same thing, which is 0 here)
    change = abs(fly["ce"] - cached["ce"])
    assert change > 1e-6 and change > 100 * abs(cached["ce"] - plain["ce"])
    with peft.disable_adapter():
        base_fly = evaluate.heldout_likelihood(peft, clips, info, 1500, 2, cpu, processor=proc)
    assert base_fly["ce"] == pytest.approx(plain["ce"], abs=1e-5)


def test_spectrogram_png_with_hostile_title(tmp_path):
    import numpy as np

    from lora.report import save_spectrogram

    wav = (0.2 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000)).astype(np.float32)
    # "$\\undefinedcmd$" makes matplotlib's mathtext raise unless "$" is escaped
    p = save_spectrogram(wav, 16000, tmp_path / "s" / "x.png", r"lofi $\undefinedcmd$ beat, costs $5 <b>&")
    assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
