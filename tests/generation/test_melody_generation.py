"""The generation engine (lora.generation.engine) on melody models, against transformers' and
audiocraft's behaviour: guidance with a tune and no caption, the tune past 30 s, and long captions
against the decoder's positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

SR = 32000


@pytest.fixture(scope="module", params=["mono", "stereo"])
def melody(request, tmp_path_factory):
    from lora.modeling import musicgen_melody as M
    from lora.modeling.tiny_model import ensure_tiny_model

    d = ensure_tiny_model(tmp_path_factory.mktemp("tiny_melody") / request.param,
                          stereo=request.param == "stereo", melody=True)
    model = M.from_pretrained(str(d), "sdpa").eval()
    return model, M.load_processor(str(d)), M.model_info(model, str(d), "test")


def _tone(freq: float, seconds: float) -> np.ndarray:
    t = np.arange(int(round(seconds * SR))) / SR
    return np.sin(2 * np.pi * freq * t).astype(np.float32)


def _tune(seconds_per_note: float = 1.0, notes=(440.0, 261.63, 329.63)) -> np.ndarray:
    """A, C, E, one note after the other."""
    return np.concatenate([_tone(f, seconds_per_note) for f in notes])


def _transformers_codes(model, info, monkeypatch, **kw) -> torch.Tensor:
    """transformers' generate(), its codes caught where it hands them to EnCodec: (B, K, T)."""
    from lora.modeling import musicgen_melody as M

    caught = []
    codec = M.audio_codec(model)
    decode = codec.decode
    monkeypatch.setattr(codec, "decode", lambda codes, *a, **k: (caught.append(codes[0]),
                                                                 decode(codes, *a, **k))[1])
    model.generate(**kw)
    monkeypatch.undo()
    if info.audio_channels == 1:
        return caught[0]
    return torch.stack([caught[0], caught[1]], dim=2).flatten(1, 2)


# --------------------------------------------------------------------------------------------
# Defect 1: a tune with no caption is guided
# --------------------------------------------------------------------------------------------
def _empty_prompt_request(info, chroma, mid, guidance: float, n: int):
    from lora.generation import requests

    return requests.Request(prompt="", seed=0, duration=n / info.frame_rate, melody=chroma,
                            melody_id=mid,
                            sampling=requests.SamplingSettings(do_sample=False,
                                                               guidance_scale=guidance))


@pytest.mark.parametrize("decoding", ["static", "transformers"])
def test_an_empty_prompt_with_a_tune_is_guided_as_transformers_generate(melody, decoding,
                                                                         monkeypatch):
    """"Follow this tune, no caption": the conditional half has the tune, the unconditional half the
    null melody, so guidance 3 is applied (transformers' generate() and audiocraft do). Greedy tokens
    equal transformers' generate() given the tune and an empty caption (T5 states masked out, as
    audiocraft and our encode_text make an empty description), and guidance 1, 3 and 10 differ."""
    from lora.generation import engine

    model, processor, info = melody
    n = 10
    chroma, mid = engine.melody_from_audio(_tune(), info)
    ours = {g: engine.generate(model, processor, info, [_empty_prompt_request(info, chroma, mid, g, n)],
                               progress=False, decoding=decoding)[0] for g in (1.0, 3.0, 10.0)}
    tokens = processor(text=[""], padding="max_length", max_length=ours[3.0].text_length,
                       return_tensors="pt")
    tokens["attention_mask"] = torch.zeros_like(tokens["attention_mask"])  # an empty description
    ref = _transformers_codes(model, info, monkeypatch, **tokens, input_features=chroma[None],
                              do_sample=False, guidance_scale=3.0,
                              max_new_tokens=n + info.codebooks_per_channel - 1)
    assert torch.equal(ours[3.0].codes, ref[0])
    assert not torch.equal(ours[1.0].codes, ours[3.0].codes)
    assert not torch.equal(ours[3.0].codes, ours[10.0].codes)


def test_empty_prompts_without_a_tune_skip_the_second_half(melody):
    """With neither caption nor tune the two halves are the same input: guidance changes nothing
    and is skipped (text-only models always; melody models when no row has a tune)."""
    from lora.generation import engine, requests

    _, _, info = melody
    empty = requests.Request(prompt="", seed=0, duration=1.0)
    tuned = requests.Request(prompt="", seed=0, duration=1.0, melody=torch.zeros(8, 12))
    captioned = requests.Request(prompt="piano", seed=0, duration=1.0)
    assert engine.effective_guidance(info, [empty, empty]) == 1.0
    assert engine.effective_guidance(info, [empty, tuned]) == 3.0
    assert engine.effective_guidance(info, [captioned]) == 3.0


# --------------------------------------------------------------------------------------------
# Defect 3: the tune past 30 s
# --------------------------------------------------------------------------------------------
def _audiocraft_window_chroma(tune: np.ndarray, time_offset: float, max_duration: float = 30.0):
    """audiocraft's MusicGen._generate_tokens for a window starting ``time_offset`` seconds into a
    piece longer than max_duration: the melody waveform extended periodically
    (``ref_wav[..., positions % wav_length]`` over max_duration seconds), then its chroma."""
    from lora.modeling import chroma as C

    positions = np.arange(int(time_offset * SR), int(time_offset * SR) + int(max_duration * SR))
    return C.chroma(tune[positions % len(tune)], SR).argmax(-1)


@pytest.mark.slow  # (over ~2 s: the full suite runs it, the fast loop leaves it out)
def test_a_40_s_piece_from_a_10_s_tune_follows_the_tune_in_every_window(tmp_path_factory, monkeypatch):
    """engine.generate of 40 s (two 30-s windows, at 0 and 18 s) with a 10-s tune gives each window
    the melody audiocraft gives it: the tune extended periodically from the window's start. Frames
    may differ only where audiocraft's chroma window straddles a wrap point or a note change (its
    chroma is recomputed on the wrapped audio); the window at 18 s used to get the null melody
    (past the tune's end)."""
    from lora.generation import engine, requests
    from lora.modeling import musicgen_melody as M
    from lora.modeling.tiny_model import ensure_tiny_model

    d = ensure_tiny_model(tmp_path_factory.mktemp("tiny_melody") / "mono", stereo=False, melody=True)
    model = M.from_pretrained(str(d), "sdpa").eval()
    processor, info = M.load_processor(str(d)), M.model_info(model, str(d), "test")
    tune = _tune(2.0, (440.0, 261.63, 329.63, 392.0, 493.88))  # A C E G B, 2 s each: 10 s
    chroma, mid = engine.melody_from_audio(tune, info)
    seen = []
    run = engine._run_window

    def spy(*a, chroma=None, **k):
        seen.append(chroma[0].argmax(-1).clone())  # the conditional half's tune
        return run(*a, chroma=chroma, **k)

    monkeypatch.setattr(engine, "_run_window", spy)
    req = requests.Request(prompt="piano", seed=0, duration=40.0, melody=chroma, melody_id=mid,
                           melody_samples=len(tune),
                           sampling=requests.SamplingSettings(do_sample=False))
    out = engine.generate(model, processor, info, [req], progress=False, decoding="static")[0]
    assert [w.start / info.frame_rate for w in out.windows] == [0.0, 18.0] and len(seen) == 2
    for w, got in zip(out.windows, seen):
        want = _audiocraft_window_chroma(tune, w.start / info.frame_rate)
        agree = (got == want).float().mean()
        assert agree >= 0.97, (w, float(agree))
        # every note of the tune is in every window (not the null melody's C alone)
        assert set(got.tolist()) == {9, 0, 4, 7, 11}


# --------------------------------------------------------------------------------------------
# Defect 4: a long caption against the decoder's positions
# --------------------------------------------------------------------------------------------
LONG_CAPTION = " ".join(["piano"] * 330)  # 331 tokens with </s>: padded to 352


@pytest.mark.parametrize("decoding", ["static", "transformers"])
def test_a_long_caption_that_leaves_no_room_for_the_window_is_a_message(melody, decoding):
    """A melody model reads 235 melody frames and the padded caption (352 positions for 331 tokens)
    before the audio: a 30-s window (1500 frames + 3 of the delay pattern) would need 2090 of the
    tiny model's 2048 positions. generate() says so before decoding, naming generation.max_window,
    the caption and the fix, with either decoder (transformers' own would run past the trained
    positions silently); 29 s fits."""
    from lora.common.fields import ConfigError
    from lora.generation import engine, requests

    model, processor, info = melody
    req = requests.Request(prompt=LONG_CAPTION, seed=0, duration=40.0,
                           sampling=requests.SamplingSettings(do_sample=False))
    with pytest.raises(ConfigError) as err:
        engine.generate(model, processor, info, [req], progress=False, decoding=decoding)
    msg = str(err.value)
    assert "generation.max_window 30.0 s does not fit" in msg and "235 melody frames + 352 text" in msg
    assert "the prompt 'piano piano" in msg and "Lower generation.max_window to 29.1 s" in msg
    windows = engine.plan_batch(model, info, [req], 29.0, 18.0, text_len=352)
    assert windows[0].new == 29 * 50  # fits: 1450 + 3 + 587 <= 2048


def test_training_refuses_a_window_a_long_caption_leaves_no_room_for(tmp_path, example_data_dir):
    """train_lora.py on the tiny melody model with one held-out clip's caption 331 tokens long:
    a message naming training.max_duration, the caption and how to fix it, before anything is
    trained or written; the same data with short captions passes the check."""
    import json

    from lora import train_lora
    from lora.common.fields import ConfigError

    meta = json.loads((example_data_dir / "metadata.json").read_text())
    clips = meta["clips"] if isinstance(meta, dict) else meta
    clips[-1]["text"] = LONG_CAPTION
    for c in clips:
        c["audio"] = str(example_data_dir / c["audio"])
    bad = tmp_path / "long.json"
    bad.write_text(json.dumps(meta))
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as err:
        train_lora.main(["--model_path", "tiny-melody", "--tiny_model_dir", str(tmp_path / "tiny"),
                         "--data_dir", str(example_data_dir), "--metadata_file", str(bad),
                         "--output_dir", str(out), "--max_steps", "1", "--mixed_precision", "no"])
    msg = str(err.value)
    assert msg.startswith("training.max_duration 30.0 s does not fit") and "(331 tokens)" in msg
    assert "Lower training.max_duration to 29.1 s or less, or shorten the caption" in msg
    assert not (out / "best_model").exists() and not (out / "checkpoints").exists()
