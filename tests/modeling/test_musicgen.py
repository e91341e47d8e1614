"""The MusicGen family module (lora.modeling.musicgen), loading (lora.modeling.loading,
lora.modeling.tiny_model) and adapters (lora.modeling.adapter): model loading (tiny / local folder /
errors), delay-pattern targets and loss checked against transformers' own MusicGen code, encoders,
null condition, LoRA attach/save/load."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from lora.common.cli import UserError
from lora.config import LoraSection, ModelConfig
from lora.modeling.adapter import attach_lora, load_lora
from lora.modeling.loading import load_base_model, model_identity, resolve_model_path
from lora.modeling.musicgen import (
    build_delay_pattern,
    codebook_loss,
    decode_audio,
    encode_audio,
    encode_text,
    null_condition,
    teacher_forced_logits,
)
from lora.modeling.tiny_model import ensure_tiny_model


def codebook_losses(logits, labels):
    """(loss, per-codebook loss, tokens per codebook) of the family's one loss."""
    r = codebook_loss(logits, labels)
    return r.loss, r.per_codebook, r.tokens


def _load(path):
    return load_base_model(ModelConfig(model_path=str(path)))


@pytest.fixture(scope="module")
def mono(tiny_model_dir):
    return _load(tiny_model_dir)


@pytest.fixture(scope="module")
def stereo(tiny_stereo_model_dir):
    return _load(tiny_stereo_model_dir)


@pytest.fixture(params=["mono", "stereo"])
def loaded(request, mono, stereo):
    return mono if request.param == "mono" else stereo


# ------------------------------------------------------------------------------------------------
# Tiny model: build, reload, determinism, constraints
# ------------------------------------------------------------------------------------------------
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


def test_resolve_tiny_uses_cache_dir(tmp_path, tiny_model_dir):
    shutil.copytree(tiny_model_dir, tmp_path / "mono")
    cfg = ModelConfig(model_path="tiny", tiny_model_dir=str(tmp_path))
    assert resolve_model_path(cfg) == str((tmp_path / "mono").resolve())
    assert resolve_model_path(ModelConfig(model_path="facebook/musicgen-small")) == "facebook/musicgen-small"


# ------------------------------------------------------------------------------------------------
# Loading errors
# ------------------------------------------------------------------------------------------------
def test_a_model_of_another_kind_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bark"}))
    with pytest.raises(UserError, match="not a MusicGen model.*'bark'"):
        _load(tmp_path)


def test_incomplete_local_folder_names_missing_files(tmp_path, tiny_model_dir):
    d = tmp_path / "musicgen-small"
    shutil.copytree(tiny_model_dir, d)
    (d / "model.safetensors").unlink()
    (d / "preprocessor_config.json").unlink()
    (d / "processor_config.json").unlink()
    with pytest.raises(UserError) as e:
        _load(d)
    msg = str(e.value)
    assert "model.safetensors" in msg and "preprocessor_config.json" in msg and "hf download" in msg
    assert "config.json;" not in msg  # config.json is present, so it is not reported


def test_missing_folder_and_unreachable_hub_id(tmp_path):
    with pytest.raises(UserError, match="not found"):
        _load(tmp_path / "no_such_model")
    cfg = ModelConfig(model_path="nobody-xyz/not-a-musicgen", local_files_only=True)
    with pytest.raises(UserError) as e:
        load_base_model(cfg)
    assert "HF_ENDPOINT" in str(e.value) and "--local-dir" in str(e.value) and "Offline" in str(e.value)


# ------------------------------------------------------------------------------------------------
# Encoders
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seconds", [0.5, 1.0, 2.37])
def test_encode_decode_shapes(loaded, seconds):
    model, _, info = loaded
    n = int(round(seconds * info.sample_rate))
    wavs = torch.randn(2, info.audio_channels, n) * 0.1
    codes = encode_audio(model, wavs, info)
    t = math.ceil(n / 640)
    assert codes.shape == (2, info.num_codebooks, t) and t == info.frames(seconds)
    assert codes.dtype == torch.long and 0 <= int(codes.min()) and int(codes.max()) < info.vocab_size
    audio = decode_audio(model, codes, info)
    assert audio.shape == (2, info.audio_channels, t * 640)
    assert torch.isfinite(audio).all()


def test_stereo_codes_interleave_left_and_right(stereo):
    model, _, info = stereo
    left, right = torch.randn(1, 1, 16000) * 0.1, torch.randn(1, 1, 16000) * 0.1
    codes = encode_audio(model, torch.cat([left, right], dim=1), info)
    mono_codec = model.audio_encoder
    with torch.no_grad():
        lc = mono_codec.encode(left).audio_codes[0]
        rc = mono_codec.encode(right).audio_codes[0]
    assert torch.equal(codes[:, ::2], lc) and torch.equal(codes[:, 1::2], rc)


def test_encode_text_and_null_condition(mono):
    model, processor, info = mono
    hidden, mask = encode_text(model, processor, ["lofi piano chords", ""])
    assert hidden.shape[0] == 2 and hidden.shape[2] == info.text_hidden_size and mask.dtype == torch.long
    assert mask[0].sum() > 0 and hidden[0].abs().sum() > 0
    assert mask[1].sum() == 0 and hidden[1].abs().sum() == 0  # "" = null condition
    nh, nm = null_condition(2, info)
    assert nh.shape == (2, 1, info.text_hidden_size) and nm.shape == (2, 1) and nh.abs().sum() == 0
    codes = torch.randint(0, info.vocab_size, (2, info.num_codebooks, 6))
    dii, _ = build_delay_pattern(codes, torch.tensor([6, 6]), info)
    with torch.no_grad():
        null_logits = model(encoder_outputs=(nh,), attention_mask=nm, decoder_input_ids=dii).logits
        text_logits = model(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=dii).logits
    assert torch.isfinite(null_logits).all()  # all-zero cross-attention mask with sdpa gives no NaN
    k = info.num_codebooks
    # the "" row behaves exactly like the null condition; the captioned row does not
    torch.testing.assert_close(text_logits[k:], null_logits[k:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(text_logits[:k], null_logits[:k], atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Delay pattern and loss, against transformers' own implementation
# ------------------------------------------------------------------------------------------------
def _transformers_labels(model, codes, info):
    """Labels the way HF's MusicGen dreambooth script builds them, with the full delayed tail
    kept."""
    b, k, t = codes.shape
    kc = info.codebooks_per_channel
    pad = info.pad_token_id
    ids = torch.cat([torch.full((b, k, 1), pad), codes], dim=-1).reshape(b * k, t + 1)
    _, pattern = model.decoder.build_delay_pattern_mask(ids, pad, max_length=t + kc)
    full = model.decoder.apply_delay_pattern_mask(F.pad(ids, (0, kc - 1), value=pad), pattern)
    labels = full[:, 1:].reshape(b, k, -1).transpose(1, 2)  # (B, S, K), special positions = pad
    return labels


def test_labels_match_transformers_delay_pattern(loaded):
    model, _, info = loaded
    b, k, t = 3, info.num_codebooks, 9
    codes = torch.randint(0, info.vocab_size, (b, k, t))
    dii, labels = build_delay_pattern(codes, torch.full((b,), t), info)
    s = t + info.codebooks_per_channel - 1
    assert labels.shape == (b, s, k) and dii.shape == (b * k, s)
    ref = _transformers_labels(model, codes, info)
    assert torch.equal(labels, ref.masked_fill(ref == info.pad_token_id, -100))
    # codebook k (channel codebook c for stereo) is delayed by c steps
    for kk in range(k):
        c = kk // 2 if info.audio_channels == 2 else kk
        assert torch.equal(labels[:, c:c + t, kk], codes[:, kk])
        assert (labels[:, :c, kk] == -100).all() and (labels[:, c + t:, kk] == -100).all()
    # decoder inputs = transformers' shift_tokens_right of the pad-filled labels
    from transformers.models.musicgen.modeling_musicgen import shift_tokens_right

    shifted = shift_tokens_right(ref, info.pad_token_id, info.decoder_start_token_id)
    assert torch.equal(dii, shifted.reshape(b * k, s))
    assert (dii[:, 0] == info.decoder_start_token_id).all()


def test_loss_equals_transformers_loss(loaded):
    model, processor, info = loaded
    b, t = 2, 8
    codes = torch.randint(0, info.vocab_size, (b, info.num_codebooks, t))
    dii, labels = build_delay_pattern(codes, torch.full((b,), t), info)
    hidden, mask = encode_text(model, processor, ["deep house groove", "ambient pad in D minor, 70 BPM"])
    with torch.no_grad():  # the family's one teacher-forced forward vs transformers' own loss
        ours, our_labels = teacher_forced_logits(model, info, codes, torch.full((b,), t), hidden, mask)
        ref = model(encoder_outputs=(hidden,), attention_mask=mask,
                    labels=labels.masked_fill(labels == -100, info.pad_token_id))
    assert torch.equal(our_labels, labels)
    loss, per, n = codebook_losses(ours, labels)
    torch.testing.assert_close(loss, ref.loss, atol=1e-6, rtol=1e-6)
    assert per.shape == (info.num_codebooks,) and (n == b * t).all()
    assert math.isfinite(loss.item()) and loss.item() > 0


def test_no_loss_on_batch_padding(mono):
    model, processor, info = mono
    k = info.num_codebooks
    long_codes = torch.randint(0, info.vocab_size, (1, k, 10))
    short_codes = torch.randint(0, info.vocab_size, (1, k, 6))
    lengths = torch.tensor([10, 6])
    padded = torch.cat([long_codes, F.pad(short_codes, (0, 4), value=7)], dim=0)
    garbage = padded.clone()
    garbage[1, :, 6:] = torch.randint(0, info.vocab_size, (k, 4))
    dii, labels = build_delay_pattern(padded, lengths, info)
    dii_g, labels_g = build_delay_pattern(garbage, lengths, info)
    # padding content never reaches the model
    assert torch.equal(dii, dii_g) and torch.equal(labels, labels_g)
    assert (labels[1, 6 + k - 1:] == -100).all()

    hidden, mask = encode_text(model, processor, ["a long caption about a funky bass loop", "piano"])
    with torch.no_grad():
        logits = model(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=dii).logits
    loss_in_batch, _, n_in_batch = codebook_losses(logits[k:], labels[1:])
    alone_dii, alone_labels = build_delay_pattern(short_codes, torch.tensor([6]), info)
    h1, m1 = encode_text(model, processor, ["piano"])
    with torch.no_grad():
        alone_logits = model(encoder_outputs=(h1,), attention_mask=m1, decoder_input_ids=alone_dii).logits
    loss_alone, _, n_alone = codebook_losses(alone_logits, alone_labels)
    assert torch.equal(n_in_batch, n_alone) and (n_alone == 6).all()
    torch.testing.assert_close(loss_in_batch, loss_alone, atol=1e-5, rtol=1e-5)


def test_per_clip_sums_of_the_loss_match_transformers_musicgen_loss():
    """The one loss's per-clip sums (what evaluate's held-out likelihood adds up) give transformers'
    loss."""
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM

    torch.manual_seed(0)
    K, V = 3, 24
    cfg = MusicgenDecoderConfig(vocab_size=V, num_codebooks=K, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, ffn_dim=32, max_position_embeddings=64,
                                pad_token_id=V, bos_token_id=V)
    model = MusicgenForCausalLM(cfg).eval()
    B, S = 2, 10
    input_ids = torch.randint(0, V, (B * K, S))
    labels = torch.randint(0, V, (B, S, K))
    labels[0, :2, :] = -100
    labels[1, 7:, 1] = -100
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=labels)
    ce_sum, n_tok = codebook_loss(out.logits, labels).per_clip()
    assert ce_sum.shape == (B, K) and n_tok.shape == (B, K)
    assert n_tok[0].tolist() == [8, 8, 8] and n_tok[1].tolist() == [10, 7, 10]
    per_codebook = ce_sum.sum(0) / n_tok.sum(0)
    assert float(per_codebook.mean()) == pytest.approx(float(out.loss), rel=1e-5)
    # per clip: a clip's own CE only depends on its own labels
    lone, lone_n = codebook_loss(out.logits.reshape(B, K, S, V)[1:], labels[1:]).per_clip()
    assert torch.allclose(lone[0], ce_sum[1]) and lone_n[0].tolist() == n_tok[1].tolist()


def test_loss_under_autocast_is_float32(mono):
    model, processor, info = mono
    codes = torch.randint(0, info.vocab_size, (2, info.num_codebooks, 5))
    dii, labels = build_delay_pattern(codes, torch.tensor([5, 3]), info)
    hidden, mask = null_condition(2, info)
    with torch.no_grad():
        logits = model(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=dii).logits
    ref, _, _ = codebook_losses(logits, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = codebook_losses(logits.bfloat16(), labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=0.05, rtol=0.02)


# ------------------------------------------------------------------------------------------------
# LoRA
# ------------------------------------------------------------------------------------------------
def _expected(layers, parts):
    return {f"decoder.model.decoder.layers.{i}.{p}" for i in range(layers) for p in parts}


ATTN = [f"{a}.{p}" for a in ("self_attn", "encoder_attn")
        for p in ("q_proj", "k_proj", "v_proj", "out_proj")]


def _lora_names(peft_model):
    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
            if hasattr(m, "lora_A")}


def test_lora_default_targets_are_decoder_attention(tiny_model_dir):
    model, _, _ = _load(tiny_model_dir)
    layers = model.config.decoder.num_hidden_layers
    pm = attach_lora(model, LoraSection())
    assert _lora_names(pm) == _expected(layers, ATTN)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_attention_ffn_and_text_encoder(tiny_model_dir):
    model, _, _ = _load(tiny_model_dir)
    layers = model.config.decoder.num_hidden_layers
    pm = attach_lora(model,
                     LoraSection(lora_targets="attention_ffn", train_text_encoder=True, use_rslora=True))
    names = _lora_names(pm)
    assert _expected(layers, ATTN + ["fc1", "fc2"]) <= names
    text = {n for n in names if n.startswith("text_encoder.")}
    assert len(text) == 4 * model.config.text_encoder.num_layers
    assert not any(n.startswith("audio_encoder.") for n in names)
    assert names - text == _expected(layers, ATTN + ["fc1", "fc2"])


def test_lora_custom_targets_and_bad_pattern(tiny_model_dir):
    model, _, _ = _load(tiny_model_dir)
    pm = attach_lora(model, LoraSection(lora_targets="q_proj, v_proj"))
    layers = model.config.decoder.num_hidden_layers
    assert _lora_names(pm) == _expected(layers, [f"{a}.{p}" for a in ("self_attn", "encoder_attn")
                                                 for p in ("q_proj", "v_proj")])
    model, _, _ = _load(tiny_model_dir)
    with pytest.raises(UserError) as e:
        attach_lora(model, LoraSection(lora_targets="attn_qkv_does_not_exist"))
    assert "attn_qkv_does_not_exist" in str(e.value) and "self_attn.q_proj" in str(e.value)


def test_saved_adapter_loads_with_plain_peft(tmp_path, tiny_model_dir, mono):
    from peft import PeftModel
    from transformers import MusicgenForConditionalGeneration

    _, processor, info = mono
    model, _, _ = _load(tiny_model_dir)
    pm = attach_lora(model, LoraSection(lora_rank=4, lora_alpha=8))
    torch.manual_seed(0)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)  # a trained-looking adapter (B starts at zero)
    pm.eval()
    codes = torch.randint(0, info.vocab_size, (1, info.num_codebooks, 7))
    dii, labels = build_delay_pattern(codes, torch.tensor([7]), info)
    hidden, mask = encode_text(pm, processor, ["techno kick loop"])
    with torch.no_grad():
        trained = pm(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=dii).logits
    pm.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    base = MusicgenForConditionalGeneration.from_pretrained(cfg["base_model_name_or_path"]).eval()
    with torch.no_grad():
        plain = base(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=dii).logits
    assert not torch.allclose(plain, trained, atol=1e-4)  # the adapter changes the model
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        again = reloaded(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=dii).logits
    torch.testing.assert_close(again, trained)

    ours = load_lora(_load(tiny_model_dir)[0], tmp_path / "adapter")
    with torch.no_grad():
        ours_logits = ours(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=dii).logits
    torch.testing.assert_close(ours_logits, trained)


def test_load_lora_errors(tmp_path, tiny_model_dir, tiny_stereo_model_dir):
    model, _, _ = _load(tiny_model_dir)
    pm = attach_lora(model, LoraSection(lora_rank=2))
    pm.save_pretrained(tmp_path / "adapter")

    with pytest.raises(UserError, match="not found"):
        load_lora(_load(tiny_model_dir)[0], tmp_path / "nothing_here")
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tmp_path / "adapter" / "adapter_config.json", partial)
    with pytest.raises(UserError) as e:
        load_lora(_load(tiny_model_dir)[0], partial)
    assert "adapter_model.safetensors" in str(e.value) and "adapter_config.json," not in str(e.value)

    # another architecture (stereo decoder): both bases are named
    with pytest.raises(UserError) as e:
        load_lora(_load(tiny_stereo_model_dir)[0], tmp_path / "adapter")
    assert str(tiny_model_dir.resolve()) in str(e.value) and str(tiny_stereo_model_dir.resolve()) in str(e.value)

    # same architecture, but another model folder: both named too
    other = tmp_path / "some-other-model"
    shutil.copytree(tiny_model_dir, other)
    with pytest.raises(UserError) as e:
        load_lora(_load(other)[0], tmp_path / "adapter")
    assert str(tiny_model_dir.resolve()) in str(e.value) and str(other.resolve()) in str(e.value)


# ------------------------------------------------------------------------------------------------
# The user's diagnostic script
# ------------------------------------------------------------------------------------------------
def test_test_model_script_passes_on_tiny_model(tiny_model_dir, capsys):
    from lora import test_model

    rc = test_model.main(["--model_path", str(tiny_model_dir)])
    out = capsys.readouterr().out
    assert rc == 0, out
    for section in ("== model", "== lora", "== training step", "== generation"):
        assert section in out
    assert "OK — next step: python train_lora.py" in out
    assert "peak:" in out and "generated:  (1, 1, " in out
    # The step runs on the training window (training.max_duration, 30 s by default): its peak is
    # training's.
    assert "batch:      2 x 30 s (the training window, --max_duration) = 1500 frames" in out


def test_test_model_uses_the_training_window_and_checkpointing(tiny_model_dir, capsys):
    """--max_duration and --gradient_checkpointing (training's flags) shape the checked step, as in
    training."""
    from lora import test_model

    rc = test_model.main(["--model_path", str(tiny_model_dir), "--max_duration", "3",
                          "--gradient_checkpointing", "--batch_size", "3", "--skip_generation"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "batch:      3 x 3 s (the training window, --max_duration) = 150 frames" in out
    assert "gradient checkpointing on" in out and "peak:" in out and "in the training step" in out
    rc = test_model.main(["--model_path", str(tiny_model_dir), "--max_duration", "3", "--seconds", "1",
                          "--skip_generation"])
    out = capsys.readouterr().out
    assert rc == 0 and "batch:      2 x 1 s (--seconds) = 50 frames" in out and "gradient checkpointing off" in out


def test_test_model_script_reports_failure(tmp_path, capsys):
    from lora import test_model

    rc = test_model.main(["--model_path", str(tmp_path / "missing_model"), "--skip_generation"])
    out = capsys.readouterr().out
    assert rc != 0
    assert "FAILED at 'load model'" in out and "Next step:" in out and "OK —" not in out


def test_tiny_codec_codes_depend_on_the_audio(tiny_model_dir):
    """A random EnCodec has all-zero codebooks (every frame -> code 0); ours are fitted, so codes
    carry the audio."""
    import torch

    from lora.config import ModelConfig

    model, _, info = load_base_model(ModelConfig(model_path=str(tiny_model_dir)))
    t = torch.arange(32000) / 32000
    tone = torch.sin(2 * torch.pi * 220 * t)[None, None] * 0.5
    noise = torch.randn(1, 1, 32000, generator=torch.Generator().manual_seed(0)) * 0.3
    codes = encode_audio(model, torch.cat([tone, noise]), info)
    for k in range(info.num_codebooks):
        assert len(torch.unique(codes[:, k])) > 8, f"codebook {k} uses too few codes"
    assert (codes[0] != codes[1]).float().mean() > 0.5, "a tone and noise should get mostly different codes"
