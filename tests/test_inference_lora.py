"""The inference script (lora/inference_lora.py) end to end on the tiny models, CPU: the plan's
command from inside lora/ (in-process and as a subprocess), the files and manifest it writes,
prompts files, audio prompts, clear errors that write nothing, and what it does with the user's
files (no overwrite without the flag; a damaged adapter, a full disk or Ctrl-C are messages).

Token-level comparisons use the manifest's tokens_sha1, so they hold whatever the tiny codec sounds
like; audio comparisons check the files users get. The engine behind it:
tests/generation/test_engine.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lora.common.cli import UserError
from lora.common.fields import ConfigError
from tests.helpers import ROOT, SEED_PROMPT, SEED_SLUG, random_adapter, truncate


def _run(args):
    from lora import inference_lora

    return inference_lora.main([str(a) for a in args])


def _manifest(out_dir) -> dict:
    return json.loads((Path(out_dir) / "manifest.json").read_text(encoding="utf-8"))


def test_seed_command_from_inside_lora_writes_wav_and_manifest(tiny_model_dir, tiny_adapter_dir,
                                                               tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    (proj / "lora").mkdir(parents=True)
    shutil.copytree(tiny_adapter_dir, proj / "output" / "best_model")
    monkeypatch.chdir(proj / "lora")
    rc = _run(["--base_model_path", tiny_model_dir, "--lora_model_path", "../output/best_model",
               "--prompts", SEED_PROMPT, "--output_dir", "../output/generated", "--duration", "1.5"])
    assert rc == 0
    out = proj / "output" / "generated"
    wav = out / f"{SEED_SLUG}_s0.wav"
    data, sr = sf.read(wav, dtype="float32", always_2d=True)
    assert sr == 32000 and data.shape == (48000, 1) and sf.info(wav).subtype == "PCM_16"
    # peak-normalised to -1 dBFS, no clipping
    assert abs(np.abs(data).max() - 10 ** (-1 / 20)) < 1e-3
    entry = _manifest(out)["files"][0]
    assert entry["file"] == wav.name and entry["prompt"] == SEED_PROMPT and entry["seed"] == 0
    s = entry["settings"]
    assert (s["duration"], s["guidance_scale"], s["top_k"], s["temperature"], s["lora_scale"],
            s["merge"]) == \
        (1.5, 3.0, 250, 1.0, 1.0, True)
    assert entry["model"]["name_or_path"] == str(tiny_model_dir) and len(entry["model"]["identity"]) == 16
    weights = (proj / "output" / "best_model" / "adapter_model.safetensors").read_bytes()
    assert entry["adapter"]["path"] == str(proj / "output" / "best_model")
    assert entry["adapter"]["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert entry["duration_s"] == 1.5 and entry["channels"] == 1 and entry["generation_time_s"] > 0
    assert entry["real_time_factor"] == pytest.approx(entry["generation_time_s"] / 1.5, rel=1e-2)
    assert (out / "inference_config.yaml").is_file()


@pytest.mark.slow
def test_seed_command_as_a_subprocess_from_lora(tiny_model_dir, tiny_adapter_dir, tmp_path):
    out = tmp_path / "gen"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "inference_lora.py", "--base_model_path", str(tiny_model_dir),
           "--lora_model_path",
           os.path.relpath(tiny_adapter_dir, ROOT / "lora"), "--prompts", SEED_PROMPT, "--output_dir",
           str(out), "--duration", "0.5"]
    p = subprocess.run(cmd, cwd=ROOT / "lora", env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "real-time factor" in p.stdout
    assert sf.info(out / f"{SEED_SLUG}_s0.wav").frames == 16000


@pytest.mark.slow
def test_merge_flag_gives_the_same_audio_as_unmerged(tiny_model_dir, tiny_adapter_dir, tmp_path):
    common = ["--model_path", tiny_model_dir, "--lora_model_path", tiny_adapter_dir, "--prompts", "lofi piano",
              "--duration", "1", "--seed", "7", "--output_format", "float", "--normalize", "false",
              # merging is exact in fp32 (in bf16 W + BA is rounded once more)
              "--dtype", "float32"]
    assert _run(common + ["--merge", "--output_dir", tmp_path / "m"]) == 0
    assert _run(common + ["--merge", "false", "--output_dir", tmp_path / "u"]) == 0
    a, _ = sf.read(tmp_path / "m" / "lofi-piano_s7.wav", dtype="float32")
    b, _ = sf.read(tmp_path / "u" / "lofi-piano_s7.wav", dtype="float32")
    assert sf.info(tmp_path / "m" / "lofi-piano_s7.wav").subtype == "FLOAT"
    np.testing.assert_allclose(a, b, atol=1e-5)
    em, eu = _manifest(tmp_path / "m")["files"][0], _manifest(tmp_path / "u")["files"][0]
    assert em["settings"]["merge"] is True and eu["settings"]["merge"] is False
    assert em["tokens_sha1"] == eu["tokens_sha1"]


@pytest.mark.slow
def test_duration_60_writes_a_60_second_file(tiny_model_dir, tmp_path):
    assert _run(["--model_path", tiny_model_dir, "--lora_model_path", "none", "--prompts",
                 "long ambient pad", "--duration", "60", "--output_dir", tmp_path]) == 0
    info = sf.info(tmp_path / "long-ambient-pad_s0.wav")
    assert info.samplerate == 32000 and info.frames == 60 * 32000
    entry = _manifest(tmp_path)["files"][0]
    assert entry["windows"] == 3 and entry["frames"] == 3000 and entry["adapter"] is None


def test_many_prompts_samples_prompts_file_and_stereo(tiny_stereo_model_dir, tmp_path):
    pf = tmp_path / "prompts.jsonl"
    pf.write_text('{"text": "bright synth arpeggio", "duration": 0.5, "seed": 40, "num_samples": 2}\n'
                  '"lofi 中文 piano / é?!"\n', encoding="utf-8")
    out = tmp_path / "out"
    assert _run(["--model_path", tiny_stereo_model_dir, "--lora_model_path", "none", "--prompts",
                 "dark techno",
                 "--prompts_file", pf, "--duration", "0.7", "--num_samples", "1", "--batch_size", "2",
                 "--output_dir", out]) == 0
    files = {e["file"]: e for e in _manifest(out)["files"]}
    assert set(files) == {"dark-techno_s0.wav", "bright-synth-arpeggio_s40.wav",
                          "bright-synth-arpeggio_s41.wav", "lofi-中文-piano-é_s0.wav"}
    for name, e in files.items():
        info = sf.info(out / name)
        assert info.channels == 2 and e["channels"] == 2
        assert info.frames == round(e["settings"]["duration"] * 32000)
    a, b = files["bright-synth-arpeggio_s40.wav"], files["bright-synth-arpeggio_s41.wav"]
    assert a["tokens_sha1"] != b["tokens_sha1"]


def test_unconditional_generation_needs_the_flag(tiny_model_dir, tmp_path):
    base = ["--model_path", tiny_model_dir, "--lora_model_path", "none", "--output_dir", tmp_path,
            "--duration", "0.5"]
    with pytest.raises(ConfigError, match="No prompt given"):
        _run(base)
    with pytest.raises(ConfigError, match="empty"):
        _run(base + ["--prompts", "  "])
    assert _run(base + ["--unconditional"]) == 0
    assert sf.info(tmp_path / "unconditional_s0.wav").frames == 16000
    assert _manifest(tmp_path)["files"][0]["unconditional"] is True


@pytest.mark.parametrize("args, message", [
    (["--duration", "0"], "duration must be > 0"),
    (["--duration", "-3"], "duration must be > 0"),
    (["--duration", "7200"], "at most 3600"),
    (["--temperature", "0"], "temperature must be > 0"),
    (["--top_p", "1.5"], "top_p must be in"),
    (["--guidance_scale", "0.5"], "guidance_scale must be >= 1"),
    (["--extend_stride", "30"], "extend_stride"),
    (["--lora_model_path", "does/not/exist"], "adapter folder not found"),
    (["--audio_prompt", "nope.wav"], "audio_prompt file not found"),
])
def test_bad_settings_are_clear_errors_and_write_nothing(args, message, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    adapter = [] if "--lora_model_path" in args else ["--lora_model_path", "none"]
    with pytest.raises((ConfigError, UserError), match=message):
        _run(["--model_path", tiny_model_dir, *adapter, "--prompts", "x", "--output_dir", out] + args)
    assert not out.exists()


def test_prompts_file_errors_name_the_line_and_key(tmp_path, tiny_model_dir):
    pf = tmp_path / "p.jsonl"
    pf.write_text('{"text": "ok"}\n{"txt": "typo"}\n{"text": "x", "duration": "long"}\nnot json\n')
    with pytest.raises(ConfigError) as e:
        _run(["--model_path", tiny_model_dir, "--prompts_file", pf, "--output_dir", tmp_path / "o"])
    msg = str(e.value)
    assert "p.jsonl line 2: unknown key(s) 'txt'" in msg
    assert "p.jsonl line 3: 'duration' must be a number" in msg
    assert "p.jsonl line 4 is not valid JSON" in msg


def test_adapter_problems_are_named(tiny_model_dir, tiny_adapter_dir, tmp_path):
    base = ["--model_path", tiny_model_dir, "--prompts", "x", "--duration", "0.5", "--output_dir",
            tmp_path / "o"]
    empty = tmp_path / "empty_adapter"
    empty.mkdir()
    with pytest.raises(UserError, match="missing adapter_config.json, adapter_model.safetensors"):
        _run(base + ["--lora_model_path", empty])
    other = tmp_path / "other_adapter"
    shutil.copytree(tiny_adapter_dir, other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    # (a recorded base of another name loads when it fits; one of another family does not)
    cfg["base_model_name_or_path"] = "facebook/musicgen-melody"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError) as e:
        _run(base + ["--lora_model_path", other])
    assert "facebook/musicgen-melody" in str(e.value) and str(tiny_model_dir) in str(e.value)
    assert not (tmp_path / "o").exists()


def test_missing_default_adapter_falls_back_to_the_base_model(tiny_model_dir, tmp_path, monkeypatch,
                                                              caplog):
    from lora import config

    monkeypatch.setattr(config, "REPO_ROOT", tmp_path / "repo")
    monkeypatch.setattr(config, "DEFAULT_CONFIG", tmp_path / "repo" / "config.yaml")  # none there
    with caplog.at_level("WARNING", logger="lora"):
        assert _run(["--model_path", tiny_model_dir, "--prompts", "x", "--duration", "0.5"]) == 0
    assert "BASE MODEL ONLY" in caplog.text
    entry = _manifest(tmp_path / "repo" / "output" / "generated")["files"][0]
    assert entry["adapter"] is None


def test_nan_output_is_an_error_not_a_file(tiny_model_dir, tmp_path):
    bad = random_adapter(tiny_model_dir, tmp_path / "nan_adapter", fill=float("nan"))
    out = tmp_path / "out"
    with pytest.raises(UserError, match="NaN"):
        _run(["--model_path", tiny_model_dir, "--lora_model_path", bad, "--prompts", "x",
              "--duration", "0.5", "--output_dir", out])
    # no audio or manifest (only, at most, the ownership record of lora.common.ownership)
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".written_by_")]


@pytest.mark.slow
def test_existing_files_are_not_overwritten_without_flag(tiny_model_dir, tmp_path):
    base = ["--model_path", tiny_model_dir, "--lora_model_path", "none", "--duration", "0.5",
            "--output_dir", tmp_path]
    assert _run(base + ["--prompts", "lofi piano"]) == 0
    first, _ = sf.read(tmp_path / "lofi-piano_s0.wav", dtype="float32")
    with pytest.raises(UserError, match="already exist.*lofi-piano_s0.wav.*--overwrite"):
        _run(base + ["--prompts", "dark techno", "lofi piano"])
    assert not (tmp_path / "dark-techno_s0.wav").exists()  # checked before generating anything
    with pytest.raises(UserError, match="same prompt"):
        _run(base + ["--prompts", "dub", "dub", "--overwrite"])
    assert _run(base + ["--prompts", "dark techno", "lofi piano", "--overwrite", "--seed", "0"]) == 0
    again, _ = sf.read(tmp_path / "lofi-piano_s0.wav", dtype="float32")
    np.testing.assert_allclose(again, first, atol=1.5 / 32768)  # same seed, same music
    assert {e["file"] for e in _manifest(tmp_path)["files"]} == {"lofi-piano_s0.wav",
                                                                 "dark-techno_s0.wav"}


def test_audio_prompt_continuation_from_the_command_line(tiny_model_dir, tmp_path):
    t = np.arange(16000) / 32000
    sf.write(tmp_path / "intro.wav", (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), 32000)
    out = tmp_path / "out"
    args = ["--model_path", tiny_model_dir, "--lora_model_path", "none", "--prompts", "lofi piano",
            "--audio_prompt", tmp_path / "intro.wav", "--output_dir", out]
    with pytest.raises(UserError, match="does not reach past the audio prompt"):
        _run(args + ["--duration", "0.4"])
    assert _run(args + ["--duration", "1.0"]) == 0
    assert sf.info(out / "lofi-piano_s0.wav").frames == 32000
    entry = _manifest(out)["files"][0]
    assert entry["settings"]["audio_prompt"] == str(tmp_path / "intro.wav") and entry["frames"] == 50


@pytest.mark.slow
def test_a_truncated_adapter_is_a_message_in_inference_and_evaluation(short_run, tmp_path, tiny_model_dir,
                                                                        example_data_dir, monkeypatch):
    from lora import evaluate, inference_lora
    from lora.common.cli import UserError
    from lora.modeling import loading

    adapter = tmp_path / "adapter"
    shutil.copytree(short_run / "best_model", adapter)
    truncate(adapter / "adapter_model.safetensors")
    monkeypatch.setattr(loading, "load_base_model", lambda *a,
                        **k: pytest.fail("the model loaded before the check"))
    with pytest.raises(UserError, match="adapter_model.safetensors is damaged"):
        inference_lora.main(["--model_path", str(tiny_model_dir), "--lora_model_path", str(adapter),
                             "--prompts", "x", "--output_dir", str(tmp_path / "gen")])
    with pytest.raises(UserError, match="adapter_model.safetensors is damaged"):
        evaluate.main(["--model_path", str(tiny_model_dir), "--lora_model_path", str(adapter),
                       "--data_dir",
                       str(example_data_dir), "--output_dir", str(tmp_path / "ev"), "--compare"])
    assert not (tmp_path / "gen").exists() and not (tmp_path / "ev").exists()


# ------------------------------------------------------------------------------------------
# Inputs checked before the model loads; a full disk; Ctrl-C
# ------------------------------------------------------------------------------------------
def test_an_unreadable_audio_prompt_is_refused_before_the_model_loads(tmp_path, tiny_model_dir,
                                                                      monkeypatch):
    from lora import inference_lora
    from lora.common.cli import UserError
    from lora.modeling import loading

    bad = tmp_path / "intro.wav"
    bad.write_text("not audio")
    monkeypatch.setattr(loading, "load_base_model", lambda *a,
                        **k: pytest.fail("the model loaded before the check"))
    with pytest.raises(UserError, match=r"audio_prompt: .*intro.wav.*not a readable audio file"):
        inference_lora.main(["--model_path", str(tiny_model_dir), "--lora_model_path", "none",
                             "--prompts", "x",
                             "--audio_prompt", str(bad), "--output_dir", str(tmp_path / "gen")])


@pytest.mark.slow
def test_generation_checks_free_space_first_and_a_full_disk_is_a_message(small_disk, tiny_model_dir,
                                                                         tmp_path,
                                                                         monkeypatch, capsys):
    from lora import inference_lora
    from lora.common.cli import run_main

    args = ["--model_path", str(tiny_model_dir), "--lora_model_path", "none", "--prompts", "a", "b",
            "--duration", "20", "--output_format", "float", "--output_dir", str(small_disk / "gen")]
    rc = run_main(inference_lora.main, args)
    err = capsys.readouterr().err
    assert rc == 2 and "Not enough free disk space" in err and "2 WAV file(s) needs about" in err
    assert not (small_disk / "gen").exists() or not any((small_disk / "gen").iterdir())
    # past the estimate (it is skipped here), the disk fills up while writing: a message, not a
    # traceback
    (small_disk / "filler").write_bytes(b"\0" * 900_000)
    monkeypatch.setattr(inference_lora, "check_free_space", lambda *a, **k: None)
    rc = run_main(inference_lora.main, ["--model_path", str(tiny_model_dir), "--lora_model_path", "none",
                                        "--prompts", "a", "--duration", "2", "--output_format", "float",
                                        "--output_dir", str(small_disk / "gen2")])
    err = capsys.readouterr().err
    assert rc == 2 and "The disk is full" in err and "Traceback" not in err


def test_ctrl_c_in_generation_says_what_was_written(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from lora import inference_lora
    from lora.common.cli import run_main
    from lora.generation import engine

    real = engine._generate_batch
    calls = {"n": 0}

    def interrupt_second_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(engine, "_generate_batch", interrupt_second_batch)
    rc = run_main(inference_lora.main, ["--model_path", str(tiny_model_dir), "--lora_model_path", "none",
                                        "--prompts", "a", "b", "--batch_size", "1", "--duration", "0.3",
                                        "--output_dir", str(tmp_path / "gen")])
    err = capsys.readouterr().err
    assert rc == 130 and "1 of 2 file(s) were written" in err and "manifest.json" in err
    assert len(json.loads((tmp_path / "gen" / "manifest.json").read_text())["files"]) == 1
