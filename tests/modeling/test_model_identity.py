"""The token cache key: a model's identity covers the whole content of every file the cached tokens
depend on (config, tokenizer, processor, all weight files), and is remembered across starts without
re-reading the weights (a per-user sidecar keyed by path, size, mtime and ctime)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from lora.modeling import loading
from lora.modeling.loading import IDENTITY_FILES, hash_cache_path, identity_files, model_identity

MiB = 1 << 20


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch) -> Path:
    """Each test gets its own per-user cache folder (the sidecar lives there)."""
    cache = tmp_path / "xdg_cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


@pytest.fixture()
def hash_calls(monkeypatch) -> list[str]:
    """The file names that lora.modeling.loading.hash_file reads in full, in call order."""
    calls: list[str] = []
    real = loading.hash_file

    def counting(path):
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(loading, "hash_file", counting)
    return calls


def _age(folder: Path, seconds: float = 60.0) -> None:
    """Set every file's mtime into the past (a file modified within 2 s of hashing is not
    remembered)."""
    t = time.time_ns() - int(seconds * 1e9)
    for p in folder.iterdir():
        os.utime(p, ns=(t, t))


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x01]))


def _model_folder(root: Path, weights_mib: int = 8) -> Path:
    """A model-like folder: config, tokenizer and processor files and one large safetensors file."""
    from safetensors.torch import save_file

    d = root / "model"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "musicgen"}))
    for name in IDENTITY_FILES:
        if name != "config.json":
            (d / name).write_bytes(f"contents of {name}\n".encode() * 10)
    g = torch.Generator().manual_seed(0)
    save_file({"text_encoder.w": torch.randn(weights_mib * MiB // 4, generator=g)},
              str(d / "model.safetensors"))
    (d / "README.md").write_text("not part of the identity")
    _age(d)
    return d


def test_identity_files_cover_weights_shards_tokenizer_and_processor(tmp_path):
    d = _model_folder(tmp_path, weights_mib=1)
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json", "pytorch_model.bin"):
        (d / name).write_bytes(b"x")
    names = [p.name for p in identity_files(d)]
    assert names == sorted(names)
    assert set(names) == set(IDENTITY_FILES) | {"model.safetensors", "model-00001-of-00002.safetensors",
                                                "model-00002-of-00002.safetensors",
                                                "model.safetensors.index.json", "pytorch_model.bin"}
    assert "README.md" not in names


def test_a_weight_change_in_the_middle_of_a_large_file_changes_the_identity(tmp_path):
    d = _model_folder(tmp_path, weights_mib=8)
    weights = d / "model.safetensors"
    before = model_identity(d)
    # 4 MiB from either end: outside a first/last-MiB sample
    _flip_byte(weights, weights.stat().st_size // 2)
    assert model_identity(d) != before
    # back to the original bytes: back to the original identity
    _flip_byte(weights, weights.stat().st_size // 2)
    assert model_identity(d) == before


@pytest.mark.parametrize("name",
                         ["tokenizer.json", "spiece.model", "tokenizer_config.json",
                          "special_tokens_map.json",
                                  "preprocessor_config.json", "processor_config.json",
                          "generation_config.json"])
def test_a_tokenizer_or_processor_change_changes_the_identity(tmp_path, name):
    d = _model_folder(tmp_path, weights_mib=1)
    before = model_identity(d)
    _flip_byte(d / name, 3)  # same size
    assert model_identity(d) != before


def test_a_changed_or_added_shard_changes_the_identity(tmp_path):
    d = _model_folder(tmp_path, weights_mib=1)
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    (d / "model-00002-of-00002.safetensors").write_bytes(b"\0" * (3 * MiB))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    before = model_identity(d)
    _flip_byte(d / "model-00002-of-00002.safetensors", int(1.5 * MiB))
    changed = model_identity(d)
    assert changed != before
    (d / "model-00003-of-00003.safetensors").write_bytes(b"\0")
    assert model_identity(d) != changed


def test_the_tiny_models_weights_changed_past_its_first_mib(tmp_path, tiny_model_dir):
    """The case the issue found: bytes of a saved model edited in the middle (e.g. a merged
    text-encoder LoRA)."""
    d = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, d)
    before = model_identity(d)
    assert before == model_identity(tiny_model_dir)
    _flip_byte(d / "model.safetensors", (d / "model.safetensors").stat().st_size - MiB // 2)
    assert model_identity(d) != before


def test_an_unchanged_folder_is_not_read_again(tmp_path, hash_calls):
    d = _model_folder(tmp_path)
    first = model_identity(d)
    # the first start reads every file in full
    assert sorted(hash_calls) == [p.name for p in identity_files(d)]
    sidecar = json.loads(hash_cache_path().read_text())
    assert str((d / "model.safetensors").resolve()) in sidecar["files"]
    hash_calls.clear()
    assert model_identity(d) == first and model_identity(d) == first
    assert hash_calls == []  # later starts read no file: size, mtime and ctime match the sidecar
    # (the hub path passes the model id)
    assert model_identity(d, extra="facebook/musicgen-small") != first


def test_a_touched_file_is_hashed_again_and_keeps_its_identity(tmp_path, hash_calls):
    d = _model_folder(tmp_path)
    first = model_identity(d)
    hash_calls.clear()
    t = time.time_ns() - 30 * 10**9
    os.utime(d / "model.safetensors", ns=(t, t))  # new mtime, same bytes
    assert model_identity(d) == first
    assert hash_calls == ["model.safetensors"]  # only the touched file
    hash_calls.clear()
    assert model_identity(d) == first and hash_calls == []  # and it is remembered again


def test_a_file_written_just_now_is_not_remembered(tmp_path, hash_calls):
    """A file modified within 2 s before hashing could change again in the same timestamp tick with
    the same size: its digest is not trusted for the next start."""
    d = _model_folder(tmp_path)
    (d / "tokenizer.json").write_text("new tokenizer")  # mtime: now
    a = model_identity(d)
    hash_calls.clear()
    assert model_identity(d) == a and hash_calls == ["tokenizer.json"]


def test_a_damaged_sidecar_is_rebuilt_with_a_log_line(tmp_path, hash_calls, caplog):
    d = _model_folder(tmp_path)
    first = model_identity(d)
    sidecar = hash_cache_path()
    lora_log = logging.getLogger("lora")
    # (setup_logging stops "lora" from propagating to the root logger)
    lora_log.addHandler(caplog.handler)
    try:
        for damage in (b"{not json", b"\xff\xfe garbage", b"[1, 2]",
                       json.dumps({"version": 1, "files": 3}).encode()):
            sidecar.write_bytes(damage)
            hash_calls.clear()
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="lora"):
                assert model_identity(d) == first
            assert "damaged" in caplog.text and str(sidecar) in caplog.text
            assert len(hash_calls) == len(identity_files(d))  # hashed in full once ...
            # ... and rebuilt
            assert json.loads(sidecar.read_text())["version"] == loading.HASH_CACHE_VERSION
            hash_calls.clear()
            assert model_identity(d) == first and hash_calls == []
    finally:
        lora_log.removeHandler(caplog.handler)
    # atomic writes leave no temp file
    assert not [p for p in sidecar.parent.iterdir() if p.name.startswith(".")]


def test_sidecar_is_per_user_not_in_the_model_folder(tmp_path, monkeypatch, private_cache, hash_calls):
    d = _model_folder(tmp_path)
    listing = sorted(p.name for p in d.iterdir())
    model_identity(d)
    # nothing written beside the model (it may be read-only)
    assert sorted(p.name for p in d.iterdir()) == listing
    assert hash_cache_path() == private_cache / "musicgen-lora" / "file_hashes.json" and hash_cache_path().is_file()
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hash_cache_path() == tmp_path / "home" / ".cache" / "musicgen-lora" / "file_hashes.json"


def test_an_unusable_cache_folder_still_gives_the_identity(tmp_path, monkeypatch, hash_calls):
    d = _model_folder(tmp_path)
    first = model_identity(d)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the cache folder cannot be made
    hash_calls.clear()
    assert model_identity(d) == first and len(hash_calls) == len(identity_files(d))


def test_hub_snapshot_symlinks_are_keyed_by_their_blob(tmp_path, hash_calls):
    """A hub snapshot is a folder of symlinks into blobs/: same content, same identity; the blob's
    digest is remembered, so another snapshot pointing at the same blobs reads nothing."""
    d = _model_folder(tmp_path)
    first = model_identity(d)
    snap = tmp_path / "snapshot"
    snap.mkdir()
    for p in d.iterdir():
        (snap / p.name).symlink_to(p)
    hash_calls.clear()
    assert model_identity(snap) == first and hash_calls == []
