"""The token cache's files: a write that fails leaves nothing that looks valid, an interrupted build
resumes from its parts (and ends with the cache an uninterrupted build makes), incremental builds
keep the shards few, and reading the shards costs the process's heap nothing (memory-mapped)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lora.dataprep import cache_store, token_cache
from lora.dataprep.token_cache import build_token_cache, cache_root
from lora.dataset import load_metadata
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from lora.config import ModelConfig
    from lora.modeling.loading import load_base_model

    return load_base_model(ModelConfig(model_path=str(tiny_model_dir)))


def _copy(example_data_dir: Path, dst: Path) -> Path:
    shutil.copytree(example_data_dir, dst, ignore=shutil.ignore_patterns("cache"))
    return dst


def _shards(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in cache_store.shard_files(root)}


def test_a_write_that_fails_leaves_no_file_that_looks_valid(tmp_path, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        raw = Path(filename).read_bytes()
        Path(filename).write_bytes(raw[:len(raw) // 2])  # the disk filled up half-way
        raise OSError(28, "No space left on device")

    root = tmp_path / "cache" / "x-v4"
    items = [("k1", 0, {"codes": torch.ones(5, 4, dtype=torch.int16)})]
    cache_store.write_part(root, "b", 0, 0, "clips", items, {}, {})
    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(OSError):
        cache_store.write_part(root, "b", 1, 0, "clips", [("k2", 0, items[0][2])], {}, {})
    with pytest.raises(OSError):
        cache_store.write_shards(root, "clips", items, {})
    # What is left: the first part, whole; no half file under a name anything reads.
    assert [p.name for p in root.rglob("*") if p.is_file()] == ["b-r000-00000.safetensors"]
    cat = cache_store.scan(root)
    assert list(cat.clips) == ["k1"] and not cat.damaged
    assert torch.equal(cat.clips["k1"].get("k1")["codes"], items[0][2]["codes"])


def test_an_interrupted_build_resumes_from_its_parts(tiny, example_data_dir, tmp_path, monkeypatch):
    model, processor, info = tiny
    whole = _copy(example_data_dir, tmp_path / "whole")
    records = load_metadata(whole)
    build_token_cache(records, model, processor, info, whole, batch_size=2, show_progress=False)

    data = _copy(example_data_dir, tmp_path / "data")
    records = load_metadata(data)
    monkeypatch.setattr(cache_store, "PART_ENTRIES", 2)  # a part after every batch of 2
    real, calls = token_cache._encode_clip_batch, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C in the 4th batch
        return real(*a, **k)

    monkeypatch.setattr(token_cache, "_encode_clip_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_token_cache(records, model, processor, info, data, batch_size=2, show_progress=False)
    root = cache_root(data, info)
    assert len(cache_store.part_files(root)) == 3 and not cache_store.shard_files(root)
    monkeypatch.setattr(token_cache, "_encode_clip_batch", real)
    clips, stats = build_token_cache(records, model, processor, info, data, batch_size=2,
                                     show_progress=False)
    assert stats["clips_encoded"] == len(records) - 6 and stats["clips_reused"] == 6
    assert not cache_store.part_files(root)
    # The batches of the rest are the ones the uninterrupted build made: the same shards, bytes and all.
    assert _shards(root) == _shards(cache_root(whole, info))


def test_incremental_builds_keep_the_shards_few(tiny, example_data_dir, tmp_path, monkeypatch):
    model, processor, info = tiny
    data = _copy(example_data_dir, tmp_path / "data")
    records = load_metadata(data)
    monkeypatch.setattr(cache_store, "MAX_SHARDS", 3)
    for n in range(2, len(records) + 1, 2):  # 8 builds, each adding 2 clips and 2 captions
        clips, stats = build_token_cache(records[:n], model, processor, info, data, show_progress=False)
        assert stats["clips_encoded"] == 2
        counts = [sum(p.name.startswith(k) for p in cache_store.shard_files(cache_root(data, info)))
                  for k in ("clips", "texts")]
        assert max(counts) <= 3, counts
    everything, stats = build_token_cache(records, model, processor, info, data, show_progress=False)
    assert stats["clips_encoded"] == stats["texts_encoded"] == 0
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(everything, clips))


_READER = """
import json, sys
from pathlib import Path
import safetensors.torch, torch  # (imported before the first measure: they are not the data)
from lora.dataprep import cache_store

def rss():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out

before = rss()
cat = cache_store.scan(Path(sys.argv[1]))
views = [cat.texts[k].get(k) for k in sorted(cat.texts)]
total = sum(float(v["hidden"].float().sum()) for v in views)  # every byte read
after = rss()
print(json.dumps({"n": len(views), "anon": after["RssAnon"] - before["RssAnon"],
                  "file": after["RssFile"] - before["RssFile"]}))
"""


@pytest.mark.slow  # (over ~2 s: the full suite runs it, the fast loop leaves it out)
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status (Linux)")
def test_reading_the_shards_costs_no_heap(tmp_path):
    """2,000 captions' text states of musicgen-small's width (32 tokens x 768, float16: 98 MB): read
    whole by a fresh process, its own memory (RssAnon) grows by a small fraction of that; the pages
    are the file's (RssFile), shared with every process that reads the same shard."""
    import json
    import subprocess
    import sys

    root = tmp_path / "cache" / "x-v4"
    g = torch.Generator().manual_seed(0)
    items = [(f"t{i:05d}", 0, {"hidden": torch.randn(32, 768, generator=g).half(),
                                "mask": torch.ones(32, dtype=torch.int8)}) for i in range(2000)]
    data_bytes = sum(p.numel() * p.element_size() for _, _, d in items for p in d.values())
    cache_store.write_shards(root, "texts", items, {})
    root_dir = ROOT
    r = subprocess.run([sys.executable, "-c", _READER, str(root)], capture_output=True, text=True,
                       cwd=root_dir, env={**__import__("os").environ, "PYTHONPATH": str(root_dir)},
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.splitlines()[-1])
    assert got["n"] == 2000
    assert got["anon"] < 0.1 * data_bytes, (got, data_bytes)
    assert got["file"] > 0.5 * data_bytes, (got, data_bytes)
