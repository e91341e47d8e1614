"""The token cache's cost grows with new audio only: a warm start reads no audio (the cache index),
a changed clip is always read and encoded again, --verify_cache trusts nothing, and an entry is
keyed by the bytes that were actually encoded (issue 33, class B: a clip rewritten while the cache
is built can not poison it)."""

from __future__ import annotations

import builtins
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from lora.dataprep import cache_store
from lora.dataprep.token_cache import build_token_cache, cache_root
from lora.dataset import load_metadata


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from lora.config import ModelConfig
    from lora.modeling.loading import load_base_model

    return load_base_model(ModelConfig(model_path=str(tiny_model_dir)))


@pytest.fixture()
def data(example_data_dir, tmp_path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(example_data_dir, dst, ignore=shutil.ignore_patterns("cache"))
    return dst


@pytest.fixture()
def no_racy_window(monkeypatch):
    """The files of a test were all written a moment ago; the index remembers a file only when its
    last change is RACY_SECONDS older than the read (see test_a_file_changed_just_before_the_build
    _is_read_again_next_time), so tests that need a warm index set the window to 0."""
    monkeypatch.setattr(cache_store, "RACY_SECONDS", 0.0)


def _encode_alone(tiny, path: Path) -> torch.Tensor:
    from lora.dataprep.audio import load_audio
    from lora.modeling.musicgen import encode_audio

    model, _, info = tiny
    return encode_audio(model, torch.from_numpy(load_audio(path, info.sample_rate, info.audio_channels))[None],
                        info)[0]


def _rewrite_same_size(path: Path, seed: int) -> None:
    """Other audio of exactly the same length, format and so size."""
    wav, sr = sf.read(path, always_2d=True)
    other = np.random.default_rng(seed).uniform(-0.5, 0.5, wav.shape)
    size = path.stat().st_size
    sf.write(path, other, sr, subtype=sf.info(str(path)).subtype)
    assert path.stat().st_size == size


def _bytes_read() -> int:
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("rchar"))


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="reads /proc/self/io (Linux)")
def test_a_warm_start_reads_no_audio(tiny, data, no_racy_window, monkeypatch):
    model, processor, info = tiny
    records = load_metadata(data)
    clips, stats = build_token_cache(records, model, processor, info, data, show_progress=False)
    assert stats["clips_read"] == len(records)
    index = json.loads((cache_root(data, info) / "index.json").read_text())["files"]
    assert sorted(index) == sorted(r.audio for r in records)  # names relative to the data folder

    audio_bytes = sum(r.path.stat().st_size for r in records)
    before = _bytes_read()
    clips2, stats2 = build_token_cache(records, model, processor, info, data, show_progress=False)
    read = _bytes_read() - before
    assert stats2["clips_read"] == 0 and stats2["clips_encoded"] == 0
    assert stats2["clips_reused"] == len(records)
    # Everything read with read() (the index, the shards' headers) is a small fraction of the audio.
    assert read < 0.1 * audio_bytes, (read, audio_bytes)
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(clips, clips2))

    # No clip file is even opened: a warm start works with the audio unreadable.
    real_open = builtins.open

    def guarded(file, *a, **k):
        assert not str(file).endswith(".wav"), f"a warm start opened {file}"
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr("lora.dataprep.token_cache.load_audio",
                        lambda *a, **k: pytest.fail("a warm start decoded audio"))
    _, stats3 = build_token_cache(records, model, processor, info, data, show_progress=False)
    assert stats3["clips_reused"] == len(records)


@pytest.mark.parametrize("how", ["same size, same mtime second", "same size, mtime restored to the ns"])
def test_a_changed_clip_is_always_encoded_again(tiny, data, no_racy_window, how):
    model, processor, info = tiny
    records = load_metadata(data)[:4]
    clips, _ = build_token_cache(records, model, processor, info, data, batch_size=1, show_progress=False)
    target = records[2].path
    st = os.stat(target)
    _rewrite_same_size(target, seed=5)
    if how == "same size, same mtime second":
        second = st.st_mtime_ns // 10**9 * 10**9
        mtime = second + (st.st_mtime_ns - second + 123_456_789) % 10**9
        assert mtime != st.st_mtime_ns
    else:
        mtime = st.st_mtime_ns
    os.utime(target, ns=(st.st_atime_ns, mtime))
    new = os.stat(target)
    assert new.st_size == st.st_size and new.st_mtime_ns // 10**9 == st.st_mtime_ns // 10**9
    clips2, stats = build_token_cache(records, model, processor, info, data, batch_size=1,
                                      show_progress=False)
    assert stats["clips_read"] == 1 and stats["clips_encoded"] == 1
    assert torch.equal(clips2[2].codes.long(), _encode_alone(tiny, target))
    assert (clips2[2].codes != clips[2].codes).float().mean() > 0.3
    assert all(torch.equal(clips2[i].codes, clips[i].codes) for i in (0, 1, 3))


def test_a_file_changed_just_before_the_build_is_read_again_next_time(tiny, data):
    """A file changed within RACY_SECONDS of the read is not remembered by its stat: on a file
    system with coarse timestamps a second change could keep every time, so the next build reads
    it again (once it has settled, it is remembered)."""
    model, processor, info = tiny
    records = load_metadata(data)[:3]
    target = records[1].path
    _rewrite_same_size(target, seed=9)  # changed just now
    _, stats = build_token_cache(records, model, processor, info, data, show_progress=False)
    assert stats["clips_read"] == 3
    index = json.loads((cache_root(data, info) / "index.json").read_text())["files"]
    assert records[1].audio not in index
    _, stats2 = build_token_cache(records, model, processor, info, data, show_progress=False)
    assert stats2["clips_read"] >= 1 and stats2["clips_encoded"] == 0


def test_verify_cache_rehashes_every_clip_and_corrects_the_index(tiny, data, no_racy_window, caplog):
    """The index is trusted by default (a change that keeps device, inode, size, mtime_ns and ctime_ns
    is not seen: here one is forged into the index); --verify_cache reads every file again, encodes
    what really is there and corrects the index."""
    model, processor, info = tiny
    records = load_metadata(data)[:4]
    clips, _ = build_token_cache(records, model, processor, info, data, batch_size=1, show_progress=False)
    root = cache_root(data, info)
    doc = json.loads((root / "index.json").read_text())
    a, b = records[0].audio, records[1].audio
    doc["files"][a][5] = doc["files"][b][5]  # the index now says clip 0 holds clip 1's bytes
    (root / "index.json").write_text(json.dumps(doc))
    trusted, stats = build_token_cache(records, model, processor, info, data, batch_size=1,
                                       show_progress=False)
    assert stats["clips_read"] == 0 and torch.equal(trusted[0].codes, clips[1].codes)
    verified, stats = build_token_cache(records, model, processor, info, data, batch_size=1,
                                        show_progress=False, verify=True)
    assert stats["clips_read"] == 4 and stats["clips_encoded"] == 0
    assert all(torch.equal(v.codes, c.codes) for v, c in zip(verified, clips))
    assert "1 clip file(s) changed without a change of size or times" in caplog.text
    again, stats = build_token_cache(records, model, processor, info, data, batch_size=1,
                                     show_progress=False)
    assert stats["clips_read"] == 0 and torch.equal(again[0].codes, clips[0].codes)


def test_verify_cache_finds_a_damaged_shard(tiny, data, no_racy_window, caplog):
    """A shard's name is its sha1: a flipped byte that leaves the file readable is found by
    --verify_cache, the shard set aside and its entries encoded again."""
    model, processor, info = tiny
    records = load_metadata(data)[:4]
    clips, _ = build_token_cache(records, model, processor, info, data, show_progress=False)
    shard = next((cache_root(data, info) / "shards").glob("clips-*.safetensors"))
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0x01  # one bit of the last code
    tmp = shard.with_name("flipped")
    tmp.write_bytes(bytes(raw))
    tmp.replace(shard)  # (a new file: the clips above map the old one)
    _, stats = build_token_cache(records, model, processor, info, data, show_progress=False)
    assert stats["clips_encoded"] == 0  # not checked by default: the bytes are only read
    fixed, stats = build_token_cache(records, model, processor, info, data, show_progress=False,
                                     verify=True)
    assert stats["clips_encoded"] == 4 and shard.with_suffix(".damaged").is_file()
    assert "does not match its checksum" in caplog.text
    assert all(torch.equal(f.codes, c.codes) for f, c in zip(fixed, clips))


def test_an_entry_is_keyed_by_the_bytes_it_encodes(tiny, data, monkeypatch):
    """Issue 33 B: prepare_data --overwrite rewrote a clip while a training run built the cache. The
    build before hashed the file, then decoded it again later: the new audio was stored under the
    old bytes' hash, and every later build that met the old bytes reused the wrong codes. Now each
    file is read once, and the bytes hashed are the bytes decoded."""
    model, processor, info = tiny
    records = load_metadata(data)[:1]
    target = records[0].path
    old_bytes = target.read_bytes()
    real_open = builtins.open
    rewritten = []

    class Rewritten:
        """The clip file as the build reads it; when it is closed, prepare_data rewrites the clip
        (a new file renamed over it, as prepare_data writes)."""

        def __init__(self, fh):
            self.fh = fh

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

        def close(self):
            self.fh.close()
            if not rewritten:
                rewritten.append(True)
                wav, sr = sf.read(str(target) + ".orig", always_2d=True)
                sf.write(str(target) + ".new.wav", np.roll(wav, 5000, axis=0) * 0.5, sr)
                os.replace(str(target) + ".new.wav", target)

    shutil.copy(target, str(target) + ".orig")

    def spying_open(file, mode="r", *a, **k):
        fh = real_open(file, mode, *a, **k)
        return Rewritten(fh) if str(file) == str(target) and "r" in mode and not rewritten else fh

    monkeypatch.setattr(builtins, "open", spying_open)
    build_token_cache(records, model, processor, info, data, show_progress=False)
    monkeypatch.setattr(builtins, "open", real_open)
    assert rewritten and target.read_bytes() != old_bytes

    # The old bytes come back (prepare_data run again with the earlier settings): what the cache
    # gives for them must be their own codes.
    target.write_bytes(old_bytes)
    clips, _ = build_token_cache(records, model, processor, info, data, show_progress=False)
    assert torch.equal(clips[0].codes.long(), _encode_alone(tiny, target))


def test_clips_are_views_of_the_mapped_shards(tiny, data):
    """Training's clips are not copies: every clip's codes and text states are views into the
    storage of one memory-mapped shard."""
    model, processor, info = tiny
    records = load_metadata(data)
    clips, _ = build_token_cache(records, model, processor, info, data, show_progress=False)
    codes = {c.codes.untyped_storage().data_ptr() for c in clips}
    hidden = {c.hidden.untyped_storage().data_ptr() for c in clips}
    assert len(codes) == 1 and len(hidden) == 1
    assert clips[0].hidden.dtype == torch.float16 and clips[0].mask.dtype == torch.int8
