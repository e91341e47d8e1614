"""A melody clip's conditioning does not depend on its batch (lora.modeling.musicgen_melody
.teacher_forced_logits): each clip reads its caption at the length generation gives it
(``text_length``), alone or batched with a long caption, in training (cached text or the text
encoder training), validation and the evaluation's held-out likelihood, and equal to transformers'
forward given that caption padded to that length."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

_no_autocast = contextlib.nullcontext
LONG = " ".join(["deep house groove with warm bass and bright piano chords"] * 5)  # > 32 tokens


@pytest.fixture(scope="module")
def melody(tmp_path_factory):
    from lora.modeling import musicgen_melody as M
    from lora.modeling.tiny_model import ensure_tiny_model

    d = ensure_tiny_model(tmp_path_factory.mktemp("tiny_melody") / "mono", stereo=False, melody=True)
    model = M.from_pretrained(str(d), "sdpa").eval()
    return model, M.load_processor(str(d)), M.model_info(model, str(d), "test")


def _clip(model, processor, info, name: str, text: str, frames: int, seed: int):
    """A cached clip as the token cache holds it: the caption's own states, random codes and a
    random tune."""
    from lora.dataset import CachedClip
    from lora.modeling import chroma as C
    from lora.modeling import musicgen_melody as M

    hidden, mask = M.encode_text(model, processor, [text])
    n = max(1, int(mask[0].sum()))
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, info.vocab_size, (info.num_codebooks, frames), generator=g)
    tune = torch.randint(0, 12, (C.frames(frames * 640),), generator=g)
    return CachedClip(id=name, text=text, split="valid", codes=codes.to(torch.int16),
                      hidden=hidden[0, :n].detach(), mask=mask[0, :n], chroma=tune.to(torch.int8))


@pytest.fixture(scope="module")
def clips(melody):
    model, processor, info = melody
    short = _clip(model, processor, info, "short", "ambient pad", 40, 1)
    long = _clip(model, processor, info, "long", LONG, 60, 2)
    assert short.hidden.shape[0] <= 32 < long.hidden.shape[0] <= 64
    return short, long


def _reference(model, processor, info, clip) -> torch.Tensor:
    """transformers' forward with the caption padded to the length generation gives it (the engine's
    text_length, as tests/test_melody.py compares generation): per-codebook CE of the clip."""
    from lora.generation.engine import text_length
    from lora.modeling import musicgen_melody as M

    n = clip.hidden.shape[0]
    tokens = processor(text=[clip.text], padding="max_length", max_length=text_length(n),
                       return_tensors="pt")
    codes = clip.codes.long()[None]
    lengths = torch.tensor([codes.shape[-1]])
    dec_in, labels = M.build_delay_pattern(codes, lengths, info)
    chroma = M.melody_frames(clip.chroma, info.chroma_length)[None]
    with torch.no_grad():
        logits = model(**tokens, input_features=chroma, decoder_input_ids=dec_in).logits
    return M.codebook_loss(logits, labels).per_codebook


def test_heldout_likelihood_of_a_clip_is_the_same_alone_and_batched_with_a_long_caption(melody, clips):
    """evaluate's held-out likelihood: batch size 1 and 2 (the short clip beside the long caption)
    give the short clip the same per-codebook CE, transformers' at generation's text length. Padding
    every batch to the longest caption (or to 512) gives another number."""
    from lora.scoring.likelihood import heldout_likelihood

    model, processor, info = melody
    short, long = clips
    want = _reference(model, processor, info, short)
    per_clip = {}
    for bs in (1, 2):
        res = heldout_likelihood(model, [short, long], info, max_frames=100, batch_size=bs,
                                 device=torch.device("cpu"))
        per_clip[bs] = {c["id"]: c["ce"] for c in res["per_clip"]}
    assert per_clip[1]["short"] == pytest.approx(per_clip[2]["short"], abs=1e-5)
    assert per_clip[1]["long"] == pytest.approx(per_clip[2]["long"], abs=1e-5)
    assert per_clip[1]["short"] == pytest.approx(float(want.mean()), abs=1e-5)
    assert per_clip[1]["long"] == pytest.approx(float(_reference(model, processor, info, long).mean()),
                                                abs=1e-5)


@pytest.mark.parametrize("cache_text", [True, False])
def test_training_loss_of_a_clip_does_not_depend_on_its_batch(melody, clips, cache_text):
    """The training step (cached text states, or the text encoder encoding the captions on the fly)
    and validation: a clip's per-codebook loss alone equals its loss batched with a long caption,
    and transformers' at generation's text length; the dropped condition of a long caption keeps
    its length (generate's unconditional half has the conditional text's length)."""
    from lora.dataset import CachedTokenDataset, collate_tokens
    from lora.modeling import musicgen_melody as M
    from lora.training.step import heldout_loss, step_loss

    model, processor, info = melody
    short, long = clips
    if not cache_text:  # the text encoder trains: no cached states, captions encoded per batch
        short, long = (dataclasses.replace(c, hidden=None, mask=None) for c in clips)
    ds = CachedTokenDataset([short, long], 100, train=False, info=info)
    cpu = torch.device("cpu")

    def per_clip(items):
        with torch.no_grad():
            loss = step_loss(model, processor, info, collate_tokens(items, info.pad_token_id), cpu,
                             _no_autocast, cache_text)
        s, n = loss.per_clip()
        return s / n

    alone = per_clip([ds[0]])[0]
    batched = per_clip([ds[0], ds[1]])
    torch.testing.assert_close(batched[0], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone.float(), _reference(model, processor, info, clips[0]),
                               atol=1e-5, rtol=1e-5)
    if cache_text:
        collate = lambda items: collate_tokens(items, info.pad_token_id)  # noqa: E731
        res = {bs: heldout_loss(model, processor, info, ds, collate, bs, cpu, _no_autocast, True)
               for bs in (1, 2)}
        assert res[1]["val_loss"] == pytest.approx(res[2]["val_loss"], abs=1e-6)
        model.eval()
        # a dropped long caption: zeros of its own padded length (64), in a batch with a short one
        drop = CachedTokenDataset([long], 100, train=True, cond_dropout=1.0, info=info)[0]
        assert drop["dropped"] and drop["text_length"] == 64 and not drop["mask"].any()
        batch = collate_tokens([ds[0], drop], info.pad_token_id)
        assert batch["text_lengths"] == [32, 64]
        assert M.row_text_lengths(batch["mask"], None)[1] == 32  # (what the mask alone would say)
