"""What the toolkit used to accept without a word now gets a warning or a refusal, named in the data
check and in prepare_report.json: audio with nothing audible (a 1 Hz tone, a DC offset), clips
shorter than one codec frame, a sample rate other than MusicGen's, a JSON sidecar whose text is not
text, control characters in captions; and one rule for repeated metadata entries, repeated YAML
keys, contradicting precision flags, and Ctrl-C notes that name only what exists."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from lora import prepare_data
from lora.common import cli
from lora.common.cli import UserError, run_main
from lora.common.fields import ConfigError

SR = 32000


@pytest.fixture(autouse=True)
def fresh_log_handlers():
    saved = cli.log.handlers[:]
    cli.log.handlers.clear()
    yield
    cli.log.handlers[:] = saved


def _music(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    return (0.1 * sum(np.sin(2 * np.pi * f * t) for f in rng.uniform(100, 1500, 3))).astype(np.float32)


def test_inaudible_and_too_short_audio_and_odd_captions_are_named_in_the_report(tmp_path, capsys):
    d = tmp_path / "music"
    d.mkdir()
    t = np.arange(60 * SR) / SR
    for i in range(2):
        sf.write(d / f"song{i}.wav", _music(6, i), SR)
    sf.write(d / "infrasound.wav", (0.5 * np.sin(2 * np.pi * 1.0 * t)).astype(np.float32), SR)
    sf.write(d / "dc.wav", np.full(6 * SR, 0.4, np.float32), SR)
    sf.write(d / "click.wav", _music(0.01, 5), SR)  # 10 ms: less than one 20 ms codec frame
    (d / "song0.json").write_text(json.dumps({"text": 5}))
    (d / "song1.txt").write_text("lofi\x00 piano \x1b[31mred\x07")
    out = tmp_path / "data"
    assert prepare_data.main(["--input_dir", str(d), "--output_dir", str(out), "--num_workers", "1",
                              "--min_seconds", "0", "--trim_silence", "false"]) == 0
    report = json.loads((out / "prepare_report.json").read_text())
    skipped = {s["file"]: s["reason"] for s in report["skipped"]}
    assert "no audible sound" in skipped["infrasound.wav"] and "no audible sound" in skipped["dc.wav"]
    assert "shorter than one codec frame" in skipped["click.wav"]
    warnings = {(w["file"], w["warning"].split(";")[0]) for w in report["warnings"]}
    assert ("song0.wav", "caption file song0.json: its 'text' is not text") in warnings
    assert any(f == "song1.wav" and "control character" in w for f, w in warnings)
    captions = {c["source"]: c["text"] for c in json.loads((out / "metadata.json").read_text())["clips"]}
    assert captions["song1.wav"] == "lofi piano [31mred"
    # a sample rate other than MusicGen's: the data check says so
    capsys.readouterr()
    assert prepare_data.main(["--input_dir", str(d), "--output_dir", str(tmp_path / "d16"),
                              "--num_workers", "1", "--sample_rate", "16000"]) == 0
    assert "the clips are 16000 Hz; MusicGen runs at 32000 Hz" in capsys.readouterr().out
    # the data check of a hand-made folder reads every clip: an inaudible one is a problem
    meta = json.loads((out / "metadata.json").read_text())
    sf.write(out / meta["clips"][0]["audio"], np.full(SR, 0.4, np.float32), SR)
    assert prepare_data.main(["--validate", "--data_dir", str(out)]) == 1
    assert "no audible sound" in capsys.readouterr().out


def test_repeated_metadata_entries_are_refused_by_every_reader(tmp_path, tiny_model_dir, example_data_dir):
    from lora import test_dataset, train_lora

    data = tmp_path / "data"
    shutil.copytree(example_data_dir, data, ignore=shutil.ignore_patterns("cache"))
    meta = json.loads((data / "metadata.json").read_text())
    meta["clips"].append(dict(meta["clips"][0]))
    (data / "metadata.json").write_text(json.dumps(meta))
    for main, argv in ((train_lora.main, ["--model_path", str(tiny_model_dir), "--output_dir",
                                          str(tmp_path / "o"), "--max_steps", "1"]),
                       (test_dataset.main, [])):
        with pytest.raises(UserError, match="is listed 2 times"):
            main(["--data_dir", str(data), *argv])


def test_repeated_yaml_keys_and_contradicting_precision_flags_are_refused(tmp_path):
    from lora.config import parse_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("training:\n  seed: 1\n  batch_size: 2\n  seed: 2\n")
    with pytest.raises(ConfigError, match="'seed' is given twice .first on line 2"):
        parse_config(["--config", str(cfg)])
    cfg.write_text("training:\n  seed: 1\ntraining:\n  batch_size: 2\n")
    with pytest.raises(ConfigError, match="'training' is given twice"):
        parse_config(["--config", str(cfg)])
    with pytest.raises(ConfigError, match="--fp16 asks for fp16, but training.mixed_precision is 'no'"):
        parse_config(["--mixed_precision", "no", "--fp16"], sections=("training",))


def test_ctrl_c_notes_name_only_what_exists(tmp_path, monkeypatch, capsys, tiny_model_dir, example_data_dir):
    from lora import inference_lora, train_lora
    from lora.dataprep import worker
    from lora.generation import engine

    def ctrl_c(*a, **kw):
        raise KeyboardInterrupt

    d = tmp_path / "music"
    d.mkdir()
    sf.write(d / "song.wav", _music(6, 0), SR)
    monkeypatch.setattr(worker, "process_file", ctrl_c)
    assert run_main(prepare_data.main, ["--input_dir", str(d), "--output_dir", str(tmp_path / "p"),
                                        "--num_workers", "1"]) == 130
    err = capsys.readouterr().err
    assert "no file was finished yet" in err and "prepare_state.json" not in err
    monkeypatch.setattr(engine, "generate", ctrl_c)
    assert run_main(inference_lora.main, ["--base_model_path", str(tiny_model_dir), "--lora_model_path",
                                          "none", "--prompts", "x", "--output_dir",
                                          str(tmp_path / "g")]) == 130
    err = capsys.readouterr().err
    assert "no file was finished yet" in err and "manifest.json" not in err
    monkeypatch.setattr(train_lora, "build_token_cache", ctrl_c)
    data = tmp_path / "data"
    shutil.copytree(example_data_dir, data, ignore=shutil.ignore_patterns("cache"))
    assert run_main(train_lora.main, ["--model_path", str(tiny_model_dir), "--data_dir", str(data),
                                      "--output_dir", str(tmp_path / "o"), "--max_steps", "1"]) == 130
    assert "while building the token cache" in capsys.readouterr().err


def test_many_prompts_are_encoded_with_a_progress_bar(tiny_model_dir, capsys):
    from lora.config import ModelConfig
    from lora.generation.engine import encode_prompts
    from lora.modeling.loading import load_base_model

    model, processor, _ = load_base_model(ModelConfig(model_path=str(tiny_model_dir)))
    encode_prompts(model, processor, [f"prompt {i}" for i in range(60)], progress=True)
    assert "encoding prompts" in capsys.readouterr().err
