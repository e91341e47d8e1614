"""A seed reproduces its sample in the default dtype, and long audio prompts are windowed as
audiocraft does.

* bf16 (``dtype: auto`` on CPUs with AVX512-BF16/AMX, and on GPUs): the rounding of the decoder's
  cross-attention depends on the padded text length L it attends over, so a sample batched with a
  longer caption used to come out different from the same prompt and seed alone (about 17% of the
  tokens here, without the fix). The text states are now padded to a length that depends on the
  prompt alone (lora.generation.engine.text_length). These tests pin ``bfloat16`` so they run on any
  CPU, and also run ``auto`` (whatever this machine's default is).
* Windows with an audio prompt: audiocraft's ``BaseGenModel._generate_tokens``
  (audiocraft/models/genmodel.py).

Tiny models, CPU, no downloads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.helpers import generate, generation_config, request

PROMPT = "hip hop 808 beat with trap drums"
# PROMPT is 8 tokens (the tiny tokenizer is word-level: a token per word, plus </s>); captions of
# other lengths: 3, 15 and 27 tokens.
SHORT = "lofi piano"
MEDIUM = "dark techno with heavy kick and a long rolling bassline under it all night"
LONG = "a b c d e f g h i j k l m n o p q r s t u v w x y z"


@pytest.fixture(scope="module")
def bf16_bundle(tiny_model_dir):
    from lora.generation.model import load_generation_model

    return load_generation_model(generation_config(tiny_model_dir, dtype="bfloat16"), adapter_path=None)


@pytest.fixture(scope="module")
def fp32_bundle(tiny_model_dir):
    from lora.generation.model import load_generation_model

    return load_generation_model(generation_config(tiny_model_dir, dtype="float32"), adapter_path=None)


# --------------------------------------------------------------------------------------------
# A seed reproduces its sample in bf16
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "auto"])
def test_seed_reproduces_its_sample_alone_or_batched_with_other_caption_lengths(dtype, tiny_model_dir,
                                                                                bf16_bundle):
    """The same prompt and seed, alone and in batches of 2 and 3 with captions of other lengths
    (shorter and longer), gives the same tokens, token for token, in bf16 and in this machine's
    default dtype."""
    from lora.generation.model import load_generation_model
    from lora.modeling.loading import family_for
    from lora.modeling.precision import generation_dtype

    bundle = bf16_bundle if dtype == "bfloat16" else load_generation_model(
        generation_config(tiny_model_dir, dtype=dtype), adapter_path=None)
    expected = torch.bfloat16 if dtype == "bfloat16" else generation_dtype("auto", "cpu")
    assert family_for(bundle[0]).decoder_param(bundle[0]).dtype == expected
    alone = generate(bundle, [request(PROMPT, 11, 4.0, top_k=250)])[0]
    batches = {
        "short + long": generate(bundle, [request(SHORT, 10, 4.0), request(PROMPT, 11, 4.0),
                                          request(LONG, 12, 4.0)], batch_size=3)[1],
        "long first": generate(bundle, [request(LONG, 12, 4.0), request(PROMPT, 11, 4.0)],
                               batch_size=2)[1],
        "medium": generate(bundle, [request(PROMPT, 11, 4.0), request(MEDIUM, 13, 4.0)],
                           batch_size=2)[0],
    }
    assert alone.batch_size == 1 and alone.codes.shape == (4, 200)
    for name, r in batches.items():
        assert r.batch_size > 1 and r.text_length == alone.text_length, name
        mismatch = (r.codes != alone.codes).float().mean().item()
        assert mismatch == 0.0, f"{name}: {mismatch:.1%} of the tokens differ from the sample generated alone"
        np.testing.assert_allclose(r.audio, alone.audio, atol=1e-5)
    other_seed = generate(bundle, [request(PROMPT, 12, 4.0)])[0]
    assert not torch.equal(other_seed.codes, alone.codes)


def test_greedy_bf16_is_the_same_alone_or_batched(bf16_bundle):
    """do_sample=False in bf16: a caption's greedy piece does not depend on its batch either
    (guidance's null half included), and long windowed pieces keep it across windows."""
    kw = {"do_sample": False}
    alone = generate(bf16_bundle, [request(PROMPT, 0, 3.0, **kw)], max_window=1.2,
                     extend_stride=0.8)[0]
    batch = generate(bf16_bundle, [request(LONG, 0, 3.0, **kw), request(PROMPT, 0, 3.0, **kw),
                                   request(SHORT, 0, 3.0, **kw)],
                     batch_size=3, max_window=1.2, extend_stride=0.8)
    assert len(alone.windows) > 1
    assert torch.equal(batch[1].codes, alone.codes)


def test_text_length_depends_on_the_prompt_alone(bf16_bundle):
    """Text states are padded to a multiple of TEXT_PAD_MULTIPLE tokens: captions up to 32 tokens
    share a batch; a longer one is batched apart (its own padded length), whatever the order of the
    requests."""
    from lora.generation import engine

    model, processor, _, _ = bf16_bundle
    assert engine.TEXT_PAD_MULTIPLE == 32
    assert [engine.text_length(n) for n in (0, 1, 9, 32, 33, 64, 65)] == [32, 32, 32, 32, 64, 64, 96]
    very_long = " ".join(["drums"] * 70)  # 71 tokens
    reqs = [request(SHORT, 0, 1.0), request(very_long, 1, 1.0), request(PROMPT, 2, 1.0),
            request(LONG, 3, 1.0)]
    encoded = engine.encode_prompts(model, processor, [r.prompt for r in reqs])
    assert encoded[very_long][0].shape[0] == 71 and encoded[SHORT][0].shape[0] == 3
    lens = [engine.text_length(encoded[r.prompt][0].shape[0]) for r in reqs]
    assert lens == [32, 96, 32, 32]
    assert engine.make_batches(reqs, lens, 4) == [[0, 2, 3], [1]]
    assert engine.make_batches(reqs, lens, 2) == [[0, 2], [3], [1]]
    out = generate(bf16_bundle, reqs, batch_size=4)
    assert [r.text_length for r in out] == [32, 96, 32, 32] and [r.batch_size for r in out] == [3,
                                                                                                1, 3, 3]
    assert {r.decoding for r in out} == {"static"}
    hidden, mask = engine._text_states(model, processor, [SHORT, PROMPT], 3.0, torch.bfloat16,
                                       encoded=encoded)
    # cond half + null half, same shape
    assert hidden.shape[:2] == (4, 32) and hidden.dtype == torch.bfloat16
    assert mask[:2].sum(-1).tolist() == [3, 8] and mask[2:].sum().item() == 0
    assert hidden[0, 3:].abs().sum().item() == 0 and hidden[2:].abs().sum().item() == 0


def test_padding_changes_nothing_in_fp32(fp32_bundle):
    """The padded positions are masked: in fp32, states padded to the bucket give (to rounding) the
    logits of transformers' padding to the batch's longest caption."""
    from lora.generation.engine import _text_states
    from lora.modeling import loading

    model, processor, info, _ = fp32_bundle
    fam = loading.family_for(model)
    padded, pmask = _text_states(model, processor, [PROMPT, SHORT], 3.0, torch.float32)
    tight, tmask = fam.with_unconditional(*fam.encode_text(model, processor, [PROMPT, SHORT]))
    assert padded.shape[1] == 32 and tight.shape[1] == 8
    ids = torch.randint(0, info.vocab_size, (4 * info.num_codebooks, 6),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = fam.get_base(model)(**fam.condition(padded, pmask), decoder_input_ids=ids).logits
        b = fam.get_base(model)(**fam.condition(tight, tmask), decoder_input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_manifest_records_what_reproduces_a_file(tiny_model_dir, tmp_path):
    """The CLI in its default dtype: two captions of different lengths in one batch, then each
    regenerated alone from its manifest entry: the same tokens (tokens_sha1). The manifest says what
    that needs."""
    import importlib.metadata as md

    from lora import inference_lora
    from lora.modeling.precision import generation_dtype

    common = ["--model_path", str(tiny_model_dir), "--lora_model_path", "none", "--duration", "3"]
    assert inference_lora.main(common + ["--prompts", PROMPT, LONG, "--seed", "5", "--batch_size", "2",
                                         "--output_dir", str(tmp_path / "batch")]) == 0
    entries = json.loads((tmp_path / "batch" / "manifest.json").read_text(encoding="utf-8"))["files"]
    assert len(entries) == 2
    for i, e in enumerate(entries):
        s = e["settings"]
        assert s["dtype"] == str(generation_dtype("auto", "cpu")).replace("torch.", "")
        assert s["device"] == "cpu" and s["decoding"] == "static" and e["text_length"] == 32
        assert e["batch_size"] == 2 and e["batch_files"] == [x["file"] for x in entries]
        assert e["versions"]["torch"] == md.version("torch") and e["versions"]["transformers"]
        out = tmp_path / f"alone_{i}"
        assert inference_lora.main(common + ["--prompts", e["prompt"], "--seed", str(e["seed"]),
                                             "--output_dir", str(out)]) == 0
        again = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["files"][0]
        assert again["file"] == e["file"] and again["batch_size"] == 1
        assert again["tokens_sha1"] == e["tokens_sha1"], e["file"]
        a, _ = sf.read(tmp_path / "batch" / e["file"], dtype="float32")
        b, _ = sf.read(out / e["file"], dtype="float32")
        np.testing.assert_allclose(a, b, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Windows with an audio prompt (audiocraft's _generate_tokens)
# --------------------------------------------------------------------------------------------
def _audiocraft_windows(total, prompt, window, stride):
    """audiocraft.models.genmodel.BaseGenModel._generate_tokens in frames, with an audio prompt of
    ``prompt`` frames: (start, context, new) of every lm.generate call."""
    if total <= window:
        return [(0, prompt, total - prompt)]
    out, offset, prompt_len = [], 0, prompt
    while offset + prompt_len < total:
        # max_gen_len of this call: the window, prompt included
        gen_len = min(total - offset, window)
        assert prompt_len < gen_len  # LMModel.generate: start_offset < max_gen_len
        out.append((offset, prompt_len, gen_len - prompt_len))
        prompt_len = gen_len - stride  # gen_tokens[:, :, stride_tokens:]
        offset += stride
    return out


def test_plan_windows_keeps_the_whole_audio_prompt_as_the_first_context():
    from lora.generation.requests import plan_windows

    # prompt longer than window - stride: all 1400 frames are the context
    cases = [(3000, 1400, 1500, 900),
             (3000, 600, 1500, 900), (3000, 601, 1500, 900), (3000, 1499, 1500, 900),
             (6000, 1000, 1500, 900),
             (1600, 1000, 1500, 900), (1500, 1000, 1500, 900), (150, 45, 50, 30), (700, 99, 100, 99),
             (700, 1, 100, 1), (3000, 0, 1500, 900)]
    for total, prompt, window, stride in cases:
        ours = [(w.start, w.context, w.new) for w in plan_windows(total, prompt, window, stride)]
        assert ours == _audiocraft_windows(total, prompt, window, stride), (total, prompt, window, stride)
        # the whole prompt, then up to the window
        assert ours[0] == (0, prompt, min(total, window) - prompt)
        assert prompt + sum(n for _, _, n in ours) == total
        # each next window: the last window - stride
        for (s0, c0, n0), (s1, c1, _n1) in zip(ours, ours[1:]):
            assert s1 == s0 + stride and c1 == window - stride and s1 + c1 == s0 + c0 + n0
    assert [(w.start, w.context, w.new) for w in plan_windows(3000, 1400, 1500, 900)] == [
        (0, 1400, 100), (900, 600, 900), (1800, 600, 600)]
    # A prompt as long as the window (or the piece) leaves nothing to generate: audiocraft refuses
    # it, so do we.
    for total, prompt in [(3000, 1500), (3000, 1700), (1000, 1000)]:
        with pytest.raises(ValueError, match="shorter"):
            plan_windows(total, prompt, 1500, 900)


def test_long_audio_prompt_is_the_start_of_the_piece_and_the_first_context(bf16_bundle):
    """An audio prompt of 0.8 s with max_window 1 s and extend_stride 0.6 s (longer than max_window
    - extend_stride = 0.4 s): the first window is prompted with all 40 of its frames, the next ones
    with the last 20 frames of the window before; the prompt's frames are the first frames of the
    result."""
    from lora.generation.engine import encode_audio_prompt
    from lora.generation.requests import GenerationError

    model, _, info, _ = bf16_bundle
    t = np.arange(int(0.8 * 32000)) / 32000
    wav = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)))[None].astype(np.float32)
    codes, pid = encode_audio_prompt(model, info, wav)
    assert codes.shape == (info.num_codebooks, 40)
    r = generate(bf16_bundle, [request(SHORT, 1, 2.0, prompt_codes=codes, prompt_id=pid)],
                 max_window=1.0, extend_stride=0.6)[0]
    assert [(w.start, w.context, w.new) for w in r.windows] == [(0, 40, 10), (30, 20, 30), (60, 20, 20)]
    assert r.codes.shape == (info.num_codebooks, 100) and r.audio.shape == (1, 2 * 32000)
    assert torch.equal(r.codes[:, :40], codes)
    assert torch.equal(r.window_prompts[0], codes)
    for w, prompt, head in zip(r.windows, r.window_prompts, r.window_heads):
        assert torch.equal(prompt, r.codes[:, w.start: w.start + w.context])
        assert torch.equal(head, prompt)  # each window kept its prompt unchanged
    too_long = torch.cat([codes, codes[:, :10]], dim=-1)  # 50 frames = max_window
    with pytest.raises(GenerationError, match="shorter than max_window"):
        generate(bf16_bundle, [request(SHORT, 1, 2.0, prompt_codes=too_long, prompt_id="x")],
                 max_window=1.0, extend_stride=0.6)


def test_audio_prompt_longer_than_max_window_is_refused_on_the_command_line(tiny_model_dir, tmp_path):
    from lora import inference_lora
    from lora.common.cli import UserError

    t = np.arange(int(1.2 * 32000)) / 32000
    sf.write(tmp_path / "intro.wav", (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), 32000)
    args = ["--model_path", str(tiny_model_dir), "--lora_model_path", "none", "--prompts", SHORT,
            "--audio_prompt", str(tmp_path / "intro.wav"), "--duration", "3", "--max_window", "1.0",
            "--extend_stride", "0.6", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(UserError, match=r"1\.20 s long; it must be shorter than max_window \(1 s\)"):
        inference_lora.main(args)
    assert not any(Path(tmp_path / "out").glob("*.wav"))
