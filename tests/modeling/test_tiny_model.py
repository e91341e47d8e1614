"""The built-in tiny models (lora.modeling.tiny_model) that every test runs on: a complete
MusicGen folder (save_pretrained), with MusicGen's constraints, deterministic and built once, whose
fitted codec gives codes that depend on the audio, and that are not degenerate where a bug could
hide: non-zero biases and norms that are not all ones, so that a text mask applied before the
projection, or a null melody without its bias, changes the numbers the tests compare with
transformers."""

from __future__ import annotations

import json
import math

import pytest
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


@pytest.fixture(scope="module")
def tiny_melody(tmp_path_factory):
    from lora.modeling import musicgen_melody as M
    from lora.modeling.tiny_model import ensure_tiny_model

    d = ensure_tiny_model(tmp_path_factory.mktemp("tiny_melody") / "mono", stereo=False, melody=True)
    model = M.from_pretrained(str(d), "sdpa").eval()
    return model, M.load_processor(str(d)), M.model_info(model, str(d), "test")


def _degenerate(model) -> list[str]:
    """1-D parameters outside the codec that are all zeros or all ones (transformers' init of biases
    and norms)."""
    out = []
    for name, p in model.named_parameters():
        if name.startswith("audio_encoder.") or p.dim() != 1:
            continue
        if bool((p == 0).all()) or bool((p == 1).all()):
            out.append(name)
    return out


def test_the_tiny_melody_model_has_no_degenerate_bias_or_norm(tiny_melody):
    model, _, _ = tiny_melody
    assert _degenerate(model) == []
    names = [n for n, p in model.named_parameters() if not n.startswith("audio_encoder.") and p.dim() == 1]
    # the projections of the prefix, the decoder's and T5's norms are all among them
    assert {"enc_to_dec_proj.bias", "audio_enc_to_dec_proj.bias"} <= set(names)
    assert any("layer_norm" in n and n.startswith("text_encoder.") for n in names)
    for proj in ("enc_to_dec_proj", "audio_enc_to_dec_proj"):
        bias = dict(model.named_parameters())[f"{proj}.bias"]
        assert float(bias.detach().abs().mean()) > 0.1  # on the scale of the projected states


def test_the_null_melody_is_the_projection_of_bin_0_with_its_bias(tiny_melody):
    """transformers' null melody is a one-hot on bin 0, projected: W[:, 0] + b (not 0, not W[:, 0])."""
    from lora.modeling import musicgen_melody as M

    model, _, info = tiny_melody
    proj = model.audio_enc_to_dec_proj
    states = M.melody_states(model, M.null_melody(1))
    want = (proj.weight[:, 0] + proj.bias).expand(info.chroma_length, -1)
    torch.testing.assert_close(states[0], want)
    assert float((proj.weight[:, 0] - want[0]).detach().abs().max()) > 0.1


def test_make_nondegenerate_leaves_the_codec_and_is_seeded(tiny_model_dir):
    """On a copy of the text-only model: every decoder / T5 norm and bias changes, the codec does
    not, and the same generator gives the same values."""
    from transformers import MusicgenForConditionalGeneration

    from lora.modeling.tiny_model import make_nondegenerate

    a = MusicgenForConditionalGeneration.from_pretrained(str(tiny_model_dir))
    b = MusicgenForConditionalGeneration.from_pretrained(str(tiny_model_dir))
    before = {n: p.clone() for n, p in a.named_parameters()}
    assert _degenerate(a)  # transformers' init: the text-only tiny model keeps it (quick start)
    changed = make_nondegenerate(a, torch.Generator().manual_seed(5))
    make_nondegenerate(b, torch.Generator().manual_seed(5))
    assert _degenerate(a) == [] and "enc_to_dec_proj.bias" in changed
    for n, p in a.named_parameters():
        assert torch.equal(p, dict(b.named_parameters())[n])
        if n.startswith("audio_encoder."):
            assert torch.equal(p, before[n])


def test_the_static_decoder_masks_the_text_after_its_projection(tiny_model_dir):
    """lora.modeling.fast_decode.StaticDecoder equals transformers' forward on a text-only model
    with non-zero projection bias, guidance's null half included: a mask applied before the
    projection would leave ``b`` in the unconditional (all-masked) row and fail here."""
    from transformers import MusicgenForConditionalGeneration

    from lora.modeling import musicgen
    from lora.modeling.fast_decode import StaticDecoder
    from lora.modeling.tiny_model import make_nondegenerate

    base = MusicgenForConditionalGeneration.from_pretrained(str(tiny_model_dir),
                                                            attn_implementation="eager").eval()
    make_nondegenerate(base, torch.Generator().manual_seed(3))
    processor = musicgen.load_processor(str(tiny_model_dir))
    hidden, mask = musicgen.encode_text(base, processor, ["techno drums 128 BPM", "piano"])
    hidden, mask = musicgen.with_unconditional(hidden, mask)
    rows, K = hidden.shape[0], base.decoder.num_codebooks
    ids = torch.randint(0, 128, (rows * K, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=ids).logits
        dec = StaticDecoder(base, hidden, mask, rows=rows, max_len=8)
        got = [dec.prefill(ids[:, :4])] + [dec.step(ids[:, t], t) for t in range(4, 8)]
    for t, logits in zip(range(3, 8), got):
        torch.testing.assert_close(logits, ref[:, t], atol=1e-5, rtol=1e-5)
