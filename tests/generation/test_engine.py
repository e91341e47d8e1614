"""The one generation engine (lora.generation.engine; requests, windows and the model bundle of
lora.generation) on the tiny models, CPU, against transformers' own MusicGen: greedy guided decoding
equals its generate(), the static-cache decoder its forward, and audiocraft's window loop is
followed; a seed reproduces its sample alone or in any batch; LoRA scale and merge; the precision
of each part.

Token-level comparisons use the codes each sample was decoded from (Result.codes), so they hold
whatever the tiny codec sounds like. These tests compare tokens exactly, so they run in fp32 (dtype
auto is bf16 on CPUs with AMX/AVX512-BF16; tests/generation/test_reproducibility.py covers bf16).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora.common.cli import UserError
from tests.helpers import SEED_PROMPT, generate, generation_config, request


@pytest.fixture(scope="module")
def base_bundle(tiny_model_dir):
    from lora.generation.model import load_generation_model

    return load_generation_model(generation_config(tiny_model_dir, dtype="float32"), adapter_path=None)


@pytest.mark.parametrize("stereo", [False, True], ids=["mono", "stereo"])
def test_greedy_guided_decoding_equals_transformers_generate(stereo, tiny_model_dir,
                                                             tiny_stereo_model_dir, monkeypatch):
    """Our loop (batched CFG, delay pattern, cache) against transformers' own MusicGen
    generate()."""
    from lora.generation.model import load_generation_model

    model_dir = tiny_stereo_model_dir if stereo else tiny_model_dir
    bundle = load_generation_model(generation_config(model_dir, dtype="float32"), adapter_path=None)
    model, processor, info, _ = bundle
    prompts = [SEED_PROMPT, "lofi piano"]
    ours = generate(bundle, [request(p, 0, 1.0, guidance_scale=3.0, do_sample=False) for p in prompts])

    seen = []
    decode = model.audio_encoder.decode

    def spy(audio_codes, *a, **k):
        seen.append(audio_codes.clone())
        return decode(audio_codes, *a, **k)

    monkeypatch.setattr(model.audio_encoder, "decode", spy)
    inputs = processor(text=prompts, padding=True, return_tensors="pt")
    frames = info.frames(1.0)
    with torch.no_grad():
        ref_audio = model.generate(**inputs, do_sample=False, guidance_scale=3.0,
                                   max_new_tokens=frames + info.codebooks_per_channel - 1)
    ref_codes = seen[0][0]  # (B, K, T)
    if stereo:  # generate() decodes left (even codebooks) and right (odd) separately
        left, right = seen[0][0], seen[1][0]
        ref_codes = torch.stack([left, right], dim=2).reshape(len(prompts), info.num_codebooks, -1)
    for i, r in enumerate(ours):
        assert r.codes.shape == (info.num_codebooks, frames)
        assert torch.equal(r.codes, ref_codes[i])
        assert r.audio.shape == (info.audio_channels, 32000)
        np.testing.assert_allclose(r.audio, ref_audio[i].numpy(), atol=1e-5)
    assert not torch.equal(ours[0].codes, ours[1].codes)  # the text conditions the result
    assert np.abs(ours[0].audio - ours[1].audio).max() > 1e-5


def test_seed_reproduces_a_sample_alone_or_in_any_batch(base_bundle):
    prompts = ["lofi piano", SEED_PROMPT, "dark techno with heavy kick"]
    batch = generate(base_bundle, [request(p, 10 + i, top_k=50) for i, p in enumerate(prompts)], batch_size=3)
    alone = generate(base_bundle, [request(SEED_PROMPT, 11, top_k=50)])[0]
    again = generate(base_bundle, [request(SEED_PROMPT, 11, top_k=50)])[0]
    other_seed = generate(base_bundle, [request(SEED_PROMPT, 12, top_k=50)])[0]
    assert batch[1].batch_size == 3 and alone.batch_size == 1
    assert torch.equal(alone.codes, again.codes) and np.array_equal(alone.audio, again.audio)
    assert torch.equal(batch[1].codes, alone.codes)
    np.testing.assert_allclose(batch[1].audio, alone.audio, atol=1e-5)
    assert not torch.equal(other_seed.codes, alone.codes)
    # another seed is other music (float noise ~1e-7)
    assert np.abs(other_seed.audio - alone.audio).max() > 1e-5
    assert alone.audio.shape == (1, 32000) and alone.audio.dtype == np.float32


def test_token_sampler_follows_top_k_top_p_and_the_distribution():
    from lora.generation.engine import TokenSampler
    from lora.generation.requests import SamplingSettings

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(40000, 1)
    u = torch.rand(40000, generator=torch.Generator().manual_seed(0))
    full = TokenSampler(SamplingSettings(top_k=0), 4)(logits, u)
    freq = torch.bincount(full, minlength=4).float() / len(full)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.01)
    top2 = TokenSampler(SamplingSettings(top_k=2), 4)(logits, u)
    assert set(top2.tolist()) == {0, 1}
    assert abs((top2 == 0).float().mean().item() - 0.5 / 0.8) < 0.01
    # top_p replaces top_k
    nucleus = TokenSampler(SamplingSettings(top_k=1, top_p=0.7), 4)(logits, u)
    assert set(nucleus.tolist()) == {0, 1}
    greedy = TokenSampler(SamplingSettings(do_sample=False), 4)(logits[:3])
    assert greedy.tolist() == [0, 0, 0]
    cold = TokenSampler(SamplingSettings(top_k=0, temperature=0.05), 4)(logits, u)
    assert (cold == 0).float().mean().item() > 0.99


@pytest.mark.slow
def test_lora_scale_and_merge(tiny_model_dir, tiny_adapter_dir, base_bundle):
    from lora.generation.model import load_generation_model

    def codes(scale, merge):
        cfg = generation_config(tiny_model_dir, lora_scale=scale, merge=merge, dtype="float32")
        bundle = load_generation_model(cfg, adapter_path=tiny_adapter_dir)
        adapter = bundle[3]
        assert adapter["scale"] == scale and adapter["merged"] == (merge if merge is not None
                                                                   else scale == 1.0)
        return generate(bundle, [request(SEED_PROMPT, 5)])[0]

    base = generate(base_bundle, [request(SEED_PROMPT, 5)])[0]
    merged = codes(1.0, None)  # default: merged at scale 1
    unmerged = codes(1.0, False)
    zero = codes(0.0, None)
    half = codes(0.5, None)
    assert torch.equal(merged.codes, unmerged.codes)
    np.testing.assert_allclose(merged.audio, unmerged.audio, atol=1e-5)
    assert torch.equal(zero.codes, base.codes)
    assert not torch.equal(merged.codes, base.codes)  # the adapter matters
    assert not torch.equal(half.codes, base.codes) and not torch.equal(half.codes, merged.codes)
    assert np.abs(merged.audio - base.audio).max() > 1e-5


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_static_cache_decoder_equals_transformers_forward(attn, tiny_model_dir, tiny_adapter_dir):
    """lora.modeling.fast_decode.StaticDecoder (preallocated cache; what CUDA graphs replay) gives
    transformers' logits: prefill of a prefix, then step by step, with guidance's null half, on an
    unmerged LoRA model."""
    from lora.generation.engine import _text_states
    from lora.modeling import adapter, loading, musicgen
    from lora.modeling.fast_decode import StaticDecoder

    cfg = generation_config(tiny_model_dir, dtype="float32")
    cfg.model.attn_implementation = attn
    model, processor, info = loading.load_base_model(cfg.model)
    model = adapter.load_lora(model, tiny_adapter_dir)
    model.eval()
    base = musicgen.get_base(model)
    hidden, mask = _text_states(model, processor, [SEED_PROMPT, "lofi piano"], 3.0,
                                torch.float32)
    rows, K = hidden.shape[0], info.num_codebooks
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, info.vocab_size, (rows * K, 12), generator=g)
    with torch.no_grad():
        # (rows*K, 12, V)
        ref = base(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=ids).logits
        dec = StaticDecoder(base, hidden, mask, rows=rows, max_len=12)
        got = [dec.prefill(ids[:, :5])] + [dec.step(ids[:, t], t) for t in range(5, 12)]
    for t, logits in zip(range(4, 12), got):
        torch.testing.assert_close(logits, ref[:, t], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="CUDA"):
        StaticDecoder(base, hidden, mask, rows=rows, max_len=12, cuda_graph=True)


def test_static_decoding_generates_the_same_music(base_bundle):
    """decoding: static is a speed choice only: same tokens as transformers' cache, windows and
    prompts too."""
    reqs = [request(SEED_PROMPT, 7, 2.0, top_k=50), request("lofi piano", 8, 2.0, top_k=50)]
    kw = dict(batch_size=2, max_window=1.2, extend_stride=0.8)
    ref = generate(base_bundle, reqs, decoding="transformers", **kw)
    got = generate(base_bundle, reqs, decoding="static", **kw)
    assert len(ref[0].windows) == 2
    for a, b in zip(ref, got):
        assert torch.equal(a.codes, b.codes)
        np.testing.assert_allclose(a.audio, b.audio, atol=1e-6)
    with pytest.raises(UserError, match="CUDA"):
        generate(base_bundle, reqs, decoding="cuda_graph")


def test_generation_dtype_auto_follows_the_hardware(monkeypatch):
    """dtype auto: bf16 on a CPU with AMX-BF16 / AVX512-BF16 (read from /proc/cpuinfo), fp32 on one
    without; a named dtype is used as is."""
    from lora.modeling import precision
    from lora.modeling.precision import generation_dtype as resolve_dtype

    monkeypatch.setattr(precision, "cpu_flags",
                        lambda cpuinfo="/proc/cpuinfo": frozenset({"avx512f", "amx_bf16"}))
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": frozenset({"avx2"}))
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16 and resolve_dtype("float32",
                                                                                "cpu") == torch.float32


def test_plan_windows_matches_audiocraft_loop():
    from lora.generation.requests import plan_windows

    # audiocraft.models.genmodel._generate_tokens, no audio prompt
    def audiocraft(total, window, stride):
        out, offset, prompt_len = [], 0, 0
        while offset + prompt_len < total:
            gen_len = min(total - offset, window)
            out.append((offset, prompt_len, gen_len - prompt_len))
            prompt_len = gen_len - stride
            offset += stride
        return out

    for total, window, stride in [(3000, 1500, 900), (6000, 1500, 900), (1600, 1500, 900),
                                  (1500, 1500, 900), (150, 50, 30), (700, 100, 99)]:
        ours = [(w.start, w.context, w.new) for w in plan_windows(total, 0, window, stride)]
        assert ours == audiocraft(total, window, stride), (total, window, stride)
        assert ours[-1][0] + ours[-1][1] + ours[-1][2] == total
    # An audio prompt that fits is the whole context of a single window.
    assert [(w.start, w.context, w.new) for w in plan_windows(1000, 400, 1500, 900)] == [(0, 400, 600)]


def test_windowed_continuation_is_seamless(base_bundle):
    info = base_bundle[2]
    r = generate(base_bundle, [request("lofi piano", 3, 3.0)], max_window=1.0, extend_stride=0.6)[0]
    assert r.codes.shape == (info.num_codebooks, 150) and r.audio.shape == (1, 3 * 32000)
    assert [(w.start, w.context, w.new) for w in r.windows] == [(0, 0, 50), (30, 20, 30), (60, 20, 30),
                                                               (90, 20, 30), (120, 20, 10)]
    for w, prompt, head in zip(r.windows, r.window_prompts, r.window_heads):
        # the window was prompted with the last tokens of the stream so far, and kept them unchanged
        assert torch.equal(prompt, r.codes[:, w.start: w.start + w.context])
        assert torch.equal(head, prompt)
    assert len({tuple(r.codes[:, i * 30:(i + 1) * 30].flatten().tolist()) for i in range(5)}) == 5


def test_audio_prompt_is_continued(base_bundle):
    from lora.generation.engine import encode_audio_prompt

    model, _, info, _ = base_bundle
    t = np.arange(16000) / 32000
    wav = (0.3 * np.sin(2 * np.pi * 220 * t))[None].astype(np.float32)
    codes, pid = encode_audio_prompt(model, info, wav)
    from lora.generation.requests import Request

    r = generate(base_bundle, [Request("lofi piano", 1, 1.0, prompt_codes=codes, prompt_id=pid)])[0]
    assert codes.shape == (info.num_codebooks, 25)
    assert torch.equal(r.codes[:, :25], codes) and r.codes.shape[-1] == 50


def test_reduced_precision_keeps_codec_and_text_encoder_in_fp32(tiny_model_dir, tiny_adapter_dir):
    from lora.generation.model import load_generation_model
    from lora.modeling import musicgen

    bundle = load_generation_model(generation_config(tiny_model_dir, dtype="bfloat16", merge=False),
                                   adapter_path=tiny_adapter_dir)
    base = musicgen.get_base(bundle[0])
    assert next(base.decoder.parameters()).dtype == torch.bfloat16
    assert next(base.audio_encoder.parameters()).dtype == torch.float32
    assert next(base.text_encoder.parameters()).dtype == torch.float32
    r = generate(bundle, [request("lofi piano", 1, 0.3)])[0]
    assert r.audio.dtype == np.float32 and np.isfinite(r.audio).all() and r.audio.shape == (1, 9600)
