"""lora/evaluate.py end to end on the tiny model: the held-out likelihood of base and adapter (the
trainer's own numbers, on the adapter's training window), the generated-audio metrics and files, the
report, the base model alone, and config errors collected at once. Its parts: tests/scoring/."""

from __future__ import annotations

import json
import math
import re

import pytest

from lora import evaluate
from lora.common.fields import ConfigError
from lora.scoring import generated, likelihood
from tests.helpers import make_tiny_clap


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_compare_report_html(compare_run):
    out, _, res = compare_run
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; lofi piano" in html
    audios = re.findall(r"<audio[^>]*src='([^']+)'", html)
    imgs = re.findall(r"<img[^>]*src='([^']+)'", html)
    # the generated clips (2 prompts x 2 seeds x 2 models), then the run's training samples
    # (issue 30: step 0 and the validations, copied beside the report)
    assert len([a for a in audios if a.startswith("audio/")]) == 8
    assert all(a.startswith(("audio/", "training_samples/")) for a in audios)
    spectros = [s for s in imgs if s.startswith("spectrograms/")]
    assert len(spectros) == 8
    for rel in audios + imgs:
        assert (out / rel).is_file(), rel
    assert "charts/likelihood.png" in imgs and "charts/distances.png" in imgs
    assert "charts/training_loss.png" in imgs  # the adapter's logs/metrics.jsonl was found
    assert (out / "config.yaml").is_file()  # the resolved config next to the results
    # the interval is rough
    assert any("4 held-out recordings (4 held-out clips)" in n for n in res["notes"])


@pytest.mark.slow
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
