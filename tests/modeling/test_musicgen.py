"""The MusicGen family module (lora.modeling.musicgen) against transformers' own MusicGen code:
the audio and text encoders, the null condition, the delay-pattern targets and the loss (no loss on
batch padding, float32 under autocast). Tiny random models, CPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lora.modeling.musicgen import (
    build_delay_pattern,
    codebook_loss,
    decode_audio,
    encode_audio,
    encode_text,
    null_condition,
    teacher_forced_logits,
)


def codebook_losses(logits, labels):
    """(loss, per-codebook loss, tokens per codebook) of the family's one loss."""
    r = codebook_loss(logits, labels)
    return r.loss, r.per_codebook, r.tokens


@pytest.fixture(params=["mono", "stereo"])
def loaded(request, mono, stereo):
    return mono if request.param == "mono" else stereo


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
