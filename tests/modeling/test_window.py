"""The one window rule (lora.modeling.window): seconds -> a window's frames, and one refusal for a window that does
not fit, whichever script asks: training, test_model, the evaluation's held-out window, generation."""

from __future__ import annotations

import re

import pytest

from lora.common.fields import ConfigError


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from lora.config import ModelConfig
    from lora.modeling.loading import load_base_model

    model, _, info = load_base_model(ModelConfig(model_path=str(tiny_model_dir)))
    return model, info


def test_frames_are_seconds_at_the_codec_rate_and_the_longest_window_fits_the_positions(tiny):
    from lora.modeling.loading import family_for
    from lora.modeling.window import checked_window, max_window_frames, window_frames

    model, info = tiny
    assert window_frames(30.0, info) == 30 * info.frame_rate
    assert window_frames(0.3, info) == round(0.3 * info.frame_rate)
    longest = max_window_frames(info, model)
    # a window of F frames takes F + K - 1 decoder positions (the delay pattern)
    assert longest + info.codebooks_per_channel - 1 == family_for(info).max_positions(model)
    assert checked_window(longest / info.frame_rate, info, model) == longest
    with pytest.raises(ConfigError, match=r"training.max_duration .* is longer than the model's context"):
        checked_window((longest + 1) / info.frame_rate, info, model)
    with pytest.raises(ConfigError, match=r"generation.max_window .* shorter than one codec frame"):
        checked_window(0.2 / info.frame_rate, info, model, key="generation.max_window")
    # a conditioning prefix in front of the audio takes positions too
    assert max_window_frames(info, model, prefix=100) == longest - 100


def test_the_longest_window_generates(tiny):
    """What the rule admits really runs: generation of a window of the longest length the rule allows (the
    engine's own check used to refuse it, one position short)."""
    from lora.generation import engine
    from lora.generation.requests import Request, SamplingSettings
    from lora.modeling.window import max_window_frames

    model, info = tiny
    seconds = max_window_frames(info, model) / info.frame_rate
    req = Request(prompt="x", seed=0, duration=seconds, sampling=SamplingSettings())
    windows = engine.plan_batch(model, info, [req], max_window=seconds, extend_stride=seconds / 2)
    assert [w.context + w.new for w in windows] == [max_window_frames(info, model)]


@pytest.mark.slow
def test_every_script_refuses_a_window_longer_than_the_context_with_the_same_message(
        tiny, tiny_model_dir, example_data_dir, tmp_path, capsys):
    from lora import evaluate, inference_lora, test_model, train_lora
    from lora.modeling.window import max_window_frames

    model, info = tiny
    too_long = f"{(max_window_frames(info, model) + 50) / info.frame_rate:g}"
    context = re.escape(f"longer than the model's context ({max_window_frames(info, model) / info.frame_rate:.1f} s)")
    base = ["--model_path", str(tiny_model_dir)]
    with pytest.raises(ConfigError, match=rf"training.max_duration {too_long} s is {context}"):
        train_lora.main(base + ["--data_dir", str(example_data_dir), "--output_dir", str(tmp_path / "train"),
                                "--max_duration", too_long])
    with pytest.raises(ConfigError, match=rf"generation.max_window {too_long} s is {context}"):
        inference_lora.main(base + ["--lora_model_path", "none", "--prompts", "x", "--duration", "1",
                                    "--max_window", too_long, "--output_dir", str(tmp_path / "gen")])
    # the evaluation's held-out window is training.max_duration of config.yaml (evaluate.py takes no training
    # flags): it refuses what training refuses, instead of cutting the window to the context
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"training:\n  max_duration: {too_long}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"training.max_duration of config.yaml .* {too_long} s is {context}"):
        evaluate.main(base + ["--config", str(cfg), "--lora_model_path", "none", "--data_dir",
                              str(example_data_dir), "--output_dir", str(tmp_path / "ev"), "--skip_generation"])
    assert test_model.main(base + ["--max_duration", too_long]) != 0
    assert re.search(context, capsys.readouterr().out)
