"""lora/test_dataset.py, the user's "is my data ready?" diagnostic: it passes on good data, names a
broken clip, and its collate pads and masks the audio."""

from __future__ import annotations

from lora import test_dataset as TD
from lora.common.cli import script_command


def test_test_dataset_ok_and_failing(example_data_dir, tmp_path, capsys):
    assert TD.main(["--data_dir", str(example_data_dir), "--num_batches", "2", "--batch_size", "3"]) == 0
    out = capsys.readouterr().out
    # (the next step, as a command that works from where the user stands)
    assert f"OK — next: {script_command('test_model.py')}" in out and "audio (3, 1, 128000) mask (3, 128000)" in out
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(example_data_dir, bad)
    victim = next((bad / "train").iterdir())
    victim.write_text("broken")
    assert TD.main(["--data_dir", str(bad), "--num_batches", "1"]) == 1
    out = capsys.readouterr().out
    assert "NOT READY" in out and victim.name in out


def test_collate_pads_and_masks():
    import torch

    items = [{"audio": torch.ones(1, 5), "text": "a", "id": "x"},
             {"audio": torch.ones(1, 3), "text": "b", "id": "y"}]
    b = TD.collate_audio(items)
    assert b["audio"].shape == (2, 1, 5) and b["lengths"].tolist() == [5, 3]
    assert b["mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]] and b["audio"][1, 0,
                                                                                   3:].abs().sum() == 0
