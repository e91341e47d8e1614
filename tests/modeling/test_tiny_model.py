"""The built-in tiny models (lora.modeling.tiny_model) that every test runs on: a complete
MusicGen folder (save_pretrained), with MusicGen's constraints, deterministic and built once, whose
fitted codec gives codes that depend on the audio."""

from __future__ import annotations

import json
import math

import torch

from lora.config import ModelConfig
from lora.modeling.loading import load_base_model, model_identity
from lora.modeling.musicgen import encode_audio
from lora.modeling.tiny_model import ensure_tiny_model


def test_tiny_model_folder_is_a_complete_musicgen(tiny_model_dir, mono):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
                 "generation_config.json"):
        assert (tiny_model_dir / name).is_file(), name
    model, processor, info = mono
    assert type(model).__name__ == "MusicgenForConditionalGeneration"
    assert type(processor).__name__ == "MusicgenProcessor"
    assert info.name_or_path == str(tiny_model_dir.resolve())
    assert (info.sample_rate, info.frame_rate, info.num_codebooks, info.audio_channels) == (32000,
                                                                                            50, 4, 1)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.config.decoder._attn_implementation == "sdpa"
    # the constraints that make it a MusicGen: codebook size = decoder vocab, codec quantizers =
    # codebooks
    codec = model.config.audio_encoder
    assert codec.codebook_size == info.vocab_size == model.config.decoder.vocab_size
    assert codec.num_quantizers == info.num_codebooks
    assert codec.sampling_rate == 32000 and math.prod(codec.upsampling_ratios) == 640
    gen = model.generation_config
    assert gen.decoder_start_token_id == gen.pad_token_id == info.pad_token_id == info.vocab_size
    assert gen.guidance_scale == 3.0 and gen.do_sample
    # the tokenizer knows the caption words of the example dataset
    ids = processor.tokenizer(["drum loop kick snare hihat bass 120 BPM C# minor synth pad"]).input_ids[0]
    assert processor.tokenizer.unk_token_id not in ids
    assert ids[-1] == processor.tokenizer.eos_token_id


def test_tiny_stereo_constraints(stereo):
    model, _, info = stereo
    assert (info.num_codebooks, info.audio_channels, info.codebooks_per_channel) == (8, 2, 4)
    assert model.config.audio_encoder.num_quantizers == 4  # mono codec, run once per channel
    assert model.config.audio_encoder.codebook_size == info.vocab_size


def test_tiny_model_is_deterministic_and_cached(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    again = ensure_tiny_model(tmp_path / "again", stereo=False)
    a = load_file(str(tiny_model_dir / "model.safetensors"))
    b = load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert model_identity(again) == model_identity(tiny_model_dir)
    # a second call reuses the folder instead of rebuilding it
    mtime = (again / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(again, stereo=False) == again
    assert (again / "model.safetensors").stat().st_mtime_ns == mtime
    # a changed model changes the identity
    cfg = json.loads((again / "config.json").read_text())
    cfg["decoder"]["dropout"] = 0.2
    (again / "config.json").write_text(json.dumps(cfg))
    assert model_identity(again) != model_identity(tiny_model_dir)


def test_tiny_codec_codes_depend_on_the_audio(tiny_model_dir):
    """A random EnCodec has all-zero codebooks (every frame -> code 0); ours are fitted, so codes
    carry the audio."""
    import torch


    model, _, info = load_base_model(ModelConfig(model_path=str(tiny_model_dir)))
    t = torch.arange(32000) / 32000
    tone = torch.sin(2 * torch.pi * 220 * t)[None, None] * 0.5
    noise = torch.randn(1, 1, 32000, generator=torch.Generator().manual_seed(0)) * 0.3
    codes = encode_audio(model, torch.cat([tone, noise]), info)
    for k in range(info.num_codebooks):
        assert len(torch.unique(codes[:, k])) > 8, f"codebook {k} uses too few codes"
    assert (codes[0] != codes[1]).float().mean() > 0.5, "a tone and noise should get mostly different codes"
