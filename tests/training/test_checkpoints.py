"""Checkpoints (lora.training.checkpoints) are durable: every file of a new checkpoint is on disk
before the rename that publishes it, and only then is the oldest one rotated out."""

from __future__ import annotations

import os
from pathlib import Path


def test_a_checkpoint_is_flushed_to_disk_before_it_is_renamed_and_before_rotation(tmp_path, monkeypatch):
    """Read from the code path: every file of the new checkpoint and its folder are fsynced before
    the rename that publishes it, the parent after it, and only then is the oldest checkpoint
    deleted."""
    from lora.common import files
    from lora.training import checkpoints

    events = []
    real_fsync, real_replace, real_rmtree = os.fsync, os.replace, checkpoints.shutil.rmtree

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(a), str(b)))
        return real_replace(a, b)

    def rmtree(p, *a, **k):
        events.append(("rmtree", str(p)))
        return real_rmtree(p, *a, **k)

    class Saver:
        def save_pretrained(self, folder):
            Path(folder, "adapter_model.safetensors").write_bytes(b"w" * 100)
            Path(folder, "adapter_config.json").write_text("{}")

        def state_dict(self):
            return {"x": 1}

    class Cfg:
        def save(self, path):
            Path(path).write_text("config")

    root = tmp_path / "checkpoints"
    for step in (1, 2):
        checkpoints.save_checkpoint(root, Saver(), Saver(), Saver(), None, Cfg(),
                                    {"global_step": step}, keep=2)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    monkeypatch.setattr(checkpoints.shutil, "rmtree", rmtree)
    checkpoints.save_checkpoint(root, Saver(), Saver(), Saver(), None, Cfg(), {"global_step": 3}, keep=2)
    new = root / "step-000003"
    publish = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(new))
    tmp = Path(events[publish][1])
    synced_before = {Path(e[1]) for e in events[:publish] if e[0] == "fsync"}
    for f in new.iterdir():
        assert tmp / f.name in synced_before, f"{f.name} was not flushed before the checkpoint was published"
    assert tmp in synced_before  # the folder's entries
    assert ("fsync", str(root)) in events[publish:]  # the rename itself
    delete = next(i for i, e in enumerate(events) if e[0] == "rmtree")
    assert events[delete][1] == str(root / "step-000001") and delete > publish
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000003"]
