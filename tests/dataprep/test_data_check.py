"""test_dataset.py checks what training reads when given a model: the token cache training builds (the same
files: training reuses them) and training batches drawn through CachedTokenDataset, bucketed batches and
collate_tokens (lora.dataprep.data_check.check_token_batches); without a model it says plainly that it checked
the folder and the audio only."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture
def data_copy(example_data_dir, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(example_data_dir, out, ignore=shutil.ignore_patterns("cache"))
    return out


def test_without_a_model_it_says_what_it_did_not_check(data_copy, capsys):
    from lora import test_dataset

    assert test_dataset.main(["--data_dir", str(data_copy), "--num_batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "Checked: the folder and the audio (add --model_path" in out
    assert not (data_copy / "cache").exists()


def test_with_a_model_it_reads_the_cache_training_builds_and_catches_a_bad_code(data_copy, tiny_model_dir, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from lora import test_dataset
    from lora.config import ModelConfig
    from lora.dataprep import cache_store
    from lora.dataprep.token_cache import build_token_cache, cache_root
    from lora.dataset import load_metadata
    from lora.modeling.loading import load_base_model

    # the cache as train_lora.py builds it (its training clips, its function)
    model, processor, info = load_base_model(ModelConfig(model_path=str(tiny_model_dir)))
    train = load_metadata(data_copy, split="train")
    build_token_cache(train, model, processor, info, data_copy, show_progress=False)
    args = ["--data_dir", str(data_copy), "--model_path", str(tiny_model_dir), "--num_batches", "2"]
    assert test_dataset.main(args) == 0
    out = capsys.readouterr().out
    assert f"0 clip(s) encoded, {len(train)} reused (training reuses them)" in out
    assert "batch 1: codes (" in out and "Checked: the folder, the audio and the token batches" in out
    # a code outside the codebook in one cached clip is found in the batches drawn
    # (every clip's codes, in the shards as the cache stores them: lora.dataprep.cache_store)
    shards = [p for p in cache_store.shard_files(cache_root(data_copy, info)) if p.name.startswith("clips-")]
    assert shards
    for path in shards:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
        tensors = load_file(str(path))
        tensors["codes"][...] = info.vocab_size
        save_file(tensors, str(path), metadata=meta)
    assert test_dataset.main(args) == 1
    out = capsys.readouterr().out
    assert f"codes outside the codebook [0, {info.vocab_size})" in out and "VERDICT: NOT READY" in out
