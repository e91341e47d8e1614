"""The token cache (lora.dataprep.token_cache): EnCodec codes and text states on disk, equal to
direct encoding, reused until a clip or the model changes, independent of the batch a clip was
encoded in; mono clips on a stereo model are said once. What training reads from it:
tests/test_dataset.py."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from lora.dataprep.token_cache import CACHE_VERSION, build_token_cache, cache_root, equal_length_batches
from lora.dataset import load_metadata


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from lora.config import ModelConfig
    from lora.modeling.loading import load_base_model

    return load_base_model(ModelConfig(model_path=str(tiny_model_dir)))


@pytest.fixture()
def data_copy(example_data_dir, tmp_path) -> Path:
    """A private copy of the example data (this test modifies clips)."""
    dst = tmp_path / "data"
    shutil.copytree(example_data_dir, dst, ignore=shutil.ignore_patterns("cache"))
    return dst


def test_cache_matches_direct_encoding_and_is_reused(tiny, data_copy):
    from safetensors.torch import load_file

    from lora.dataprep.audio import load_audio
    from lora.modeling.musicgen import encode_audio, encode_text

    model, processor, info = tiny
    records = load_metadata(data_copy)
    clips, stats = build_token_cache(records, model, processor, info, data_copy, batch_size=3,
                                     show_progress=False)
    assert stats["clips_encoded"] == len(records) and stats["clips_reused"] == 0
    assert stats["texts_encoded"] == len({r.text for r in records})

    # Codes are the model's EnCodec codes of each clip (int16 (K, T), T = ceil(N / hop)); text
    # states are the text encoder's valid-token states.
    for r, c in list(zip(records, clips))[:3]:
        wav = load_audio(r.path, info.sample_rate, info.audio_channels)
        direct = encode_audio(model, torch.from_numpy(wav)[None], info)[0]
        assert c.codes.dtype == torch.int16
        assert c.codes.shape == (info.num_codebooks,
                                 math.ceil(wav.shape[1] * info.frame_rate / info.sample_rate))
        # No padding (the example clips all have one length). Against the clip encoded alone, only
        # argmin near-ties of the quantizer may differ: EnCodec's LSTM rounds differently for
        # another batch size (tiny model, batch 3 vs 1: 0.09% of all codes, at most 1% of one
        # clip's; exact below for the batch).
        assert (c.codes.long() != direct).float().mean() < 0.03
        h, m = encode_text(model, processor, [r.text])
        n = int(m.sum())
        assert c.mask.tolist() == [1] * n
        # kept in float16: the encoder's states rounded once (BENCHMARKS.md, "Scale")
        assert c.hidden.dtype == torch.float16
        # (within float16's rounding, 2^-11 of the value, of this caption encoded alone)
        torch.testing.assert_close(c.hidden.float(), h[0, :n].float(), atol=1e-5, rtol=2**-11)
    # Exactly the codes of these three clips (the first batch the cache encodes: one length, in
    # metadata order) encoded together without any other clip.
    together = encode_audio(model, torch.stack([torch.from_numpy(load_audio(r.path, info.sample_rate,
                                                                            info.audio_channels))
                                                for r in records[:3]]), info)
    assert all(torch.equal(c.codes.long(), together[i]) for i, c in enumerate(clips[:3]))

    # Files: safetensors shards under data_dir/cache/<model identity>, weights-only loadable, one
    # for the clips and one for the captions (each entry a slice); no part or temp file left.
    root = cache_root(data_copy, info)
    assert info.identity in root.name and root.parent == data_copy / "cache"
    files = sorted(root.rglob("*.safetensors"))
    assert [p.name.split("-")[0] for p in files] == ["clips", "texts"]
    assert all(p.parent == root / "shards" for p in files)
    assert load_file(str(files[0]))["codes"].shape == (sum(c.num_frames for c in clips), info.num_codebooks)
    assert not [p for p in root.rglob("*") if p.name.startswith(".")]

    # A rerun reuses everything.
    clips2, stats2 = build_token_cache(records, model, processor, info, data_copy, show_progress=False)
    assert stats2["clips_encoded"] == 0 and stats2["clips_reused"] == len(records) and stats2["texts_encoded"] == 0
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(clips, clips2))


def test_changed_clip_or_model_invalidates_only_that(tiny, data_copy):
    model, processor, info = tiny
    records = load_metadata(data_copy)
    clips, _ = build_token_cache(records, model, processor, info, data_copy, show_progress=False)

    # Modify one clip: only that one is encoded again, and its codes follow the new audio.
    target = records[1]
    wav, sr = sf.read(target.path, always_2d=True)
    sf.write(target.path, np.roll(wav, 3000, axis=0) * 0.5, sr)
    clips2, stats = build_token_cache(records, model, processor, info, data_copy, show_progress=False)
    assert stats["clips_encoded"] == 1 and stats["clips_reused"] == len(records) - 1
    assert stats["texts_encoded"] == 0
    from lora.dataprep.audio import load_audio
    from lora.modeling.musicgen import encode_audio

    new = torch.from_numpy(load_audio(target.path, info.sample_rate, info.audio_channels))[None]
    assert torch.equal(clips2[1].codes.long(), encode_audio(model, new, info)[0])
    assert (clips2[1].codes != clips[1].codes).float().mean() > 0.3  # the new audio has other codes
    assert all(torch.equal(clips2[i].codes, clips[i].codes) for i in range(len(records)) if i != 1)

    # Another model (different identity): everything is encoded again, into its own folder.
    from dataclasses import replace

    other = replace(info, identity="0123456789abcdef")
    _, stats3 = build_token_cache(records, model, processor, other, data_copy, show_progress=False)
    assert stats3["clips_encoded"] == len(records) and stats3["texts_encoded"] > 0
    assert cache_root(data_copy, other).is_dir() and cache_root(data_copy, info).is_dir()

    # A corrupt cache file is re-encoded (not a crash), and set aside. (Written as a new file over
    # the name: the clips above still map the old one, which must not be truncated under them.)
    shards = sorted((cache_root(data_copy, info) / "shards").glob("clips-*.safetensors"))
    for f in shards:
        f.with_name("garbage").write_bytes(b"garbage")
        f.with_name("garbage").replace(f)
    clips4, stats4 = build_token_cache(records, model, processor, info, data_copy, show_progress=False)
    assert stats4["clips_encoded"] == len(records)
    assert all(f.with_suffix(".damaged").is_file() and not f.exists() for f in shards)
    assert all(torch.equal(clips4[i].codes, clips[i].codes) for i in range(len(records)) if i != 1)


def _cut(path: Path, seconds: float) -> None:
    wav, sr = sf.read(path, always_2d=True)
    sf.write(path, wav[:int(round(seconds * sr))], sr)


def test_codes_of_unequal_clips_do_not_depend_on_their_batch(tiny, data_copy):
    """EnCodec is not causal: a short clip zero-padded to a longer batch neighbour gets other codes
    in its last frames. A clip of a length no other clip has (an odd tail) must get exactly the
    codes of encoding it alone; clips that share a length are batched only with each other, so
    theirs are exactly those of encoding that group by itself, and stay the same when a neighbour's
    audio changes."""
    from lora.dataprep.audio import load_audio
    from lora.modeling.musicgen import encode_audio

    model, processor, info = tiny
    records = load_metadata(data_copy)[:8]
    # clips 0 and 3 share a length; 2, 5, 7 keep 4.0 s
    cuts = {0: 2.3, 1: 3.0, 3: 2.3, 4: 1.01, 6: 3.7}
    for i, seconds in cuts.items():
        _cut(records[i].path, seconds)
        records[i].duration = seconds
    clips, stats = build_token_cache(records, model, processor, info, data_copy, batch_size=4,
                                     text_states=False, show_progress=False)
    assert stats["clips_encoded"] == len(records)

    def wav(i):
        return torch.from_numpy(load_audio(records[i].path, info.sample_rate, info.audio_channels))

    def differing(got, want):
        return (got.long() != want).any(0).nonzero().flatten().tolist()

    mismatched = {}
    for i in (1, 4, 6):  # lengths no other clip has: exactly as encoded alone
        alone = encode_audio(model, wav(i)[None], info)[0]
        T = math.ceil(wav(i).shape[-1] * info.frame_rate / info.sample_rate)
        assert clips[i].codes.shape == alone.shape == (info.num_codebooks, T)
        if not torch.equal(clips[i].codes.long(), alone):
            mismatched[f"clip {i} ({cuts[i]} s) vs "
                       f"alone"] = f"frames {differing(clips[i].codes, alone)} of {T}"
    # one length each: exactly as encoded together, without the others
    for group in ([0, 3], [2, 5, 7]):
        together = encode_audio(model, torch.stack([wav(i) for i in group]), info)
        for j, i in enumerate(group):
            if not torch.equal(clips[i].codes.long(), together[j]):
                mismatched[f"clip {i} vs its length's group {group}"] = \
                    f"frames {differing(clips[i].codes, together[j])}"
    assert not mismatched, f"a clip's codes depend on other clips of its batch: {mismatched}"

    # The same-length neighbour of clip 0 gets other audio: clip 0's codes do not move (to the last
    # bit).
    w3 = wav(3).numpy()
    sf.write(records[3].path, (0.5 * np.roll(w3, 4000, axis=1)).T, info.sample_rate)
    shutil.rmtree(cache_root(data_copy, info))
    clips2, _ = build_token_cache(records, model, processor, info, data_copy, batch_size=4,
                                  text_states=False, show_progress=False)
    assert not torch.equal(clips2[3].codes, clips[3].codes)
    assert all(torch.equal(clips2[i].codes, clips[i].codes) for i in range(len(records)) if i != 3)


def test_equal_length_batches_never_mix_lengths():
    waves = [(i, np.zeros((1, n), np.float32)) for i,
             n in enumerate([5, 5, 3, 5, 5, 3, 7, 5, 3, 3, 9, 5])]
    batches = list(equal_length_batches(iter(waves), 2))
    assert sorted(k for b in batches for k, _ in b) == list(range(12))  # every clip once
    assert all(len({w.shape[-1] for _, w in b}) == 1 and 1 <= len(b) <= 2 for b in batches)
    # 5 x6 -> 3 batches, 3 x4 -> 2, 7 and 9 alone
    assert sorted(len(b) for b in batches) == [1, 1, 2, 2, 2, 2, 2]
    # Memory stays bounded whatever the order: at most max_waiting clips wait in unfinished batches.
    many = [(i, np.zeros((1, 100 + i % 7), np.float32)) for i in range(50)]
    waiting, seen = 0, 0

    def counted():
        nonlocal waiting, seen
        for pair in many:
            seen += 1
            yield pair
    out = []
    for b in equal_length_batches(counted(), 4, max_waiting=6):
        out += b
        waiting = max(waiting, seen - len(out))
    assert sorted(k for k, _ in out) == list(range(50)) and waiting <= 7


def test_a_cache_of_an_older_version_is_not_reused(tiny, data_copy):
    """Version-1 caches hold padded codes: a cache folder of another CACHE_VERSION is never read."""
    model, processor, info = tiny
    records = load_metadata(data_copy)[:3]
    build_token_cache(records, model, processor, info, data_copy, show_progress=False)
    root = cache_root(data_copy, info)
    assert CACHE_VERSION >= 2 and root.name == f"{info.identity}-v{CACHE_VERSION}"
    old = root.with_name(f"{info.identity}-v1")
    root.rename(old)
    _, stats = build_token_cache(records, model, processor, info, data_copy, show_progress=False)
    assert stats["clips_encoded"] == 3 and stats["clips_reused"] == 0 and root.is_dir()


def test_no_text_cache_when_text_encoder_trains(tiny, data_copy):
    model, processor, info = tiny
    records = load_metadata(data_copy)[:4]
    clips, stats = build_token_cache(records, model, processor, info, data_copy, text_states=False,
                                     show_progress=False)
    assert stats["texts_encoded"] == 0 and all(c.hidden is None for c in clips)
    assert not list(cache_root(data_copy, info).rglob("texts-*"))


def test_stereo_model_codes(tiny_stereo_model_dir, data_copy):
    from lora.config import ModelConfig
    from lora.modeling.loading import load_base_model

    model, processor, info = load_base_model(ModelConfig(model_path=str(tiny_stereo_model_dir)))
    records = load_metadata(data_copy)[:2]
    clips, stats = build_token_cache(records, model, processor, info, data_copy, show_progress=False)
    assert clips[0].codes.shape[0] == info.num_codebooks == 8
    assert all(k.endswith("-ch2-fp32") for k in _clip_keys(cache_root(data_copy, info)))


def _clip_keys(root: Path) -> list[str]:
    from lora.dataprep.cache_store import scan

    return sorted(scan(root).clips)


def test_cache_key_records_the_encoder_precision(tiny, data_copy, monkeypatch):
    """Codes are keyed by the precision they were made in: codes of another precision are never
    reused."""
    from safetensors import safe_open

    from lora.dataprep import token_cache

    model, processor, info = tiny
    records = load_metadata(data_copy)[:1]
    build_token_cache(records, model, processor, info, data_copy, show_progress=False)
    files = list((cache_root(data_copy, info) / "shards").glob("clips-*"))
    assert [k.rsplit("-", 1)[-1] for k in _clip_keys(cache_root(data_copy, info))] == ["fp32"]
    with safe_open(str(files[0]), "pt") as f:
        assert json.loads(f.metadata()["token_cache"])["precision"] == "fp32"
    _, stats = build_token_cache(records, model, processor, info, data_copy, show_progress=False)
    assert stats["clips_reused"] == 1
    monkeypatch.setattr(token_cache, "ENCODER_PRECISION", "bf16")
    _, stats = build_token_cache(records, model, processor, info, data_copy, show_progress=False)
    assert stats["clips_encoded"] == 1 and stats["clips_reused"] == 0


def test_mono_clips_on_a_stereo_model_are_said_once(tiny_stereo_model_dir, example_data_dir,
                                                    tmp_path, caplog):
    from lora.config import ModelConfig
    from lora.dataprep.token_cache import build_token_cache
    from lora.dataset import load_metadata
    from lora.modeling.loading import load_base_model

    model, processor, info = load_base_model(ModelConfig(model_path=str(tiny_stereo_model_dir)))
    data = tmp_path / "data"
    shutil.copytree(example_data_dir, data, ignore=shutil.ignore_patterns("cache"))
    records = load_metadata(data)
    assert sf.info(records[0].path).channels == 1
    build_token_cache(records, model, processor, info, data, show_progress=False)
    lines = [r.message for r in caplog.records if "copied to both channels" in r.message]
    assert lines == [f"{len(records)} of {len(records)} clip(s) are mono but the model is stereo: "
                     f"each is copied to both channels, so there is no stereo image to learn "
                     f"(prepare the data with --channels 2 from stereo sources)"]
