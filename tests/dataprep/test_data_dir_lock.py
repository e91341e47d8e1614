"""prepare_data.py and training never run on one data folder at once (lora.dataset.data_dir_lock):
the issue's poisoned cache came from prepare_data --overwrite rewriting the clips while a training
run hashed and encoded them. Each side stops at once with a message while the other runs, and the
lock is the folder's own (nothing is written into the user's folder for it)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from lora import prepare_data, train_lora
from lora.common.cli import UserError


def _sums(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_prepare_data_and_training_never_run_on_one_data_folder_at_once(
        tmp_path, monkeypatch, tiny_model_dir, example_data_dir):
    data = tmp_path / "data"
    shutil.copytree(example_data_dir, data, ignore=shutil.ignore_patterns("cache"))
    prepare = ["--create_example", "--example_clips", "8", "--example_seconds", "1", "--output_dir",
               str(data), "--overwrite"]
    train = ["--model_path", str(tiny_model_dir), "--data_dir", str(data), "--output_dir",
             str(tmp_path / "out"), "--max_steps", "1", "--mixed_precision", "no"]
    seen = {}

    def training_runs(cfg):  # the run, from its set-up (the token cache) to its last save
        before = _sums(data)
        with pytest.raises(UserError) as e:
            prepare_data.main(prepare)
        seen["prepare"] = str(e.value)
        assert _sums(data) == before  # not one clip rewritten under the run
        return 0

    monkeypatch.setattr(train_lora, "train", training_runs)
    assert train_lora.main(train) == 0
    assert "is being read by another process" in seen["prepare"] and str(data) in seen["prepare"]

    def preparing(cfg):  # prepare_data writing the clips
        with pytest.raises(UserError) as e:
            train_lora.main(train)
        seen["train"] = str(e.value)

    monkeypatch.setattr(prepare_data, "create_example", preparing)
    prepare_data.main(prepare)
    assert "prepare_data.py is writing" in seen["train"] and str(data) in seen["train"]
    assert not (tmp_path / "out" / "logs").exists()  # refused before it started
    monkeypatch.undo()
    assert prepare_data.main(prepare) == 0  # the lock went with the run: nothing is left locked
